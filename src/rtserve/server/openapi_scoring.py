"""The OpenAPI pieces of the scoring routes (``scoring_routes.py``) and the tokenizer routes
(``tokenize_routes.py``): request schemas as strict as the parsers (unknown fields refused; null
is the same as absent) and the responses' schemas."""
from __future__ import annotations

from .protocols.scoring import MAX_PAIRS

_TEXT = {"type": "string", "minLength": 1}
_MODEL = {"type": "string", "minLength": 1}
_TEXTS = {"type": "array", "minItems": 1, "maxItems": MAX_PAIRS, "items": _TEXT}
_OAI_ERR = {"description": "OpenAI error format (param names the field at fault)", "content": {"application/json": {
    "schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string"},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}


def _nullable(kind: str, **kw) -> dict:
    return {"type": [kind, "null"], **kw}


def scoring_schemas() -> dict:
    usage = {"type": "object", "required": ["total_tokens"], "properties": {
        "total_tokens": {"type": "integer", "minimum": 0}, "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0}}}
    return {
        "RerankRequest": {"type": "object", "required": ["model", "query", "documents"], "additionalProperties": False,
                          "properties": {
                              "model": _MODEL, "query": _TEXT, "documents": _TEXTS,
                              "top_n": _nullable("integer", minimum=1, description="at most len(documents); "
                                                 "default: every document"),
                              "return_documents": _nullable("boolean", description="default true")}},
        "RerankResponse": {"type": "object", "required": ["id", "model", "usage", "results"], "properties": {
            "id": {"type": "string"}, "model": {"type": "string"}, "usage": usage,
            "results": {"type": "array", "description": "highest relevance_score first", "items": {
                "type": "object", "required": ["index", "relevance_score"], "properties": {
                    "index": {"type": "integer", "minimum": 0}, "relevance_score": {"type": "number"},
                    "document": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}}}}},
        "ScoreRequest": {"type": "object", "required": ["model", "text_1", "text_2"], "additionalProperties": False,
                         "description": "one text_1 against every text_2, or lists of the same length, pairwise",
                         "properties": {"model": _MODEL, "text_1": {"anyOf": [_TEXT, _TEXTS]},
                                        "text_2": {"anyOf": [_TEXT, _TEXTS]}}},
        "ScoreResponse": {"type": "object", "required": ["id", "object", "model", "data", "usage"], "properties": {
            "id": {"type": "string"}, "object": {"const": "list"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": usage,
            "data": {"type": "array", "items": {"type": "object", "required": ["index", "object", "score"], "properties": {
                "index": {"type": "integer", "minimum": 0}, "object": {"const": "score"}, "score": {"type": "number"}}}}}},
        "TokenizeRequest": {"type": "object", "additionalProperties": False,
                            "description": "exactly one of prompt or messages; model may be left out when the server "
                                           "serves one language model",
                            "properties": {
                                "model": _nullable("string", minLength=1), "prompt": _nullable("string"),
                                "messages": {"type": ["array", "null"], "minItems": 1, "items": _MESSAGE},
                                "add_special_tokens": _nullable("boolean", description="default true"),
                                "add_generation_prompt": _nullable("boolean", description="messages only; default true"),
                                "return_token_strs": _nullable("boolean")}},
        "TokenizeResponse": {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
            "count": {"type": "integer", "minimum": 0}, "max_model_len": {"type": "integer", "minimum": 1},
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "token_strs": {"type": ["array", "null"], "items": {"type": ["string", "null"]}}}},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "additionalProperties": False, "properties": {
            "model": _nullable("string", minLength=1),
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0},
                       "description": "each below the tokenizer's vocabulary size"}}},
    }


def _post(summary: str, request: str, response: dict) -> dict:
    ok = {"description": "result", "content": {"application/json": {"schema": response}}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {"200": ok, "400": _OAI_ERR, "401": _OAI_ERR, "404": _OAI_ERR, "413": _OAI_ERR, "503": _OAI_ERR}}}


def scoring_paths() -> dict:
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    rerank = _post("Rerank documents by relevance to a query with a cross-encoder (Cohere/Jina shape)",
                   "RerankRequest", ref("RerankResponse"))
    score = _post("Scores of text pairs with a cross-encoder (vLLM's shape)", "ScoreRequest", ref("ScoreResponse"))
    info = {"type": "object", "required": ["model", "vocab_size", "max_model_len"], "properties": {
        "model": {"type": "string"}, "vocab_size": {"type": "integer"}, "max_model_len": {"type": "integer"},
        "chat_template": {"type": ["string", "null"]}, "bos_token": {"type": ["string", "null"]},
        "eos_token": {"type": ["string", "null"]}}}
    return {
        "/v1/rerank": rerank, "/rerank": rerank, "/v2/rerank": rerank,
        "/v1/score": score, "/score": score,
        "/tokenize": _post("A language model's token ids for a prompt or a chat (its template applied)",
                           "TokenizeRequest", ref("TokenizeResponse")),
        "/detokenize": _post("A language model's text for token ids (special tokens kept)", "DetokenizeRequest",
                             {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}),
        "/tokenizer_info": {"get": {
            "summary": "A language model's tokenizer: chat template, special tokens, vocabulary size, context length",
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "may be left out when the server serves one language model"}],
            "responses": {"200": {"description": "tokenizer", "content": {"application/json": {"schema": info}}},
                          "400": _OAI_ERR, "401": _OAI_ERR, "404": _OAI_ERR, "503": _OAI_ERR}}},
        "/health": {"get": {"summary": "Server liveness (OpenAI side)", "responses": {"200": {"description": "live"}}}},
        "/version": {"get": {"summary": "Server version", "responses": {"200": {"description": "version", "content": {
            "application/json": {"schema": {"type": "object", "required": ["version"],
                                            "properties": {"version": {"type": "string"}}}}}}}}},
    }
