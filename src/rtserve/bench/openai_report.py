"""The report of an OpenAI-mode bench run (``openai_load``): per-request records -> latency
percentiles, token throughputs and goodput under SLOs; a printed table, JSON and a plot."""
from __future__ import annotations

import math
from pathlib import Path

from .openai_load import OpenAIBenchResult
from .openai_stream import RequestRecord
from .report import format_table, percentile


def _stats_ms(values_s: list[float]) -> dict:
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms) if ms else math.nan, "p50": percentile(ms, 50),
            "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """A successful request within every bound (TPOT is met by a one-token answer, which has none)."""
    if not rec.ok:
        return False
    got = {"ttft_ms": rec.ttft * 1000.0, "e2e_ms": rec.e2e * 1000.0,
           "tpot_ms": rec.tpot * 1000.0 if rec.tpot is not None else 0.0}
    return all(got[k] <= bound for k, bound in slos.items())


REFUSED = (429, 503)  # a server shedding load: answered at once, with Retry-After


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float]) -> dict:
    """Counts, throughputs (per second of ``duration_s``, successful requests only), latency stats
    in ms and goodput: requests/s within every SLO, and their fraction of all requests. Also the
    answers by HTTP status ("0": none came) and the requests refused (429/503) with the latency
    of their refusal."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    refused = [r for r in records if r.status in REFUSED and r.t_end is not None]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    good = sum(meets_slos(r, slos) for r in ok)
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "errors": errors, "duration_s": duration_s,
        "request_throughput": per_s(len(ok)), "output_token_throughput": per_s(out_tok),
        "total_token_throughput": per_s(out_tok + in_tok), "prompt_tokens": in_tok, "output_tokens": out_tok,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([g for r in ok for g in r.itls]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
        "goodput": {"slos": dict(slos), "requests_per_s": per_s(good),
                    "fraction": good / len(records) if records else math.nan},
        "status_counts": dict(sorted(statuses.items())),
        "refused": {"count": len(refused), "latency_ms": _stats_ms([r.e2e for r in refused])},
    }


def format_summary(s: dict) -> str:
    lines = [f"requests   {s['completed']} completed, {s['failed']} failed in {s['duration_s']:.1f} s",
             f"throughput {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
             f"{s['total_token_throughput']:.1f} total tok/s"]
    g = s["goodput"]
    if g["slos"]:
        bounds = ", ".join(f"{k}<={v:g}" for k, v in g["slos"].items())
        lines.append(f"goodput    {g['requests_per_s']:.2f} req/s within {bounds} ({g['fraction']:.1%} of requests)")
    for err, n in s["errors"].items():
        lines.append(f"error      {n} x {err}")
    ref = s.get("refused")
    if ref and ref["count"]:
        lat = ref["latency_ms"]
        lines.append(f"refused    {ref['count']} (HTTP 429/503), answered in p50 {lat['p50']:.1f} ms, "
                     f"p99 {lat['p99']:.1f} ms")
    rows = [{"metric": m, **s[m]} for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")]
    return "\n".join(lines) + "\n" + format_table(rows, ["metric", "mean", "p50", "p90", "p99"])


def to_json(result: OpenAIBenchResult) -> dict:
    """Summary and every request (times in seconds from the start of the run)."""
    t0 = result.t0
    reqs = [{"index": r.index, "ok": r.ok, "error": r.error, "status": r.status, "max_tokens": r.max_tokens,
             "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "finish_reason": r.finish_reason,
             "start_s": r.t_start - t0, "end_s": r.t_end - t0 if r.t_end is not None else None,
             "chunk_times_s": [round(t - t0, 6) for t in r.chunk_times], "chunk_tokens": r.chunk_tokens}
            for r in result.records]
    cfg = {k: v for k, v in vars(result.config).items() if k != "api_key"}
    return {"config": cfg, "summary": result.summary(), "connections": result.connections,
            "reconnects": result.reconnects, "late_arrivals": result.late_arrivals, "requests": reqs}


def plot(result: OpenAIBenchResult, path: str) -> None:
    """CDFs of TTFT, TPOT and ITL, and TTFT/E2E against arrival time (matplotlib, the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    series = {"TTFT": [r.ttft for r in ok], "TPOT": [r.tpot for r in ok if r.tpot is not None],
              "ITL": [g for r in ok for g in r.itls]}
    for ax, (name, vals) in zip(axes.flat, series.items()):
        v = sorted(x * 1000.0 for x in vals)
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))])
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction of " + ("gaps" if name == "ITL" else "requests"))
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    starts = [r.t_start - result.t0 for r in ok]
    ax.scatter(starts, [r.e2e * 1000.0 for r in ok], s=6, label="E2E")
    ax.scatter(starts, [r.ttft * 1000.0 for r in ok], s=6, label="TTFT")
    ax.set(title="latency over the run", xlabel="arrival (s)", ylabel="ms")
    ax.legend()
    ax.grid(alpha=0.3)
    c = result.config
    load = f"{c.rate:g} req/s Poisson" if c.rate else f"concurrency {c.concurrency}"
    fig.suptitle(f"{c.model} {c.path}, {load}, {len(ok)} requests")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
