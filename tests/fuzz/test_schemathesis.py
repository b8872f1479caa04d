"""Fuzz tier: schemathesis against the real server (``python -m rtserve serve``) on the built-in demo
repository, every operation of the OpenAPI document it serves at /openapi.json.

Each request must be answered (no 5xx, no hang: a request timeout fails the test) with a status code
the document lists for that operation, a documented content type and a body that matches its schema.

Cases: what schemathesis generates from the document (positive and negative data), the same with the
model names the server really serves, and, from ``fuzz_cases``, well-formed or slightly broken tensor
requests shaped from each model's metadata (JSON and binary) and small OpenAI requests (max_tokens <= 8);
and, as explicit examples every run, the requests that once answered 500 (``fuzz_cases.REGRESSIONS``).
Operations run in the document's order; then repository loads (reloads of real models), unloads, a
short second pass over the model routes while some models are unloaded, and everything is loaded back.

Bounded: ``BUDGET`` examples per operation (about 1,400 requests in all), no shrinking, a request
timeout and a Hypothesis deadline per example: about 30 s of fuzzing on 2 CPU cores, after 20-50 s to
build the demo repository and start the server. Deterministic: Hypothesis runs derandomized (a seed
fixed by the test function) with no example database, so each run sends the same requests (only what
depends on timing, a queue deadline of a few microseconds met or not, can answer differently).
"""
from __future__ import annotations

import re
import time
import traceback
from collections import Counter
from datetime import timedelta

import httpx
import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="the fuzz tier needs schemathesis: pip install -e '.[test]' (make test does)")

import hypothesis  # noqa: E402 - schemathesis depends on it
import requests  # noqa: E402
from hypothesis import HealthCheck, Phase, Verbosity  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.failures import ServerError  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance,
)

from fuzz_cases import (  # noqa: E402
    Served, embeddings_body, generation_body, infer_request, regression_bodies, scoring_body, tensor_draws,
    tokenizer_body,
)
from cross_encoders import write_tiny_cross_encoder  # noqa: E402
from rtserve.demo import ensure_demo_repository  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REQUEST_TIMEOUT_S = 15  # no answer within this is a hang
SETTINGS = hypothesis.settings(
    deadline=timedelta(seconds=20), derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, report_multiple_bugs=False,
    print_blob=False)


def no_server_fault(ctx, response, case) -> None:
    """Every 5xx fails, except a 503 or 504 that the document lists for the operation: a model that
    is not ready (unloaded by this fuzz), a full queue, a deadline the request itself set. (schemathesis'
    ``not_a_server_error`` fails every 5xx.)"""
    status = response.status_code
    if status >= 500 and not (status in (503, 504) and str(status) in case.operation.responses.status_codes):
        raise ServerError(operation=case.operation.label, status_code=status)


