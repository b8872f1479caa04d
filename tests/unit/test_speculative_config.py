"""model.yaml's engine.speculative: validated strictly, every bad key or value named."""
from __future__ import annotations

import pytest

from rtserve.llm.engine_config import EngineConfig
from rtserve.llm.speculative.config import SpeculativeConfig


def test_defaults_and_mapping():
    c = EngineConfig.from_dict({"speculative": {"method": "ngram"}}).speculative
    assert c == SpeculativeConfig("ngram", 4, None, 2, 4)
    c = EngineConfig.from_dict({"speculative": {"method": "ngram", "prompt_lookup_max": 1}}).speculative
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (1, 1)
    c = EngineConfig.from_dict({"speculative": {"method": "draft", "num_tokens": 3, "draft": "small"}}).speculative
    assert (c.method, c.num_tokens, c.draft) == ("draft", 3, "small")
    assert EngineConfig.from_dict({}).speculative is None


@pytest.mark.parametrize("raw, message", [
    ({"method": "ngram", "lookahead": 3}, "unknown key 'lookahead'"),
    ({"num_tokens": 3}, "speculative.method: missing"),
    ({"method": "medusa"}, "'medusa' is not one of ngram, draft"),
    ({"method": "ngram", "num_tokens": 0}, "num_tokens: must be an integer in [1, 16]"),
    ({"method": "ngram", "num_tokens": True}, "num_tokens"),
    ({"method": "ngram", "num_tokens": 17}, "num_tokens"),
    ({"method": "draft"}, "method 'draft' needs the draft checkpoint's folder"),
    ({"method": "ngram", "draft": "x"}, "draft: only for method 'draft'"),
    ({"method": "draft", "draft": "x", "prompt_lookup_max": 3}, "prompt_lookup_max: only for method 'ngram'"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min 5 is above"),
    ({"method": "ngram", "prompt_lookup_min": 0}, "prompt_lookup_min: must be an integer"),
    ("ngram", "engine.speculative: expected a mapping"),
])
def test_bad_values_are_named(raw, message):
    with pytest.raises(ValueError) as e:
        EngineConfig.from_dict({"speculative": raw})
    assert message in str(e.value)


def test_not_with_pipeline_stages():
    with pytest.raises(ValueError, match="pipeline_stages"):
        EngineConfig(speculative={"method": "ngram"}, pipeline_stages=2)
