"""Hugging Face tokenizers (``tokenizer.json``) with the chat template from ``tokenizer_config.json``,
and incremental detokenization for streaming."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{path}: tokenizer.json is missing")
        self.hf = HFTokenizer.from_file(str(tj))
        cfg_path = path / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.eos_token_id = self.hf.token_to_id(self.eos_token) if self.eos_token else None
        self._special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self._kept: set[int] = set()  # special tokens decode() writes (e.g. a tool-call marker)

    def keep_special(self, texts) -> None:
        """Decode these special tokens (when the vocabulary has them) instead of skipping them:
        a parser needs to see markers such as ``[TOOL_CALLS]`` or ``<|python_tag|>``."""
        self._kept |= {i for i in map(self.hf.token_to_id, texts) if i is not None and i in self._special}

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens and self._kept and not self._special.isdisjoint(ids):
            ids = [i for i in ids if i not in self._special or i in self._kept]
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """Render the chat template as Hugging Face transformers does: ``tools`` (a list of
        ``{"type": "function", "function": {...}}``), ``kwargs`` (``chat_template_kwargs``, e.g.
        ``enable_thinking``), its ``tojson`` (no HTML escaping), ``strftime_now`` and loop controls."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template")
        template = _compile(self.chat_template)
        try:
            return template.render(**kwargs, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the sandboxed template failed on this request's data
            raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled as transformers compiles it (cached: a model renders it per request)."""
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


CONTEXT_TOKENS = 5  # prompt tokens an output's first token is decoded after (vLLM's offset too)


class IncrementalDetokenizer:
    """Text deltas of a growing list of output tokens, decoding a short window per update rather
    than the whole output (which made a token cost O(length): 130 us at 2,048 tokens).

    The window starts at the tokens of the last delta (``prefix``): the new text is the window's text
    less the prefix's, so a decoder that treats a text's first token differently (SentencePiece's
    leading space, WordPiece's ``##``) gives the same text as decoding everything. Before the first
    delta the window starts in the prompt's last tokens (``context``), so an output's first token
    reads as it does after the prompt: " Paris" after "The capital of France is" with a
    SentencePiece tokenizer, not "Paris". A delta that ends inside a multi-byte character (decoded
    as U+FFFD) is held back until the character is complete."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        ctx = list(context)[-CONTEXT_TOKENS:]
        if ctx and tokenizer.decode(ctx).endswith("\ufffd"):  # the prompt ends inside a character
            ctx = []
        self.context = ctx
        # the window, in positions of context + output: [prefix, end), its first read - prefix in text
        self.prefix, self.read = 0, len(ctx)

    def update(self, output_ids: list[int]) -> str:
        return self._advance(output_ids, final=False)

    def finish(self, output_ids: list[int]) -> str:
        """When the sequence has ended: the text held back for an incomplete character, as it decodes."""
        return self._advance(output_ids, final=True)

    def _ids(self, output_ids: list[int], start: int, stop: int | None = None) -> list[int]:
        """(context + output_ids)[start:stop], without joining them once the window left the context."""
        n = len(self.context)
        if start >= n:
            return output_ids[start - n:None if stop is None else stop - n]
        return (self.context + output_ids)[start:stop]

    def _advance(self, output_ids: list[int], final: bool) -> str:
        end = len(self.context) + len(output_ids)
        if end <= self.read:
            return ""
        decode = self.tokenizer.decode
        before = decode(self._ids(output_ids, self.prefix, self.read)) if self.read > self.prefix else ""
        window = decode(self._ids(output_ids, self.prefix))
        if len(window) <= len(before) or (window.endswith("\ufffd") and not final):
            return ""
        if self.prefix < len(self.context) and not window.startswith(before):  # nothing sent yet, and a
            # decoder that rewrites the context's text when more follows: decode the output alone
            self.context, self.prefix, self.read = [], 0, 0
            return self._advance(output_ids, final)
        delta = window[len(before):]
        self.text += delta
        self.prefix, self.read = self.read, end
        return delta


def encode_prompt(tokenizer: "Tokenizer | None", prompt: str | list[int]) -> list[int]:
    """A prompt's token ids: text through ``tokenizer``, ids as given (ValueError for text without one)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json: give prompts as token ids")
        return tokenizer.encode(prompt)
    return list(prompt)


def load_tokenizer(path, config_eos_ids) -> tuple["Tokenizer | None", frozenset[int]]:
    """The checkpoint's tokenizer (None without ``tokenizer.json``) and its end-of-sequence ids:
    config.json's and the tokenizer's."""
    from pathlib import Path

    tokenizer = Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
    eos = set(config_eos_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return tokenizer, frozenset(eos)


def find_stop(text: str, stops: tuple[str, ...], new_len: int) -> int:
    """Index where the first stop string starts, looking only where the newest ``new_len``
    characters could complete one; -1 if none."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, len(text) - new_len - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
