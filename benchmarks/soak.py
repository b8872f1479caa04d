"""Soak test: mixed load on ``rtserve serve`` with the built-in demo repository for ``--minutes``
(30 by default), on loopback.

Client threads, each a closed loop with its own keep-alive connection:

- ``digits_json``: KServe v2 JSON inference on ``digits`` (batch 1-8 of real test images);
- ``digits_binary``: the same with Triton's binary tensors, both ways;
- ``lm_stream``: streaming ``/v1/completions`` on ``demo-lm`` (read to ``[DONE]``);
- ``embeddings``: ``/v1/embeddings`` on ``minilm`` (1-4 sentences; when the repository has it);
- ``reload``: ``POST /v2/repository/models/digits/load`` every ``--reload-every-s``.

Every 10 s the resident memory (VmRSS) of the server process and its descendants is read from /proc.
Reported: RSS growth from minute 5 (or 1/6 of the run, when shorter than 30 minutes) to the end
(target: under 5 %), requests by kind and outcome, latency percentiles, and whether every request was
answered: a client timeout (``--timeout-s``) or a broken connection counts as unanswered. Prints a
table and writes JSON (``--out``, default ``benchmarks/results/soak.json``). Exit status 1 when a
request went unanswered, a server error (5xx) came back, or RSS grew by 5 % or more.

    python benchmarks/soak.py [--minutes 30] [--reload-every-s 180] [--home DIR]
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.report import format_table, percentile, write_json  # noqa: E402

RSS_TARGET_PCT = 5.0
SAMPLE_EVERY_S = 10.0
SENTENCES = ["A list is a mutable sequence.", "The while loop repeats its suite.",
             "A dictionary maps keys to values.", "The weather is sunny today."]
PROMPTS = ["The for statement is used to", "A list is", "The import statement", "Exceptions are"]


@dataclass
class Tally:
    """Outcomes and latencies of one kind of request (appended to by one thread only)."""

    outcomes: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)

    def row(self, kind: str) -> dict:
        n = sum(self.outcomes.values())
        unanswered = sum(v for k, v in self.outcomes.items() if k in ("timeout", "no_answer"))
        return {"kind": kind, "requests": n, "ok": self.outcomes["ok"], "not_ok": n - self.outcomes["ok"],
                "unanswered": unanswered, "p50_ms": percentile(self.latencies_s, 50) * 1e3,
                "p99_ms": percentile(self.latencies_s, 99) * 1e3, "outcomes": dict(sorted(self.outcomes.items()))}


# -- the server and its memory -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port),
                                 "--log-level", "warning"], stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready within 180 s")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB (0 for processes gone meanwhile)."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


# -- clients ---------------------------------------------------------------------------------------------
def _outcome(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, (httpx.TransportError, httpx.RemoteProtocolError)):
        return "no_answer"
    return f"error_{type(exc).__name__}"


def infer_json(c: httpx.Client, x: np.ndarray) -> str:
    r = c.post("/v2/models/digits/infer", content=orjson.dumps({"inputs": [
        {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}),
        headers={"content-type": "application/json"})
    if r.status_code != 200:
        return f"http_{r.status_code}"
    outs = {o["name"]: o for o in r.json()["outputs"]}
    return "ok" if len(outs["label"]["data"]) == len(x) else "bad_answer"


def infer_binary(c: httpx.Client, x: np.ndarray) -> str:
    blob = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    header = orjson.dumps({
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    r = c.post("/v2/models/digits/infer", content=header + blob, headers={
        "content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})
    if r.status_code != 200:
        return f"http_{r.status_code}"
    n = int(r.headers.get("inference-header-content-length", -1))
    outs = orjson.loads(r.content[:n])["outputs"] if n > 0 else []
    ok = len(outs) == 1 and len(r.content) - n == outs[0]["parameters"]["binary_data_size"] == len(x) * 10 * 4
    return "ok" if ok else "bad_answer"


def lm_stream(c: httpx.Client, prompt: str, max_tokens: int) -> str:
    body = {"model": "demo-lm", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
    chunks, done = 0, False
    with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return f"http_{r.status_code}"
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks += 1
    return "ok" if done and chunks else "bad_answer"


def embeddings(c: httpx.Client, texts: list[str]) -> str:
    r = c.post("/v1/embeddings", json={"model": "minilm", "input": texts})
    if r.status_code != 200:
        return f"http_{r.status_code}"
    data = r.json()["data"]
    return "ok" if len(data) == len(texts) and len(data[0]["embedding"]) == 384 else "bad_answer"


def reload_digits(c: httpx.Client) -> str:
    r = c.post("/v2/repository/models/digits/load")
    return "ok" if r.status_code == 200 else f"http_{r.status_code}"


class Soak:
    def __init__(self, url: str, pid: int, args, images: np.ndarray, with_minilm: bool) -> None:
        self.url, self.pid, self.args, self.images = url, pid, args, images
        self.stop = threading.Event()
        self.tallies: dict[str, Tally] = {}
        self.rss: list[tuple[float, int]] = []
        self.with_minilm = with_minilm

    def _loop(self, kind: str, make, pause_s: float, seed: int, first_after_s: float = 0.0) -> None:
        """One client: ``make(client, rng)`` -> outcome, back to back (or every ``pause_s``) until stopped."""
        tally = self.tallies.setdefault(kind, Tally())
        rng = random.Random(seed)
        if self.stop.wait(first_after_s):
            return
        with httpx.Client(base_url=self.url, timeout=self.args.timeout_s) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    outcome = make(c, rng)
                except Exception as e:  # noqa: BLE001 - every failure is an outcome to count
                    outcome = _outcome(e)
                tally.outcomes[outcome] += 1
                tally.latencies_s.append(time.perf_counter() - t0)
                self.stop.wait(pause_s)

    def _batch(self, rng: random.Random) -> np.ndarray:
        i, n = rng.randrange(len(self.images) - 8), rng.randint(1, 8)
        return self.images[i:i + n]

    def clients(self) -> list[threading.Thread]:
        a = self.args
        loops = [
            ("digits_json", lambda c, r: infer_json(c, self._batch(r)), a.think_s),
            ("digits_json", lambda c, r: infer_json(c, self._batch(r)), a.think_s),
            ("digits_binary", lambda c, r: infer_binary(c, self._batch(r)), a.think_s),
            ("lm_stream", lambda c, r: lm_stream(c, r.choice(PROMPTS), r.randint(8, 32)), a.think_s),
            ("reload", lambda c, r: reload_digits(c), a.reload_every_s),
        ]
        if self.with_minilm:
            loops.append(("embeddings", lambda c, r: embeddings(c, r.sample(SENTENCES, r.randint(1, 4))), a.think_s))
        threads = []
        for i, (kind, make, pause) in enumerate(loops):
            first = a.reload_every_s if kind == "reload" else 0.0  # the first reload after one period
            threads.append(threading.Thread(target=self._loop, args=(kind, make, pause, i, first),
                                            name=f"{kind}-{i}", daemon=True))
        return threads

    def run(self) -> float:
        threads = self.clients()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        end = t0 + self.args.minutes * 60
        while True:
            self.rss.append((time.monotonic() - t0, rss_kb(self.pid)))
            if time.monotonic() >= end:
                break
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, end - time.monotonic())))
        self.stop.set()
        for t in threads:
            t.join(self.args.timeout_s + 5)
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            raise RuntimeError(f"client threads still waiting after the run: {hung}")
        return time.monotonic() - t0


# -- report ----------------------------------------------------------------------------------------------
def rss_summary(samples: list[tuple[float, int]], duration_s: float) -> dict:
    warm_s = min(300.0, duration_s / 6)
    base = next(((t, v) for t, v in samples if t >= warm_s), samples[-1])
    end = samples[-1]
    growth = (end[1] - base[1]) / base[1] * 100 if base[1] else float("nan")
    return {"from_s": round(base[0], 1), "to_s": round(end[0], 1), "baseline_kb": base[1], "end_kb": end[1],
            "max_kb": max(v for _, v in samples), "growth_pct": round(growth, 2), "target_pct": RSS_TARGET_PCT,
            "within_target": growth < RSS_TARGET_PCT, "samples": [[round(t, 1), v] for t, v in samples]}


def report(soak: Soak, duration_s: float, args) -> dict:
    rows = [t.row(k) for k, t in sorted(soak.tallies.items())]
    rss = rss_summary(soak.rss, duration_s)
    unanswered = sum(r["unanswered"] for r in rows)
    server_errors = sum(v for r in rows for k, v in r["outcomes"].items() if k.startswith("http_5"))
    print(format_table(rows, ["kind", "requests", "ok", "not_ok", "unanswered", "p50_ms", "p99_ms", "outcomes"]))
    print(f"\nRSS (server and children): {rss['baseline_kb'] / 1024:.1f} MiB at {rss['from_s']:.0f} s -> "
          f"{rss['end_kb'] / 1024:.1f} MiB at {rss['to_s']:.0f} s: {rss['growth_pct']:+.2f} % "
          f"(target < {RSS_TARGET_PCT:.0f} %); max {rss['max_kb'] / 1024:.1f} MiB")
    print(f"every request answered: {unanswered == 0} ({unanswered} unanswered); server errors: {server_errors}")
    return {"minutes": args.minutes, "duration_s": round(duration_s, 1), "reload_every_s": args.reload_every_s,
            "timeout_s": args.timeout_s, "kinds": rows, "rss": rss, "unanswered": unanswered,
            "server_errors": server_errors, "all_answered": unanswered == 0,
            "passed": unanswered == 0 and server_errors == 0 and rss["within_target"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--reload-every-s", type=float, default=180.0)
    ap.add_argument("--timeout-s", type=float, default=30.0, help="a request not answered within this hung")
    ap.add_argument("--think-s", type=float, default=0.02, help="pause between a client's requests")
    ap.add_argument("--home", help="where the demo repository is built (default: $RTSERVE_HOME or ~/.cache/rtserve)")
    ap.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    args = ap.parse_args()

    from rtserve.demo import digits_data, ensure_demo_repository

    repo = ensure_demo_repository(Path(args.home) if args.home else None)
    images = digits_data()[2]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start_server(repo, port, log)
        try:
            soak = Soak(f"http://127.0.0.1:{port}", proc.pid, args, images, (repo / "minilm").is_dir())
            duration = soak.run()
            alive = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        result = report(soak, duration, args)
        result["server_alive_at_end"] = alive
        result["passed"] = result["passed"] and alive
        if not result["passed"]:
            print(f"server log (tail):\n{log.read_text(errors='replace')[-3000:]}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
