"""Hypothesis strategies of requests that reach the demo repository's real models, for the fuzz tier
(``test_schemathesis.py``).

The OpenAPI document cannot name the served models (they depend on the repository), so what
schemathesis generates from it alone mostly asks for unknown models and gets 404s. These strategies
put the names the server really serves, tensors shaped from each model's own metadata (JSON and
Triton's binary form, well formed or with one or two defects) and small OpenAI requests into a share
of the cases. Generation requests always carry ``max_tokens`` <= 8 so that the fuzz stays cheap.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson
from hypothesis import strategies as st

from rtserve.tensors import serialize_bytes_tensor

UNKNOWN = "no-such-model"
WORDS = ["the", "for", "loop", "list", "while", "dictionary", "operator", "class", "é", "日本", "\u0000", ""]
# Defects put into a well-formed tensor request; none is the common case.
DEFECTS = ("datatype", "shape", "count", "name", "extra_input", "no_inputs", "unknown_output", "classification",
           "priority", "timeout", "batch_zero", "binary_output", "size_off", "header_off", "id", "gzip", "bad_gzip")


@dataclass
class Served:
    """What the running server serves, read from its own API: tensor models (KServe v2 inference) with
    their metadata, language models and embedding models (OpenAI API)."""

    tensor: dict[str, dict] = field(default_factory=dict)
    llms: list[str] = field(default_factory=list)
    embedders: list[str] = field(default_factory=list)
    rerankers: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return sorted([*self.tensor, *self.llms, *self.embedders, *self.rerankers])

    @classmethod
    def read(cls, url: str) -> "Served":
        out = cls()
        with httpx.Client(base_url=url, timeout=30) as c:
            ready = sorted({e["name"] for e in c.post("/v2/repository/index").json() if e.get("state") == "READY"})
            for name in ready:
                meta = c.get(f"/v2/models/{name}").json()
                platform = meta.get("platform")
                if platform == "rtserve_llm":
                    out.llms.append(name)
                elif platform == "rtserve_embedding":
                    out.embedders.append(name)
                elif platform == "rtserve_cross_encoder":
                    out.rerankers.append(name)
                else:
                    out.tensor[name] = meta
        return out


# -- KServe v2 tensors ------------------------------------------------------------------------------
def _array(spec: dict, batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = [batch if i == 0 and d < 0 else (d if d >= 0 else int(rng.integers(1, 4)))
             for i, d in enumerate(spec["shape"])]
    dt = spec["datatype"]
    if dt == "BYTES":
        words = np.array(rng.choice(WORDS, size=shape))
        return np.vectorize(lambda w: w.encode(), otypes=[object])(words)
    if dt == "BOOL":
        return rng.random(shape) < 0.5
    if dt.startswith("FP"):
        return rng.random(shape).astype({"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[dt])
    return rng.integers(0, 10, size=shape).astype(dt.lower())


def _json_data(arr: np.ndarray) -> list:
    flat = arr.reshape(-1)
    if arr.dtype == object:
        return [b.decode() for b in flat]
    return flat.tolist()


def _binary(arr: np.ndarray) -> bytes:
    return serialize_bytes_tensor(arr) if arr.dtype == object else np.ascontiguousarray(arr).tobytes()


@dataclass
class TensorDraw:
    model: str
    meta: dict
    batch: int
    seed: int
    defects: list[str]
    binary: bool
    outputs: list[tuple[str, bool]]  # requested outputs: (name, binary)


def _entries(d: TensorDraw, rng: np.random.Generator) -> tuple[list[dict], list[bytes]]:
    """The inputs of the request: JSON entries and, for the binary form, their byte sections."""
    batch = 0 if "batch_zero" in d.defects else d.batch
    entries, blobs = [], []
    for spec in d.meta.get("inputs", []):
        arr = _array(spec, batch, rng)
        entry = {"name": spec["name"], "datatype": spec["datatype"], "shape": list(arr.shape)}
        if d.binary:
            blob = _binary(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(arr)
        entries.append(entry)
    if entries:
        first = entries[0]
        if "datatype" in d.defects:
            first["datatype"] = {"FP32": "INT64", "BYTES": "FP32"}.get(first["datatype"], "BYTES")
        if "shape" in d.defects:
            first["shape"] = first["shape"] + [1] if d.seed % 2 else first["shape"][1:]
        if "count" in d.defects and "data" in first and first["data"]:
            first["data"] = first["data"][:-1]
        if "name" in d.defects:
            first["name"] += "_x"
        if "size_off" in d.defects and d.binary:
            first["parameters"]["binary_data_size"] += 1 if d.seed % 2 else -1
    if "extra_input" in d.defects:
        entries.append({"name": "extra", "datatype": "FP32", "shape": [1], "data": [0.5]})
    if "no_inputs" in d.defects:
        entries, blobs = [], []
    return entries, blobs


def _infer_doc(d: TensorDraw, entries: list[dict]) -> dict:
    doc: dict = {"inputs": entries}
    params: dict = {}
    if "binary_output" in d.defects:
        params["binary_data_output"] = True
    if "priority" in d.defects:
        params["priority"] = d.seed % 4
    if "timeout" in d.defects:
        params["timeout"] = d.seed % 2000  # microseconds: mostly too short, 0 means none
    if params:
        doc["parameters"] = params
    if "id" in d.defects:
        doc["id"] = f"req-{d.seed}"
    outputs = [{"name": n, "parameters": {"binary_data": b}} for n, b in d.outputs]
    if "unknown_output" in d.defects:
        outputs.append({"name": "no_such_output"})
    if "classification" in d.defects and d.meta.get("outputs"):
        outputs.append({"name": d.meta["outputs"][0]["name"], "parameters": {"classification": d.seed % 13}})
    if outputs:
        doc["outputs"] = outputs
    return doc


def infer_request(d: TensorDraw) -> tuple[object, str, dict[str, str]]:
    """(body, media type, headers) of one inference request."""
    rng = np.random.default_rng(d.seed)
    entries, blobs = _entries(d, rng)
    doc = _infer_doc(d, entries)
    if not d.binary:
        return doc, "application/json", {}
    header = orjson.dumps(doc)
    length = len(header) + (1 if "header_off" in d.defects else 0)
    headers = {"Inference-Header-Content-Length": str(length)}
    body = header + b"".join(blobs)
    if "gzip" in d.defects or "bad_gzip" in d.defects:  # the body compressed (or said to be, and not)
        headers["Content-Encoding"] = "gzip"
        body = gzip.compress(body) if "gzip" in d.defects else body
    return body, "application/octet-stream", headers


def tensor_draws(served: Served) -> st.SearchStrategy[TensorDraw]:
    """Inference requests for the served tensor models, shaped from their metadata."""
    names = sorted(served.tensor)

    def for_model(name: str) -> st.SearchStrategy[TensorDraw]:
        meta = served.tensor[name]
        out_names = [o["name"] for o in meta.get("outputs", [])]
        return st.builds(
            TensorDraw, model=st.just(name), meta=st.just(meta), batch=st.integers(1, 4),
            seed=st.integers(0, 2**32 - 1),
            defects=st.one_of(st.just([]), st.just([]), st.lists(st.sampled_from(DEFECTS), min_size=1, max_size=2,
                                                               unique=True)),
            binary=st.booleans(),
            outputs=st.lists(st.tuples(st.sampled_from(out_names), st.booleans()), max_size=2,
                             unique_by=lambda t: t[0]) if out_names else st.just([]))

    return st.sampled_from(names).flatmap(for_model)


# -- OpenAI API --------------------------------------------------------------------------------------
_TEXT = st.one_of(st.sampled_from(["The for statement is used to", "def ", "A list is", "x" * 300]),
                  st.text(max_size=40))
_TOKENS = st.lists(st.integers(-1, 70_000), min_size=0, max_size=12)
_STOP = st.lists(st.text(min_size=1, max_size=4), max_size=3)


def _sampling(chat: bool) -> dict:
    """Valid values of the optional request fields (each present or not)."""
    opt = {
        "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.05, 1.0), "top_k": st.integers(-1, 60),
        "min_p": st.floats(0.0, 0.5), "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0), "repetition_penalty": st.floats(0.5, 2.0),
        "seed": st.integers(0, 2**63 - 1), "n": st.integers(1, 2), "ignore_eos": st.booleans(),
        "stop": st.one_of(st.text(min_size=1, max_size=4), _STOP),
        "stop_token_ids": st.lists(st.integers(0, 2_000), max_size=3),
        "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "user": st.text(max_size=8),
        "logit_bias": st.dictionaries(st.integers(0, 300).map(str), st.floats(-100.0, 100.0), max_size=3),
    }
    if chat:
        opt.update(logprobs=st.booleans(), top_logprobs=st.integers(0, 5))
    else:
        opt.update(logprobs=st.integers(0, 5))
    return opt


# A field of any JSON kind, or a list field with items of any kind.
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(-1e20, 1e20), st.text(max_size=3),
                  st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=1))
_FIELDS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "seed", "n", "logprobs", "top_logprobs", "stop", "stop_token_ids", "stream", "stream_options",
           "max_tokens", "max_completion_tokens", "ignore_eos", "user", "echo", "best_of", "logit_bias", "tools"]
# Out of range, and regressions: each of REGRESSIONS once answered 500 (sent every run as explicit examples).
REGRESSIONS = [{"stop_token_ids": [[1]]}, {"stop_token_ids": [{}]}, {"seed": 2**64 - 1, "n": 2}]
_OUT_OF_RANGE = [
    {"temperature": -1}, {"temperature": 101}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 2},
    {"repetition_penalty": 0}, {"presence_penalty": 3}, {"n": 0}, {"n": 65}, {"logprobs": 21}, {"logprobs": -1},
    {"top_logprobs": 21}, {"seed": -(2**63) - 1}, {"seed": 2**63}, {"stop": [""]}, {"stop_token_ids": [-1]},
    {"max_tokens": 0}, {"max_tokens": 10**9}, {"stream_options": {"include_usage": "yes"}}, *REGRESSIONS]
_BAD = st.one_of(
    st.tuples(st.sampled_from(_FIELDS), _JUNK).map(lambda kv: {kv[0]: kv[1]}),
    st.tuples(st.sampled_from(["stop", "stop_token_ids"]), st.lists(_JUNK, min_size=1, max_size=2)).map(
        lambda kv: {kv[0]: kv[1]}),
    st.sampled_from(_OUT_OF_RANGE))
_MAYBE_BAD = st.integers(0, 1).flatmap(lambda i: _BAD if i else st.just({}))  # half of them


def regression_bodies(served: Served, chat: bool) -> list[dict]:
    """A valid request with each of REGRESSIONS, for a language model the server serves."""
    if not served.llms:
        return []
    base = {"model": served.llms[0], "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "What is a list?"}]} if chat else {"prompt": "A list is"})
    return [{**base, **extra} for extra in REGRESSIONS]


def _model_name(served: Served, preferred: list[str]) -> st.SearchStrategy[str]:
    others = [n for n in served.names if n not in preferred] + [UNKNOWN]
    if not preferred:
        return st.sampled_from(others)
    return st.one_of(st.sampled_from(preferred), st.sampled_from(preferred), st.sampled_from(others))


def _messages() -> st.SearchStrategy:
    """A conversation: mostly well formed (text or text parts), else with a bad role, content or shape."""
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)})
    good = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                  "content": st.one_of(_TEXT, _TEXT, st.lists(part, max_size=2))})
    bad = st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", "nobody", None, 3])},
                                optional={"content": st.one_of(_TEXT, st.integers(), st.none())})
    conversation = st.lists(good, min_size=1, max_size=3)
    return st.one_of(conversation, conversation, st.lists(st.one_of(good, bad), max_size=3),
                     st.sampled_from([[], {}, "hi", [[]]]))


def generation_body(served: Served, chat: bool) -> st.SearchStrategy[dict]:
    """A completions or chat request: a real language model mostly, max_tokens (or
    max_completion_tokens) always given and at most 8."""
    required = {"model": _model_name(served, served.llms)}
    if chat:
        required["messages"] = _messages()
        budget = st.one_of(st.fixed_dictionaries({"max_tokens": st.integers(1, 8)}),
                           st.fixed_dictionaries({"max_completion_tokens": st.integers(1, 8)}))
    else:
        required["prompt"] = st.one_of(_TEXT, _TOKENS, st.lists(_TEXT, min_size=1, max_size=2))
        budget = st.fixed_dictionaries({"max_tokens": st.integers(1, 8)})
    body = st.fixed_dictionaries(required, optional=_sampling(chat))
    # a bad max_tokens stays small or is refused: 10**9 is over the context, which the server refuses
    return st.tuples(body.map(_stream_options_with_stream), budget, _MAYBE_BAD).map(lambda t: {**t[0], **t[1], **t[2]})


def _stream_options_with_stream(body: dict) -> dict:
    """stream_options is taken with stream: true only (a 400 otherwise): keep valid bodies valid."""
    return body if body.get("stream") else {k: v for k, v in body.items() if k != "stream_options"}


def embeddings_body(served: Served) -> st.SearchStrategy[dict]:
    """An embeddings request: a real embedding model mostly, every kind of ``input``."""
    ids = st.lists(st.integers(0, 30_000), min_size=1, max_size=16)
    good = st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=4), ids, st.lists(ids, min_size=1, max_size=3))
    bad = st.one_of(st.lists(st.integers(-1, 40_000), max_size=16), st.lists(st.lists(st.integers(-5, 99_999)),
                                                                             max_size=3),
                    st.lists(st.one_of(_TEXT, st.integers(), st.none()), max_size=3), st.sampled_from(["", 3, {}]))
    return st.fixed_dictionaries(
        {"model": _model_name(served, served.embedders), "input": st.one_of(good, good, bad)},
        optional={"encoding_format": st.sampled_from(["float", "base64", "float", "int8"]),
                  "dimensions": st.sampled_from([384, 384, 0, 100]), "user": st.text(max_size=8)})


def scoring_body(served: Served, rerank: bool) -> st.SearchStrategy[dict]:
    """A /v1/rerank or /v1/score request: a real cross-encoder and well-formed texts (long, odd) mostly;
    else empty texts, wrong types, top_n out of range, lists that do not pair up, an unknown field."""
    text = _TEXT.filter(bool)
    texts = st.lists(text, min_size=1, max_size=5)
    bad = st.one_of(st.lists(st.one_of(_TEXT, st.integers(), st.none()), max_size=3), st.sampled_from(["", 3, {}, []]))
    name = _model_name(served, served.rerankers)
    if rerank:
        body = st.fixed_dictionaries({"model": name, "query": _weighted_pick(text, bad), "documents": _weighted_pick(
            texts, bad)}, optional={"top_n": st.integers(-1, 6), "return_documents": st.sampled_from(
                [True, False, None, "yes"])})
    else:
        side = _weighted_pick(st.one_of(text, texts), bad)
        body = st.fixed_dictionaries({"model": name, "text_1": st.one_of(text, text, side), "text_2": side})
    extra = _weighted_pick(st.just({}), st.just({"rank_fields": ["text"]}))
    return st.tuples(body, extra).map(lambda t: {**t[0], **t[1]})


def _weighted_pick(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` nine times in ten (``st.one_of`` would draw each about half the time)."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 0 else good)


def tokenizer_body(served: Served, detokenize: bool) -> st.SearchStrategy[dict]:
    """A /tokenize or /detokenize request: a real language model (or none named) mostly."""
    optional = {"model": _model_name(served, served.llms)}
    if detokenize:
        return st.fixed_dictionaries({"tokens": st.one_of(_TOKENS, _TOKENS, st.sampled_from([[True], "1", None]))},
                                      optional=optional)
    flags = st.sampled_from([True, False, None, 1])
    one = st.one_of(st.fixed_dictionaries({"prompt": st.one_of(_TEXT, _TEXT, st.integers())}),
                    st.fixed_dictionaries({"messages": _messages()}, optional={"add_generation_prompt": flags}),
                    st.just({}))
    rest = st.fixed_dictionaries({}, optional={**optional, "add_special_tokens": flags, "return_token_strs": flags})
    return st.tuples(one, rest).map(lambda t: {**t[0], **t[1]})
