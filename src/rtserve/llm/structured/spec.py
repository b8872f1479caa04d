"""What a request asks its output to match: the engine's one spelling of it, whichever API field
(``response_format``, ``structured_outputs``, ``guided_*``, a forced tool call) it came from."""
from __future__ import annotations

from dataclasses import dataclass

#: json_object: any JSON object; json_schema: ``value`` is the schema as canonical JSON text;
#: regex: ``value`` is the pattern; choice: ``value`` is a JSON list of strings; grammar: ``value`` is
#: an EBNF/GBNF (or Lark) grammar's text
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredSpec:
    """Hashable (it keys the compiled-grammar cache). ``param`` names the request field it came from,
    for the 400 an invalid one gets."""

    kind: str
    value: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"{self.param}: unknown structured output kind {self.kind!r}")
