"""The OpenAPI document of the HTTP API, served at /openapi.json."""
from __future__ import annotations

from .. import __version__
from .protocols import openai_fields as fields
from .openapi_scoring import scoring_paths, scoring_schemas

_DATA = {"description": "row-major, flat or nested lists: numbers, true/false for BOOL, strings for BYTES; "
                        "never null",
         "anyOf": [{"type": ["number", "boolean", "string"]},
                   {"type": "array", "items": {"$ref": "#/components/schemas/TensorData"}}]}
_TENSOR = {
    "type": "object", "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": ["object", "null"], "properties": {
            "binary_data_size": {"type": ["integer", "null"], "minimum": 0}}},
        "data": {"$ref": "#/components/schemas/TensorData"},
    },
}
_META_TENSOR = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                                 "shape": {"type": "array", "items": {"type": "integer"}}}}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": ["string", "null"]},
    "parameters": {"type": ["object", "null"], "properties": {
        "priority": {"type": ["integer", "null"], "minimum": 0},
        "timeout": {"type": ["integer", "null"], "minimum": 0, "description": "microseconds"},
        "binary_data_output": {"type": "boolean"}}},
    "inputs": {"type": "array", "minItems": 1, "items": _TENSOR,
               "description": "each input once; 'data', or 'parameters.binary_data_size' bytes of the binary "
                              "section; BYTES elements must be valid UTF-8"},
    "outputs": {"type": ["array", "null"], "description": "each output at most once", "items": {
        "type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"},
            "parameters": {"type": ["object", "null"], "properties": {
                "binary_data": {"type": "boolean"},
                "classification": {"type": ["integer", "null"], "minimum": 0}}}}}}}}


def _nullable(kind: str, **limits) -> dict:
    return {"type": [kind, "null"], **limits}


def _openai_schemas() -> dict:
    """What ``protocols/openai.py`` accepts (null is the same as absent); the fields not described
    here get their schema from ``openai_fields``, and no other field is taken."""
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    text = {"type": "string", "minLength": 1}
    model = {"type": "string", "minLength": 1}
    sampling = {
        "temperature": _nullable("number", minimum=0, maximum=100),
        "top_p": _nullable("number", exclusiveMinimum=0, maximum=1),
        "top_k": _nullable("integer", minimum=-1, description="0 or -1: off"),
        "min_p": _nullable("number", minimum=0, maximum=1),
        "repetition_penalty": _nullable("number", exclusiveMinimum=0, maximum=10),
        "presence_penalty": _nullable("number", minimum=-2, maximum=2),
        "frequency_penalty": _nullable("number", minimum=-2, maximum=2),
        "seed": _nullable("integer"),
        "stop": {"anyOf": [text, {"type": "array", "items": text, "maxItems": 64}, {"type": "null"}]},
        "stop_token_ids": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0},
                           "description": "each below the model's vocabulary size"},
        "ignore_eos": _nullable("boolean"),
        "n": _nullable("integer", minimum=1, maximum=64),
        "stream": _nullable("boolean"),
        "stream_options": {"type": ["object", "null"], "additionalProperties": False, "properties": {
            "include_usage": _nullable("boolean"), "continuous_usage_stats": _nullable("boolean"),
            "include_obfuscation": _nullable("boolean")}},
        "logit_bias": {"type": ["object", "null"], "propertyNames": {"pattern": "^[0-9]+$"},
                       "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                       "description": "token id -> bias; each id below the model's vocabulary size"},
        "max_tokens": _nullable("integer", minimum=1),
        "prompt_logprobs": _nullable("integer", minimum=0, maximum=20),
        "priority": _nullable("integer", minimum=-2**63, maximum=2**63 - 1),
    }
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string"},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "description": "text parts, joined", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}
    schemas = {
        "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
            "model": model,
            "prompt": {"anyOf": [text, ids, {"type": "array", "minItems": 1, "maxItems": 2048,
                                             "items": {"anyOf": [text, ids]}}]},
            "echo": _nullable("boolean"),
            "logprobs": _nullable("integer", minimum=0, maximum=20),
            "best_of": _nullable("integer", minimum=1, maximum=64,
                                 description="at least n; above n, stream must be false"), **sampling,
            "max_tokens": _nullable("integer", minimum=0, description="0 only with echo: true (scoring)")},
            "anyOf": [{"properties": {"max_tokens": {"not": {"const": 0}}}},  # 0 needs echo
                      {"required": ["echo"], "properties": {"echo": {"const": True}}}]},
        "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
            "model": model,
            "messages": {"type": "array", "minItems": 1, "items": message},
            "logprobs": _nullable("boolean"),
            "top_logprobs": _nullable("integer", minimum=0, maximum=20),
            "max_completion_tokens": _nullable("integer", minimum=1), **sampling}},
        "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": model,
            "input": {"anyOf": [text,
                                {"type": "array", "minItems": 1, "maxItems": 2048, "items": text},
                                ids,
                                {"type": "array", "minItems": 1, "maxItems": 2048, "items": ids}]},
            "encoding_format": {"enum": ["float", "base64", None]},
            "dimensions": _nullable("integer", minimum=1),
            "user": _nullable("string")}},
    }
    for name, endpoint in (("CompletionRequest", fields.COMPLETIONS), ("ChatCompletionRequest", fields.CHAT),
                           ("EmbeddingRequest", fields.EMBEDDINGS)):
        schemas[name] = fields.complete_schema(schemas[name], endpoint)
    return schemas


