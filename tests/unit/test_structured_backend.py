"""The llguidance adapter and the compiled-grammar cache on a real 320-token byte-level BPE tokenizer
(trained here, no weights): masks allow exactly what the grammar allows, JSON has no free
whitespace, compiles are cached and bounded, bad constraints name their field."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")

from models import LM_TEXT  # noqa: E402
from rtserve.llm.sampler import apply_bitmasks  # noqa: E402
from rtserve.llm.structured import GrammarCompiler, GrammarError, StructuredOutputError, StructuredSpec  # noqa: E402


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LM_TEXT, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def allowed(mask: torch.Tensor) -> set[int]:
    bits = ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return set(bits.nonzero().flatten().tolist())


def texts(tok, ids) -> set[str]:
    return {tok.decode([i], skip_special_tokens=False) for i in ids}


def test_masks_follow_the_grammar_and_eos_only_at_the_end(tok_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    c = GrammarCompiler(tok_path, vocab_size=330, eos_token_ids=frozenset({1}))  # logits wider than the vocab
    m = c.matcher(StructuredSpec("choice", json.dumps(["yes", "no"])))
    first = allowed(m.next_mask())
    assert first and all(t < 320 for t in first) and 1 not in first
    assert all("yes".startswith(s) or "no".startswith(s) for s in texts(tok, first))
    for t in tok.encode("yes", add_special_tokens=False).ids:
        m.advance(t)
    assert m.is_finished and m.is_accepting and allowed(m.next_mask()) == {1}


def test_json_has_no_free_whitespace(tok_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    c = GrammarCompiler(tok_path, 320, frozenset({1}))
    m = c.matcher(StructuredSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                              "required": ["a"], "additionalProperties": False})))
    for t in tok.encode('{"a":', add_special_tokens=False).ids:
        assert not any(s.strip() != s for s in texts(tok, allowed(m.next_mask())))
        m.advance(t)
    assert not any(s.strip() != s or not s for s in texts(tok, allowed(m.next_mask())))
    space = tok.encode(" ", add_special_tokens=False).ids[0]
    with pytest.raises(GrammarError, match="does not allow"):
        m.advance(space)


def test_compiles_are_cached_lru_and_bad_ones_name_their_field(tok_path):
    c = GrammarCompiler(tok_path, 320, frozenset({1}), capacity=2)
    specs = [StructuredSpec("regex", f"a{{{i}}}") for i in range(1, 4)]
    c.matcher(specs[0]), c.matcher(specs[0]), c.compile(specs[1])
    assert c.num_compiled == 2
    c.compile(specs[2])  # evicts specs[0]
    c.compile(specs[1])
    assert c.num_compiled == 3 and len(c._cache) == 2
    c.compile(specs[0])
    assert c.num_compiled == 4
    with pytest.raises(StructuredOutputError) as e:
        c.compile(StructuredSpec("json_schema", '{"type":"object","properties":{"x":{"format":"nope"}}}', "guided_json"))
    assert e.value.param == "guided_json" and "nope" in str(e.value)
    loop = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}  # compiles; fails at the first mask
    with pytest.raises(StructuredOutputError, match="no output can match it") as e:
        c.compile(StructuredSpec("json_schema", json.dumps(loop), "response_format.json_schema.schema"))
    assert e.value.param == "response_format.json_schema.schema"
    with pytest.raises(StructuredOutputError, match="need the model's tokenizer") as e:
        GrammarCompiler(None, 320, frozenset({1})).compile(StructuredSpec("json_object", param="response_format"))
    assert e.value.param == "response_format"


def test_bitmasks_touch_only_their_rows():
    logits = torch.randn(3, 70)
    before = logits.clone()
    mask = torch.zeros(2, dtype=torch.int32)
    mask[0] = (1 << 3) | -(1 << 31)  # bits 3 and 31 (the sign bit)
    mask[1] = 1 << 1  # token 33; tokens 64..69 are past the mask: disallowed
    apply_bitmasks(logits, [1], [mask])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [3, 31, 33]
    assert torch.equal(logits[1, [3, 31, 33]], before[1, [3, 31, 33]])


def test_objects_that_list_properties_take_only_those(tok_path):
    """Without it a random key could run on forever (langchain's schemas do not say
    additionalProperties); additionalProperties: true keeps an object open, as does a bare map."""
    from tokenizers import Tokenizer

    from rtserve.llm.structured.backend import closed_objects

    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "array", "items": {"type": "object",
                                                                                "properties": {"c": {}}}}},
              "$defs": {"d": {"type": "object", "properties": {"e": {}}, "additionalProperties": True}},
              "anyOf": [{"properties": {"f": {}}}, {"type": "object"}]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is True
    assert closed["anyOf"][0]["additionalProperties"] is False and "additionalProperties" not in closed["anyOf"][1]
    assert "additionalProperties" not in schema  # a copy

    tok = Tokenizer.from_file(str(tok_path))
    c = GrammarCompiler(tok_path, 320, frozenset({1}))
    m = c.matcher(StructuredSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})))
    for t in tok.encode('{"a":1', add_special_tokens=False).ids:
        m.advance(t)
    assert "," not in texts(tok, allowed(m.next_mask()))  # no second key: only the closing brace
