"""rtserve.bench.openai_load: metric maths on hand-made records, SSE parsing, and the streaming
transport against a tiny asyncio server that writes SSE in awkward pieces."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import orjson
import pytest

from rtserve.bench.openai_load import (
    OpenAIBenchConfig, RequestPlanner, RequestRecord, SSEParser, arrival_times, load_prompts, run_openai_load)
from rtserve.bench.openai_report import meets_slos, summarize


def rec(t_start, chunk_times, t_end, tokens=None, error=None) -> RequestRecord:
    r = RequestRecord(0, 4, len(chunk_times), t_start, t_end=t_end, status=200, error=error)
    r.chunk_times = list(chunk_times)
    r.chunk_tokens = [1] * len(chunk_times)
    r.output_tokens = tokens if tokens is not None else len(chunk_times)
    r.prompt_tokens = 4
    return r


# -- metric maths

def test_record_ttft_tpot_itl_e2e():
    r = rec(10.0, [10.2, 10.3, 10.5, 10.6], 10.6)
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.6)
    assert r.tpot == pytest.approx((0.6 - 0.2) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.1])
    assert rec(0.0, [0.5], 0.5).tpot is None  # one token: no time per output token


def test_summarize_throughputs_percentiles_and_goodput():
    records = [rec(0.0, [0.1, 0.2, 0.3], 0.3),            # ttft 100, tpot 100, e2e 300
               rec(1.0, [1.3, 1.35, 1.4, 1.45, 1.5], 1.5),  # ttft 300, tpot 50,  e2e 500
               rec(2.0, [2.05, 2.07], 2.1),                 # ttft 50,  tpot 50,  e2e 100
               rec(3.0, [], 3.1, error="HTTP 400: too long")]
    s = summarize(records, 4.0, {"ttft_ms": 200, "tpot_ms": 60})
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["errors"] == {"HTTP 400: too long": 1}
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_tokens"] == 10 and s["output_token_throughput"] == pytest.approx(10 / 4)
    assert s["total_token_throughput"] == pytest.approx((10 + 12) / 4)
    ttfts = [100.0, 300.0, 50.0]
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)
    for p in (50, 90, 99):
        assert s["ttft_ms"][f"p{p}"] == pytest.approx(np.percentile(ttfts, p))
    assert s["tpot_ms"]["p50"] == pytest.approx(50.0)
    assert s["e2e_ms"]["mean"] == pytest.approx(300.0)
    gaps = [100, 100, 50, 50, 50, 50, 20]
    assert s["itl_ms"]["mean"] == pytest.approx(np.mean(gaps))
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(gaps, 90))
    # only the third meets ttft <= 200 and tpot <= 60; the first fails tpot, the second ttft
    assert s["goodput"]["requests_per_s"] == pytest.approx(1 / 4)
    assert s["goodput"]["fraction"] == pytest.approx(1 / 4)
    assert summarize(records, 4.0, {})["goodput"]["fraction"] == pytest.approx(3 / 4)  # no SLO: every success


def test_slo_edges():
    one = rec(0.0, [0.05], 0.05)
    assert meets_slos(one, {"tpot_ms": 1})  # a single token has no TPOT to miss
    assert meets_slos(one, {"e2e_ms": 50}) and not meets_slos(one, {"e2e_ms": 49})
    assert not meets_slos(rec(0.0, [], 0.1, error="x"), {})
    with pytest.raises(ValueError, match="ttft_ms, tpot_ms, e2e_ms"):
        OpenAIBenchConfig("m", rate=1, num_requests=1, slos={"itl": 5})


def test_summary_counts_statuses_and_times_refusals():
    def refusal(t_start, t_end, status=429):
        r = RequestRecord(0, 4, 8, t_start)
        r.finish(t_end, status, [], b'{"error": {"message": "overloaded"}}')
        return r

    records = [rec(0.0, [0.1, 0.2], 0.2), refusal(1.0, 1.002), refusal(2.0, 2.004), refusal(3.0, 3.001, 503),
               RequestRecord(0, 4, 8, 4.0)]
    records[-1].fail(4.5, "unanswered")
    s = summarize(records, 5.0, {})
    assert s["status_counts"] == {"0": 1, "200": 1, "429": 2, "503": 1}
    assert s["refused"]["count"] == 3 and s["refused"]["latency_ms"]["p50"] == pytest.approx(2.0)
    assert s["errors"] == {"HTTP 429: overloaded": 2, "HTTP 503: overloaded": 1, "unanswered": 1}
    from rtserve.bench.openai_report import format_summary

    assert "refused    3 (HTTP 429/503), answered in p50 2.0 ms" in format_summary(s)


def test_empty_summary_is_nan_not_an_error():
    s = summarize([], 0.0, {})
    assert s["completed"] == 0 and math.isnan(s["ttft_ms"]["p99"]) and s["request_throughput"] == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        OpenAIBenchConfig("m", rate=1, concurrency=2, num_requests=1)
    with pytest.raises(ValueError, match="num_requests or duration_s"):
        OpenAIBenchConfig("m", rate=1)
    with pytest.raises(ValueError, match="output_len"):
        OpenAIBenchConfig("m", rate=1, num_requests=1, output_len=(9, 3))


def test_arrivals_are_poisson_and_fixed_by_the_seed():
    a = arrival_times(50.0, 100.0, 4000, None, seed=3)
    assert a == arrival_times(50.0, 100.0, 4000, None, seed=3) and len(a) == 4000
    gaps = np.diff([100.0] + a)
    assert gaps.min() > 0 and gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 50, rel=0.1)  # exponential: std == mean
    within = arrival_times(50.0, 0.0, None, 2.0, seed=3)
    assert within[-1] < 2.0 and 70 < len(within) < 130


def test_planner_lengths_and_bodies(tmp_path):
    cfg = OpenAIBenchConfig("lm", rate=1, num_requests=1, input_len=(3, 6), output_len=(16, 256), vocab_size=50)
    plans = list(map(RequestPlanner(cfg).plan, range(200)))
    assert [p.spec for p in plans] == [p.spec for p in map(RequestPlanner(cfg).plan, range(200))]  # seeded
    bodies = [orjson.loads(p.spec.body) for p in plans]
    assert all(3 <= len(b["prompt"]) <= 6 and max(b["prompt"]) < 50 for b in bodies)
    assert {b["max_tokens"] for b in bodies} <= set(range(16, 257)) and len({b["max_tokens"] for b in bodies}) > 50
    assert all(b["ignore_eos"] and b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert [p.max_tokens for p in plans] == [b["max_tokens"] for b in bodies]
    assert [p.prompt_len for p in plans] == [len(b["prompt"]) for b in bodies]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "hello there"}\n{"prompt": [1, 2, 3]}\n')
    assert load_prompts(str(jl)) == ["hello there", [1, 2, 3]]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond\n")
    chat = OpenAIBenchConfig("lm", chat=True, concurrency=1, num_requests=1, prompts_file=str(txt))
    b = [orjson.loads(RequestPlanner(chat).plan(i).spec.body) for i in range(3)]
    assert [x["messages"][0]["content"] for x in b] == ["first prompt", "second", "first prompt"]
    assert RequestPlanner(chat).plan(0).spec.path == "/v1/chat/completions"


# -- SSE parsing and reading a stream

def chunk(text="", usage=None, finish=None, logprob_tokens=None) -> bytes:
    choices = [] if usage else [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": {"tokens": logprob_tokens} if logprob_tokens else None}]
    return b"data: " + orjson.dumps({"choices": choices, "usage": usage}) + b"\n\n"


STREAM = (chunk("a") + chunk("") + chunk("c", finish="length")
          + chunk(usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}) + b"data: [DONE]\n\n")


@pytest.mark.parametrize("piece", [1, 2, 7, 64, len(STREAM)])
def test_sse_parser_any_split(piece):
    p, events = SSEParser(), []
    for i in range(0, len(STREAM), piece):
        events += p.feed(STREAM[i:i + piece])
    assert len(events) == 5 and events[-1] == b"[DONE]" and p.buf == b""
    assert orjson.loads(events[0])["choices"][0]["text"] == "a"


def test_sse_parser_crlf_multiline_and_comments():
    p = SSEParser()
    assert p.feed(b": keep-alive\r\n\r\ndata: {\"a\":\r") == []
    assert p.feed(b"\ndata: 1}\r\n\r\ndata:[DONE]\n\n") == [b'{"a":\n1}', b"[DONE]"]


def read(body: bytes, status=200) -> RequestRecord:
    r = RequestRecord(0, 5, 3, 0.0)
    p = SSEParser()
    events = [(0.1 * (i + 1), e) for i, e in enumerate(p.feed(body))]
    r.finish(1.0, status, events, p.buf)
    return r


def test_read_stream_counts_tokens_from_usage_and_chunks():
    r = read(STREAM)
    assert r.ok and r.output_tokens == 3 and r.prompt_tokens == 5 and r.finish_reason == "length"
    assert r.chunk_times == pytest.approx([0.1, 0.2, 0.3])  # the empty-text chunk carries a token too
    assert r.ttft == pytest.approx(0.1) and r.tpot == pytest.approx((1.0 - 0.1) / 2)
    # logprobs give exact per-chunk counts; without usage the chunks' sum is the count
    r = read(chunk("ab", logprob_tokens=["a", "b"]) + chunk("c", finish="length", logprob_tokens=["c"])
             + b"data: [DONE]\n\n")
    assert r.ok and r.chunk_tokens == [2, 1] and r.output_tokens == 3 and r.prompt_tokens == 5


@pytest.mark.parametrize("body,status,needle", [
    (chunk("a") + b'data: {"error": {"message": "engine fault"}}\n\n' + b"data: [DONE]\n\n", 200, "engine fault"),
    (chunk("a"), 200, "without [DONE]"),
    (chunk("a", finish="abort") + b"data: [DONE]\n\n", 200, "aborted"),
    (b"data: [DONE]\n\n", 200, "no output"),
    (b'{"error": {"message": "prompt too long", "type": "invalid_request_error"}}', 400, "HTTP 400: prompt too long"),
])
def test_read_stream_errors(body, status, needle):
    r = read(body, status)
    assert not r.ok and needle in r.error


# -- the transport against a tiny server

def sse_server(pieces_for, status=200):
    """An HTTP/1.1 keep-alive server answering each request with a chunked SSE body, written as
    ``pieces_for(n)`` (several TCP writes with pauses, HTTP chunks cut mid-event and mid-frame)."""
    state = {"requests": 0, "bodies": []}

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                                  if ln.lower().startswith(b"content-length:")))
                state["bodies"].append(orjson.loads(await reader.readexactly(length)))
                state["requests"] += 1
                if status != 200:
                    body = b'{"error": {"message": "no such model"}}'
                    writer.write(b"HTTP/1.1 %d Not Found\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body)
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                for piece in pieces_for(state["requests"]):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return state, handle


def framed(events: list[bytes]) -> list[bytes]:
    """The SSE events as HTTP chunks whose boundaries fall inside events, then cut into TCP writes
    that end mid chunk-size line."""
    data = b"".join(events)
    cut = [data[i:i + 37] for i in range(0, len(data), 37)]
    wire = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in cut) + b"0\r\n\r\n"
    return [wire[i:i + 50] for i in range(0, len(wire), 50)]


def run_bench(handle, **kw) -> tuple:
    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run_openai_load("127.0.0.1", port, OpenAIBenchConfig("m", **kw))
        finally:
            server.close()

    return asyncio.run(main())


def test_transport_streams_in_pieces_closed_loop():
    def pieces(n):
        return framed([chunk("x"), chunk("y"), chunk("z", finish="length"),
                       chunk(usage={"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}),
                       b"data: [DONE]\n\n"])

    state, handle = sse_server(pieces)
    res = run_bench(handle, concurrency=2, num_requests=6, output_len=(3, 3), input_len=(4, 4))
    assert state["requests"] == 6 and len(res.records) == 6
    assert all(r.ok for r in res.records), [r.error for r in res.records]
    assert all(r.output_tokens == 3 and len(r.chunk_times) == 3 and r.ttft <= r.e2e for r in res.records)
    assert all(r.itls[0] > 0.005 for r in res.records)  # the server paused between writes
    assert res.connections == 2  # kept alive: one connection per client
    s = res.summary()
    assert s["completed"] == 6 and s["output_tokens"] == 18 and s["total_token_throughput"] > 0


def test_transport_open_loop_and_http_errors():
    state, handle = sse_server(lambda n: [], status=404)
    res = run_bench(handle, rate=200.0, num_requests=10)
    assert state["requests"] == 10
    assert all(not r.ok and r.error == "HTTP 404: no such model" for r in res.records)
    assert res.summary()["errors"] == {"HTTP 404: no such model": 10}


def test_transport_refused_connection_is_a_failure_not_a_hang():
    async def main():
        s = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = s.sockets[0].getsockname()[1]
        s.close()
        await s.wait_closed()
        return await run_openai_load("127.0.0.1", port, OpenAIBenchConfig("m", rate=50.0, num_requests=3))

    res = asyncio.run(main())
    assert len(res.records) == 3 and all(r.error == "ConnectionRefusedError" for r in res.records)