CHECKS = [no_server_fault, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# Examples per operation; operations not named here get DEFAULT_BUDGET.
BUDGET = {
    "POST /v2/models/{model}/infer": 400,
    "POST /v2/models/{model}/versions/{version}/infer": 100,
    "POST /v1/completions": 200,
    "POST /v1/chat/completions": 200,
    "POST /v1/embeddings": 150,
    "POST /v1/rerank": 80,
    "POST /v1/score": 80,
    "POST /tokenize": 60,
    "POST /detokenize": 40,
    "POST /v2/repository/models/{model}/load": 10,
    "POST /v2/repository/models/{model}/unload": 10,
}
DEFAULT_BUDGET = 30
AFTER_UNLOAD_BUDGET = 20
LOAD, UNLOAD = "POST /v2/repository/models/{model}/load", "POST /v2/repository/models/{model}/unload"
# Operations whose cases mostly reach a model: fewer than half of their answers may be 404s. (The
# GET routes are not among them: their cases with a served name are few and Hypothesis sends each once.)
REACHES_MODELS = ("POST /v2/models/{model}/infer", "POST /v1/completions", "POST /v1/chat/completions",
                  "POST /v1/embeddings", "POST /v1/rerank", "POST /v1/score", "POST /tokenize")
SCORING = ("POST /v1/rerank", "POST /rerank", "POST /v2/rerank", "POST /v1/score", "POST /score")


def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn in proportion to its weight (``st.one_of`` flattens nested
    choices and drops repeated ones, so it cannot weight them)."""
    pool = [s for weight, s in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


def _describe(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(exc))
    for sub in getattr(exc, "exceptions", ()):
        text += _describe(sub)
    return text


class Fuzzer:
    """Runs every operation with its budget and collects failures and answers by status code."""

    def __init__(self, url: str, schema, served: Served) -> None:
        self.url, self.served = url, served
        self.ops = {r.ok().label: r.ok() for r in schema.get_all_operations()}
        self.session = requests.Session()
        self.failures: list[str] = []
        self.statuses: dict[str, Counter] = {}

    # -- strategies -------------------------------------------------------------------------------
    def _generated(self, op) -> st.SearchStrategy:
        """What schemathesis makes of the document alone: positive and, where there are inputs, negative."""
        modes = [GenerationMode.POSITIVE]
        if len(op.path_parameters) or len(op.body) or len(op.headers):
            modes.append(GenerationMode.NEGATIVE)
        return st.one_of([op.as_strategy(generation_mode=m) for m in modes])

    def _real_names(self, op, names: list[str]) -> st.SearchStrategy:
        """Generated cases with the path's model a served one (and version 1 or generated)."""
        fixed = [{"model": n} for n in names]
        if "{version}" in op.path:
            fixed += [{"model": n, "version": "1"} for n in names]
        return st.one_of([op.as_strategy(path_parameters=p) for p in fixed])

    def _tensor_cases(self, op) -> st.SearchStrategy:
        def case(t):
            draw, version = t
            body, media_type, headers = infer_request(draw)
            params = {"model": draw.model, **({"version": version} if "{version}" in op.path else {})}
            return op.Case(path_parameters=params, headers=headers, body=body, media_type=media_type)

        return st.tuples(tensor_draws(self.served), st.sampled_from(["1", "1", "2", "0"])).map(case)

    def strategy(self, op, names: list[str]) -> st.SearchStrategy:
        generated = self._generated(op)
        label = op.label
        if label.endswith("/infer"):
            return _weighted((1, generated), (1, self._real_names(op, names)), (3, self._tensor_cases(op)))
        if label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings"):
            bodies = (embeddings_body(self.served) if label.endswith("embeddings")
                      else generation_body(self.served, chat="chat" in label))
            real = bodies.map(lambda b: op.Case(body=b, media_type="application/json"))
            return _weighted((1, generated), (3, real))
        if label in SCORING or label in ("POST /tokenize", "POST /detokenize"):
            bodies = (scoring_body(self.served, rerank="rerank" in label) if label in SCORING
                      else tokenizer_body(self.served, detokenize="detokenize" in label))
            real = bodies.map(lambda b: op.Case(body=b, media_type="application/json"))
            return _weighted((1, generated), (3, real))
        if "{model}" in op.path:
            return _weighted((1, generated), (2, self._real_names(op, names)))
        return generated

    # -- running ----------------------------------------------------------------------------------
    def run(self, label: str, budget: int, names: list[str], tag: str = "") -> None:
        op = self.ops[label]
        statuses = self.statuses.setdefault(tag + label, Counter())

        @hypothesis.settings(SETTINGS, max_examples=budget)
        @hypothesis.given(case=self.strategy(op, names))
        def fuzz(case) -> None:
            response = case.call_and_validate(base_url=self.url, session=self.session, checks=CHECKS,
                                              timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] += 1

        if label in ("POST /v1/completions", "POST /v1/chat/completions"):
            for body in regression_bodies(self.served, chat="chat" in label):
                fuzz = hypothesis.example(case=op.Case(body=body, media_type="application/json"))(fuzz)
        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - schemathesis' FailureGroup is a BaseExceptionGroup
            self.failures.append(f"{tag}{label}:\n{_describe(e)}")

    def summary(self) -> str:
        width = max(len(k) for k in self.statuses)
        return "\n".join(f"{k.ljust(width)}  {sum(c.values()):4d}  " +
                         " ".join(f"{s}:{n}" for s, n in sorted(c.items())) for k, c in self.statuses.items())


def _ordered(ops: dict) -> list[str]:
    """The document's order, repository loads and unloads last."""
    return [label for label in ops if label not in (LOAD, UNLOAD)] + [LOAD, UNLOAD]


def _restore(url: str, served: Served) -> None:
    """Load back every model the fuzz may have unloaded: ensembles after the models they call."""
    with httpx.Client(base_url=url, timeout=60) as c:
        later = [n for n, m in served.tensor.items() if m.get("platform") == "ensemble"]
        for name in [n for n in served.names if n not in later] + later:
            r = c.post(f"/v2/repository/models/{name}/load")
            assert r.status_code == 200, f"reloading {name}: {r.status_code} {r.text}"
        states = {e["name"]: e["state"] for e in c.post("/v2/repository/index").json()}
        assert all(states.get(n) == "READY" for n in served.names), states
        assert c.get("/v2/health/ready").status_code == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")
    repo = ensure_demo_repository(home)
    write_tiny_cross_encoder(repo / "reranker" / "1")  # the demo has no cross-encoder: a tiny random one
    (repo / "reranker" / "model.yaml").write_text("backend: cross_encoder\ndevice: cpu\nmax_batch_size: 8\n")
    with start_server(repo, home, "--log-level", "warning", env={"RTSERVE_HOME": str(home)}) as srv:
        yield srv


def test_fuzz_every_operation_against_the_demo_repository(server):
    t0 = time.monotonic()
    served = Served.read(server.url)
    assert served.tensor and served.llms and served.rerankers, f"the demo repository serves too little to fuzz: {served.names}"
    # failures print the request as sent: no "[Filtered]" for max_tokens and stop_token_ids
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)
    fuzzer = Fuzzer(server.url, schema, served)
    names = served.names
    for label in _ordered(fuzzer.ops):
        fuzzer.run(label, BUDGET.get(label, DEFAULT_BUDGET), names)
    for label in fuzzer.ops:  # some models are unloaded now: their routes must still answer as documented
        if re.match(r"(GET|POST) /v2/models/", label):
            fuzzer.run(label, AFTER_UNLOAD_BUDGET, names, tag="after unload: ")
    _restore(server.url, served)
    elapsed = time.monotonic() - t0
    report = f"fuzzed in {elapsed:.0f} s\n{fuzzer.summary()}"
    print(report)
    assert server.proc.poll() is None, f"the server died:\n{server.log_text()[-4000:]}"
    assert not fuzzer.failures, ("\n\n".join(fuzzer.failures) + "\n\n" + report +
                                 f"\n\nserver log (tail):\n{server.log_text()[-4000:]}")
    for label in REACHES_MODELS:
        c = fuzzer.statuses[label]
        assert c[404] < 0.5 * sum(c.values()), f"{label}: most cases never reached a model: {dict(c)}"