def _err(desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_SSE_EVENT = {
    "type": "object", "required": ["data"],
    "description": "One server-sent event: its data is a chunk (JSON) or, last, [DONE]",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}
_NOT_READY = _err("model not ready: loading, unloading, unloaded or failed to load")


def _model_paths() -> dict:
    name = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ver = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    paths = {}
    for prefix, params in (("/v2/models/{model}", [name]), ("/v2/models/{model}/versions/{version}", [name, ver])):
        paths[prefix] = {"get": {"summary": "Model metadata", "parameters": params, "responses": {
            "200": {"description": "metadata", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelMetadata"}}}},
            "404": _err("unknown model or version"), "503": _NOT_READY}}}
        paths[prefix + "/ready"] = {"get": {"summary": "Model readiness", "parameters": params, "responses": {
            "200": {"description": "ready (no body)"}, "404": _err("unknown model or version"),
            "503": {"description": "not ready (no body)"}}}}
        paths[prefix + "/config"] = {"get": {"summary": "Model configuration", "parameters": params, "responses": {
            "200": {"description": "configuration"}, "404": _err("unknown model or version"), "503": _NOT_READY}}}
        paths[prefix + "/infer"] = {"post": {
            "summary": "Inference (JSON, or JSON header + binary tensors with Inference-Header-Content-Length)",
            "parameters": params + [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                                     "schema": {"type": "integer"}}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {
                "200": {"description": "outputs: JSON, or with binary outputs a JSON header of "
                                       "Inference-Header-Content-Length bytes followed by the tensors' bytes",
                        "headers": {"Inference-Header-Content-Length": {"schema": {"type": "integer", "minimum": 0}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
                                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                "400": _err("invalid input"), "401": _err("API key needed"), "404": _err("unknown model or version"),
                "413": _err("body too large"), "503": _err("queue full or model not ready"),
                "504": _err("request timed out in the queue")}}}
    return paths


def _openai_paths() -> dict:
    """The OpenAI-compatible routes; their bodies follow OpenAI's API reference (not repeated here)."""
    oai_err = {"description": "OpenAI error format", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}}}}}

    def post(summary: str, streams: bool, request: str) -> dict:
        ok = {"description": "result", "content": {"application/json": {"schema": {"type": "object"}}}}
        if streams:  # in OpenAPI 3.1 the schema of text/event-stream describes one event
            ok["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
            "responses": {"200": ok, "400": oai_err, "401": oai_err, "404": oai_err, "413": oai_err,
                          "503": oai_err}}}

    return {
        "/v1/models": {"get": {"summary": "Language and embedding models (OpenAI list format)",
                               "responses": {"200": {"description": "list"}}}},
        "/v1/completions": post("Text completion; SSE chunks when stream is true", True, "CompletionRequest"),
        "/v1/chat/completions": post("Chat completion with the model's chat template; SSE when stream is true",
                                     True, "ChatCompletionRequest"),
        "/v1/embeddings": post("Embeddings of a string, strings or token ids (float or base64)", False,
                               "EmbeddingRequest"),
    }


def openapi_document() -> dict:
    paths = {
        "/v2/health/live": {"get": {"summary": "Server liveness", "responses": {"200": {"description": "live"}}}},
        "/v2/health/ready": {"get": {"summary": "Server readiness", "responses": {
            "200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/v2": {"get": {"summary": "Server metadata", "responses": {"200": {"description": "metadata"}}}},
        "/v2/repository/index": {"post": {"summary": "Models in the repository with their state",
                                          "responses": {"200": {"description": "index"}, "401": _err("API key needed")}}},
        "/v2/repository/models/{model}/load": {"post": {
            "summary": "Load or reload a model", "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "loaded"}, "400": _err("model does not load: its model.yaml or a model file cannot be used"),
                          "401": _err("API key needed"), "404": _err("not in the repository"),
                          "500": _err("model failed to load for another reason (names model, version and error)")}}},
        "/v2/repository/models/{model}/unload": {"post": {
            "summary": "Unload a model", "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "unloaded"}, "401": _err("API key needed"), "404": _err("not loaded")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }
    paths.update(_model_paths())
    paths.update(_openai_paths())
    paths.update(scoring_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "rtserve", "version": __version__,
                 "description": "KServe v2 / Open Inference Protocol with Triton's binary tensor extension, "
                                "and an OpenAI-compatible API for language and embedding models."},
        "paths": paths,
        "components": {"schemas": {
            "Error": _ERROR,
            "TensorData": _DATA,
            "InferRequest": _INFER_REQUEST,
            "InferResponse": {"type": "object", "properties": {
                "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                "outputs": {"type": "array", "items": _TENSOR}}},
            "ModelMetadata": {"type": "object", "properties": {
                "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"}, "inputs": {"type": "array", "items": _META_TENSOR},
                "outputs": {"type": "array", "items": _META_TENSOR}}},
            **_openai_schemas(),
            **scoring_schemas(),
        }},
    }
