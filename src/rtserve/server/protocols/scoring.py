"""The scoring API codec: ``/v1/rerank`` (Cohere's and Jina's shape, as vLLM and TEI serve it) and
``/v1/score`` (vLLM's) into (query, document) pairs, scores back into responses. No HTTP, no model.

Requests are strict: an unknown field, a wrong type, an empty string or list, ``top_n`` outside
1..len(documents) or lists of lengths that do not pair up are a 400 naming the field (``param``);
``null`` is the same as absent.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import orjson

from .openai import OpenAIError

MAX_PAIRS = 2048  # documents (or text_2 items) per request, as for /v1/embeddings inputs
RERANK_FIELDS = ("model", "query", "documents", "top_n", "return_documents")
SCORE_FIELDS = ("model", "text_1", "text_2")


@dataclass
class RerankRequest:
    model: str
    query: str
    documents: list[str]
    top_n: int  # len(documents) when not given
    return_documents: bool = True

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(self.query, d) for d in self.documents]


@dataclass
class ScoreRequest:
    """``text_1`` has one item (scored against every ``text_2`` item) or as many as ``text_2``."""

    model: str
    text_1: list[str]
    text_2: list[str]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        firsts = self.text_1 * len(self.text_2) if len(self.text_1) == 1 else self.text_1
        return list(zip(firsts, self.text_2))


def strict_object(body: bytes, fields: tuple[str, ...], endpoint: str) -> dict:
    """The request's JSON object; a field not in ``fields`` is a 400 naming it (also used by
    ``protocols/tokenize.py``)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise OpenAIError(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise OpenAIError("the body must be a JSON object")
    unknown = [k for k in doc if k not in fields]
    if unknown:
        names = ", ".join(f"'{k}'" for k in unknown)
        raise OpenAIError(f"unknown field{'s' if len(unknown) > 1 else ''} {names}: {endpoint} takes "
                          f"{', '.join(fields)}", param=unknown[0])
    return doc


def _doc(body: bytes, fields: tuple[str, ...], endpoint: str) -> dict:
    """``strict_object``, with ``model`` required."""
    doc = strict_object(body, fields, endpoint)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("'model' is required: a non-empty string", param="model")
    return doc


def _texts(doc: dict, key: str, allow_single: bool) -> list[str]:
    """A non-empty list of non-empty strings (or, with ``allow_single``, one string)."""
    v = doc.get(key)
    if allow_single and isinstance(v, str):
        v = [v]
    kind = "a non-empty string or a non-empty list of them" if allow_single else "a non-empty list of strings"
    if not isinstance(v, list):
        raise OpenAIError(f"'{key}' is required: {kind}" if v is None else f"'{key}' must be {kind}", param=key)
    if not v:
        raise OpenAIError(f"'{key}' must not be empty", param=key)
    if len(v) > MAX_PAIRS:
        raise OpenAIError(f"'{key}' has {len(v)} items; at most {MAX_PAIRS} per request", param=key)
    for i, t in enumerate(v):
        if not isinstance(t, str):
            raise OpenAIError(f"{key}[{i}] must be a string, got {type(t).__name__}", param=key)
        if not t:
            raise OpenAIError(f"{key}[{i}] is an empty string", param=key)
    return v


def _optional(doc: dict, key: str, kind: type, default):
    v = doc.get(key)
    if v is None:
        return default
    if type(v) is not kind:  # noqa: E721 - bool is not an int here
        raise OpenAIError(f"'{key}' must be {'an integer' if kind is int else 'a boolean'}", param=key)
    return v


def parse_rerank(body: bytes) -> RerankRequest:
    doc = _doc(body, RERANK_FIELDS, "/v1/rerank")
    query = doc.get("query")
    if not isinstance(query, str) or not query:
        raise OpenAIError("'query' is required: a non-empty string", param="query")
    documents = _texts(doc, "documents", allow_single=False)
    top_n = _optional(doc, "top_n", int, len(documents))
    if not 1 <= top_n <= len(documents):
        raise OpenAIError(f"'top_n' must be between 1 and the number of documents ({len(documents)}), got {top_n}",
                          param="top_n")
    return RerankRequest(doc["model"], query, documents, top_n,
                         _optional(doc, "return_documents", bool, True))


def parse_score(body: bytes) -> ScoreRequest:
    doc = _doc(body, SCORE_FIELDS, "/v1/score")
    text_1 = _texts(doc, "text_1", allow_single=True)
    text_2 = _texts(doc, "text_2", allow_single=True)
    if len(text_1) != 1 and len(text_1) != len(text_2):
        raise OpenAIError(f"'text_1' has {len(text_1)} items and 'text_2' {len(text_2)}: give one text_1 (scored "
                          "against every text_2) or lists of the same length (scored pairwise)", param="text_2")
    return ScoreRequest(doc["model"], text_1, text_2)


def rerank_response(req: RerankRequest, scores, num_tokens: int) -> bytes:
    """The ``top_n`` best documents, highest score first (ties in document order)."""
    order = sorted(range(len(req.documents)), key=lambda i: -float(scores[i]))[:req.top_n]
    results = []
    for i in order:
        r = {"index": i, "relevance_score": float(scores[i])}
        if req.return_documents:
            r["document"] = {"text": req.documents[i]}
        results.append(r)
    return orjson.dumps({"id": f"rerank-{uuid.uuid4().hex}", "model": req.model,
                         "usage": {"total_tokens": num_tokens}, "results": results})


def score_response(req: ScoreRequest, scores, num_tokens: int) -> bytes:
    data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
    return orjson.dumps({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": req.model, "data": data,
                         "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens, "completion_tokens": 0}})
