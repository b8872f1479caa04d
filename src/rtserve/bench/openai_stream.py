"""What came back from one streamed OpenAI request: its :class:`RequestRecord`, filled after the
run (:func:`read_stream`) from the SSE events (:class:`SSEParser`) the connection stamped with their
arrival times.

Token counting: every request asks for ``stream_options.include_usage``, and the usage chunk's
``completion_tokens`` is the request's output-token count (exact: the server counts it). Per chunk,
the tokens are the length of the chunk's ``logprobs`` when the server sent them, otherwise 1 for
each chunk that carries a choice (the text of a chunk can be empty, an incomplete UTF-8 character or
a model without a tokenizer, so text is never counted). rtserve sends one chunk per sampled token
while its event loop and the client keep up, and coalesces several tokens into one chunk when they
fall behind, so without logprobs the per-chunk counts are a lower bound; the usage chunk is exact.
TTFT is timed to the first chunk that carries a choice; ITL is every gap between such chunks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson


@dataclass
class RequestRecord:
    """One request. Times are ``perf_counter()`` seconds; ``t_start`` is the scheduled arrival (open
    loop) or the send (closed loop), so every latency includes time queued in the client."""

    index: int
    prompt_len: int
    max_tokens: int
    t_start: float
    t_end: float | None = None
    status: int = 0
    error: str | None = None  # None = success
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying a choice
    chunk_tokens: list[int] = field(default_factory=list)   # output tokens in that chunk
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_end is not None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.t_start

    @property
    def e2e(self) -> float:
        return self.t_end - self.t_start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with a single output token."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    def finish(self, t: float, status: int, events: list[tuple[float, bytes]], rest: bytes) -> None:
        """The answer is complete: read its stream (``rest`` = body bytes that were no event)."""
        self.t_end, self.status = t, status
        read_stream(self, events)
        if status != 200:
            self.error = f"HTTP {status}: {_error_message(rest or b''.join(e for _, e in events))}"

    def fail(self, t: float, kind: str) -> None:
        self.t_end, self.error = t, kind


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])[:200]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class SSEParser:
    """Server-sent events from a byte stream in arbitrary pieces: ``feed`` returns the ``data`` of
    every event completed by this piece (multi-line data joined with newlines)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data
        if b"\r" in buf:  # a CR left at the end pairs with the next piece's LF on the next feed
            buf = buf.replace(b"\r\n", b"\n")
        *events, self.buf = buf.split(b"\n\n")
        out = []
        for ev in events:
            lines = [ln[5:] for ln in ev.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(ln[1:] if ln.startswith(b" ") else ln for ln in lines))
        return out


def read_stream(rec: RequestRecord, events: list[tuple[float, bytes]]) -> None:
    """Fill ``rec`` from its (arrival time, data) events; a stream without ``[DONE]``, with an error
    event or with an aborted choice is an error."""
    done, usage = False, None
    for t, data in events:
        if data == b"[DONE]":
            done = True
            continue
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            rec.error = rec.error or f"bad event: {data[:80]!r}"
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("error"):
            err = doc["error"]
            rec.error = rec.error or f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
        for choice in doc.get("choices") or ():
            lp = choice.get("logprobs")
            n = len(lp.get("tokens") or lp.get("content") or ()) if isinstance(lp, dict) else 1
            rec.chunk_times.append(t)
            rec.chunk_tokens.append(n)
            rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
        usage = doc.get("usage") or usage
    rec.output_tokens = usage["completion_tokens"] if usage else sum(rec.chunk_tokens)
    rec.prompt_tokens = usage["prompt_tokens"] if usage else rec.prompt_len
    if rec.error is None and rec.status == 200:
        if rec.finish_reason == "abort":
            rec.error = "aborted by the server"
        elif not done:
            rec.error = "stream ended without [DONE]"
        elif not rec.chunk_times:
            rec.error = "no output"
