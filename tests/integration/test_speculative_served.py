"""engine.speculative in a served model.yaml: the draft folder must lie inside the model's folder;
a served model speculating answers as the plain one does, and its acceptance counters are in /metrics."""
from __future__ import annotations

import shutil

import pytest

from models import write_text_lm
from servers import repository_index, serve_in_process

pytestmark = pytest.mark.timeout(180)
YAML = "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 64\n  block_size: 4\n"


def spec_yaml(draft: str, method: str = "draft") -> str:
    return YAML + f"  speculative: {{method: {method}, num_tokens: 3, draft: {draft}}}\n"


def test_served_speculation_and_draft_path_checks(tmp_path):
    ckpt = write_text_lm(tmp_path / "ckpt")
    repo = tmp_path / "repo"
    for name, yaml in (("plain", YAML), ("spec", spec_yaml("../draft")), ("inside", spec_yaml("draft")),
                       ("escape", spec_yaml("../../plain/1")), ("missing", spec_yaml("../nowhere")),
                       ("typo", YAML + "  speculative: {method: ngram, num_token: 3}\n")):
        shutil.copytree(ckpt, repo / name / "1")
        (repo / name / "model.yaml").write_text(yaml)
    shutil.copytree(ckpt, repo / "spec" / "draft")
    shutil.copytree(ckpt, repo / "inside" / "1" / "draft")

    async def check(c):
        idx = await repository_index(c)
        for name in ("plain", "spec", "inside"):
            assert idx[name]["state"] == "READY", idx[name]
        for name, needle in (("escape", "resolves outside the model's folder"), ("missing", "is not a folder"),
                             ("typo", "unknown key 'num_token'")):
            assert idx[name]["state"] == "UNAVAILABLE" and needle in idx[name]["reason"], idx[name]
        body = {"prompt": "The quick brown fox jumps over the lazy dog. The quick", "max_tokens": 24,
                "temperature": 0, "ignore_eos": True}
        texts = {}
        for name in ("plain", "spec", "inside"):
            r = await c.post("/v1/completions", json={**body, "model": name})
            assert r.status_code == 200, r.text
            texts[name] = r.json()["choices"][0]["text"]
        assert texts["spec"] == texts["plain"] == texts["inside"] and texts["plain"]
        metrics = (await c.get("/metrics")).text
        line = next(x for x in metrics.splitlines()
                    if x.startswith('rtserve_llm_spec_decode_num_accepted_tokens_total{model="spec"}'))
        assert float(line.split()[-1]) > 0
        assert 'rtserve_llm_spec_decode_num_drafts_total{model="spec"}' in metrics

    serve_in_process(repo, check)
