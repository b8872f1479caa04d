"""Structured outputs in the engine, on a tiny random-weight Llama with a byte-level BPE tokenizer:
whatever the weights, an answer that ends with ``stop`` matches its constraint, and bounded schemas
do end. Mixed batches leave the free rows alone; seeds reproduce; a matcher's fault fails only its
own sequence."""
from __future__ import annotations

import json
import re

import pytest
pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from models import write_text_lm  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402
from rtserve.llm.structured import StructuredOutputError, StructuredSpec  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "active": {"type": "boolean"}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["id", "items"],
         "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                        "items": {"type": "array", "maxItems": 3,
                                  "items": {"type": "object", "additionalProperties": False,
                                            "required": ["sku", "qty"],
                                            "properties": {"sku": {"type": "string", "maxLength": 5},
                                                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
                        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]}}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(write_text_lm(tmp_path_factory.mktemp("structured") / "lm"), num_blocks=256, block_size=8,
               max_num_seqs=32, max_model_len=256)


def schema_spec(schema: dict) -> StructuredSpec:
    return StructuredSpec("json_schema", json.dumps(schema))


def run_together(llm: LLM, requests: list[tuple[list[int], SamplingParams]]):
    """All requests' sequences scheduled together, stepped to the end: one list of sequences each."""
    groups = [llm.make_sequences(p, params) for p, params in requests]
    for g in groups:
        for s in g:
            llm.scheduler.add(s)
    while llm.scheduler.has_work:
        llm.step()
    texts = [[(llm.text_of(s), s.generated_ids, s.finish_reason.value, s.failure) for s in g] for g in groups]
    for g in groups:
        for s in g:
            llm.forget(s)
    return texts


@pytest.mark.parametrize("schema,seed", [(PERSON, 0), (PERSON, 100), (ORDER, 7)])
def test_random_weights_answer_valid_json_that_ends(llm, schema, seed):
    out = llm.generate(["Tell me:"], SamplingParams(max_tokens=200, temperature=1.0, seed=seed, n=12,
                                                    structured=schema_spec(schema)))[0].outputs
    stopped = [o for o in out if o.finish_reason == "stop"]
    assert len(stopped) >= 10, [(o.finish_reason, o.text) for o in out]
    for o in stopped:
        jsonschema.validate(json.loads(o.text), schema)
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', o.text))  # no whitespace outside strings
    assert all(o.finish_reason in ("stop", "length") for o in out)


def test_json_object_regex_choice_and_grammar(llm):
    cases = [
        (StructuredSpec("regex", r"[a-z]{1,6}@[a-z]{1,4}\.(com|org)"),
         lambda t: re.fullmatch(r"[a-z]{1,6}@[a-z]{1,4}\.(com|org)", t)),
        (StructuredSpec("choice", json.dumps(["yes", "no", "maybe so"])), lambda t: t in ("yes", "no", "maybe so")),
        (StructuredSpec("grammar", 'root ::= "(" num ("+" num)? ")"\nnum ::= [1-9] [0-9]?'),
         lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)", t)),
        (StructuredSpec("grammar", 'start: "ok" | "err:" /[0-9]{2}/'), lambda t: re.fullmatch(r"ok|err:[0-9]{2}", t)),
    ]
    for spec, check in cases:
        out = llm.generate(["x"], SamplingParams(max_tokens=60, seed=3, n=6, structured=spec))[0].outputs
        assert all(o.finish_reason == "stop" and check(o.text) for o in out), (spec, [o.text for o in out])
    out = llm.generate(["x"], SamplingParams(max_tokens=100, seed=1, n=4,
                                             structured=StructuredSpec("json_object")))[0].outputs
    for o in out:  # an object of anything may not end in 100 tokens; a prefix of one it must be
        assert o.text.startswith("{")
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)


def test_mixed_batch_leaves_free_rows_alone_and_seeds_reproduce(llm):
    prompt = llm.encode("Once upon")
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=80, temperature=1.0, seed=42, structured=schema_spec(PERSON))
    alone_free = run_together(llm, [(prompt, free)])[0][0]
    alone_seeded = run_together(llm, [(prompt, seeded)])[0][0]
    together = run_together(llm, [(prompt, free), (prompt, seeded), (llm.encode("Other"), seeded),
                                  (prompt, SamplingParams(max_tokens=24, temperature=0.8, seed=5))])
    assert together[0][0][1] == alone_free[1]  # greedy free row: same tokens as alone
    assert together[1][0][:3] == alone_seeded[:3]  # seeded constrained row: same answer in any batch
    jsonschema.validate(json.loads(alone_seeded[0]), PERSON)
    llm.grammar_stage.overlap = True  # masks computed on a worker thread during the forward: same answers
    try:
        assert run_together(llm, [(prompt, free), (prompt, seeded)]) == together[:2]
    finally:
        llm.grammar_stage.overlap = False


def test_stop_strings_still_cut_a_constrained_answer(llm):
    spec = StructuredSpec("choice", json.dumps(["alpha-beta"]))
    text, _, reason, _ = run_together(llm, [(llm.encode("x"), SamplingParams(max_tokens=20, stop=("-b",),
                                                                              structured=spec))])[0][0]
    assert (text, reason) == ("alpha", "stop")


def test_a_complete_answer_stops_without_waiting_for_eos_even_at_max_tokens(llm):
    spec = StructuredSpec("choice", json.dumps(["a"]))
    text, ids, reason, _ = run_together(llm, [(llm.encode("x"), SamplingParams(max_tokens=1, structured=spec))])[0][0]
    assert (text, reason) == ("a", "stop") and len(ids) == 1  # no EOS step; "length" would be wrong


def test_a_matcher_fault_fails_only_its_own_sequence(llm):
    spec = schema_spec(PERSON)
    broken, fine = llm.make_sequences(llm.encode("x"), SamplingParams(max_tokens=60, seed=0, n=2, structured=spec))
    close = llm.tokenizer.encode("}", add_special_tokens=False)[0]
    with pytest.raises(Exception):
        broken.grammar.advance(close)  # an object cannot start with '}': the matcher is now in error
    for s in (broken, fine):
        llm.scheduler.add(s)
    while llm.scheduler.has_work:
        llm.step()
    assert broken.failure is not None and broken.failure.status == 500
    assert "structured output" in broken.failure.message
    assert fine.failure is None and fine.finish_reason.value == "stop"
    jsonschema.validate(json.loads(llm.text_of(fine)), PERSON)
    for s in (broken, fine):
        llm.forget(s)


def test_constraints_compile_once_and_bad_ones_are_refused_before_queueing(llm):
    spec = schema_spec({"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}}})
    before = llm.grammars.num_compiled
    llm.compile_structured(spec)
    llm.make_sequences([0, 5], SamplingParams(n=3, structured=spec))
    assert llm.grammars.num_compiled == before + 1
    bad = [StructuredSpec("json_schema", '{"type": "strin"}', param="response_format"),
           StructuredSpec("regex", "([", param="structured_outputs.regex"),
           StructuredSpec("grammar", "root ::= foo", param="guided_grammar")]
    for s in bad:
        with pytest.raises(StructuredOutputError) as e:
            llm.compile_structured(s)
        assert e.value.param == s.param and str(e.value).startswith(s.param + ": invalid")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=spec)
