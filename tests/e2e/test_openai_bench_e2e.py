"""``rtserve bench --openai`` against the real server with a tiny LM on loopback: the counts add up."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from servers import start_server  # noqa: E402
from models import write_text_lm  # noqa: E402
from rtserve.cli import main  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def lm_url(tmp_path_factory):
    repo = tmp_path_factory.mktemp("benchrepo")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text(
        "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 256\n  block_size: 4\n  max_model_len: 200\n")
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        url = srv.url
        yield url


@pytest.mark.parametrize("mode", [["--rate", "20"], ["--concurrency", "3", "--chat"]])
def test_bench_openai_counts_add_up(lm_url, tmp_path, capsys, mode):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "lm", "--openai", *mode, "--num-requests", "10", "--input-len", "8:16",
               "--output-len", "4:24", "--slo", "ttft_ms=5000", "--slo", "tpot_ms=1000", "--url", lm_url,
               "--json", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "10 completed, 0 failed" in printed and "ttft_ms" in printed and "goodput" in printed
    doc = json.loads(out.read_text())
    reqs, s = doc["requests"], doc["summary"]
    assert len(reqs) == 10 and all(r["ok"] for r in reqs)
    # ignore_eos: every request generates exactly max_tokens (the usage chunk counts them); the server
    # sends one chunk per token while the client keeps up and coalesces several into one when it falls
    # behind (llm/stream_delivery.py), so without logprobs the per-chunk counts are a lower bound
    assert s["output_tokens"] == sum(r["max_tokens"] for r in reqs)
    assert all(r["output_tokens"] == r["max_tokens"] >= sum(r["chunk_tokens"]) and
               len(r["chunk_tokens"]) == len(r["chunk_times_s"]) >= 1 for r in reqs)
    assert all(r["start_s"] <= r["chunk_times_s"][0] <= r["end_s"] for r in reqs)  # TTFT <= E2E
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"] and s["ttft_ms"]["mean"] <= s["e2e_ms"]["mean"]
    if "--chat" not in mode:
        assert all(8 <= r["prompt_tokens"] <= 16 for r in reqs)  # token-id prompts, counted by the server
    assert s["completed"] == 10 and s["failed"] == 0 and s["goodput"]["fraction"] == 1.0
    assert s["output_token_throughput"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    assert png.stat().st_size > 10_000
