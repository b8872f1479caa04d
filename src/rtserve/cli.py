"""Command line: ``rtserve serve | models | infer | bench | generate | convert | compress | split``.

Each command's parser is built by its own function (``convert``, ``compress`` and ``split`` in
their packages' ``cli.py``); ``main`` assembles them and runs the chosen command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .client import DEFAULT_URL


def _default_repository() -> Path:
    local = Path("model_repository")
    if local.is_dir():
        return local
    from .demo.repository import ensure_demo_repository

    return ensure_demo_repository()


def cmd_serve(args) -> int:
    from .config import ServerConfig
    from .server.runner import serve

    repo = Path(args.repo or os.environ.get("RTSERVE_REPOSITORY") or _default_repository())
    if args.ray:
        os.environ["RTSERVE_RAY_ADDRESS"] = args.ray
    config = ServerConfig.from_env(
        repository=str(repo), host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
        shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level,
        protect_inference=True if args.protect_inference else None,
        allow_symlinks=True if args.allow_symlinks else None,
        **{name: getattr(args, name) for name in _SERVER_FLAGS},
    )
    print(f"rtserve: serving {repo} on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    serve(config)
    return 0


def _client(args):
    from .client import Client

    return Client(args.url, api_key=args.api_key)


def cmd_models(args) -> int:
    with _client(args) as c:
        rows = c.index()
    print(f"{'MODEL':<24} {'VERSION':<8} {'STATE':<12} REASON")
    for r in rows:
        print(f"{r['name']:<24} {r.get('version', '-'):<8} {r['state']:<12} {r.get('reason', '')}")
    return 0


def _parse_input(spec: str, meta: dict) -> tuple[str, np.ndarray]:
    if "=" not in spec:
        raise SystemExit(f"--input '{spec}': expected NAME=FILE.npy, NAME=FILE.json or NAME=<json>")
    name, value = spec.split("=", 1)
    by_name = {t["name"]: t for t in meta["inputs"]}
    if name not in by_name:
        raise SystemExit(f"--input '{name}': model '{meta['name']}' has inputs {sorted(by_name)}")
    from .tensors import v2_to_numpy

    dtype = v2_to_numpy(by_name[name]["datatype"])
    if value.endswith(".npy"):
        arr = np.load(value, allow_pickle=False)
        return name, arr.astype(dtype, copy=False)
    text = Path(value).read_text() if value.endswith(".json") else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--input '{name}': not valid JSON: {e}") from None
    return name, np.asarray(data, dtype=dtype)


def cmd_infer(args) -> int:
    from .client import ClientError

    with _client(args) as c:
        try:
            meta = c.metadata(args.model, args.version)
            inputs = dict(_parse_input(s, meta) for s in args.input)
            out = c.infer(args.model, inputs, outputs=args.output or None, version=args.version,
                          binary=not args.json_tensors)
        except ClientError as e:
            print(f"rtserve infer: {e}", file=sys.stderr)
            return 1
    printable = {k: v.tolist() if v.dtype != object else [x.decode(errors="replace") for x in v.reshape(-1)]
                 for k, v in out.items()}
    print(json.dumps(printable))
    return 0


def build_infer_body(meta: dict, batch: int, binary: bool, seed: int = 0) -> tuple[bytes, dict]:
    """A random request matching the model's metadata (-1 dims = ``batch`` for the first, 1 after)."""
    import orjson

    from .tensors import v2_to_numpy

    rng = np.random.default_rng(seed)
    items, blobs = [], []
    for t in meta["inputs"]:
        shape = [batch if (i == 0 and d == -1) else (1 if d == -1 else d) for i, d in enumerate(t["shape"])]
        dtype = v2_to_numpy(t["datatype"])
        if t["datatype"] == "BYTES":
            raise SystemExit("bench: BYTES inputs need --input files")
        arr = (rng.random(shape) if dtype.kind == "f" else rng.integers(0, 2, shape)).astype(dtype)
        item: dict = {"name": t["name"], "datatype": t["datatype"], "shape": shape}
        if binary:
            item["parameters"] = {"binary_data_size": arr.nbytes}
            blobs.append(arr.tobytes())
        else:
            item["data"] = arr.reshape(-1).tolist()
        items.append(item)
    header = orjson.dumps({"inputs": items, "parameters": {"binary_data_output": binary}})
    headers = {"content-type": "application/json"}
    if binary:
        headers["inference-header-content-length"] = str(len(header))
    return header + b"".join(blobs), headers


def cmd_bench(args) -> int:
    if args.openai:
        return cmd_bench_openai(args)
    if args.chat:
        raise SystemExit("rtserve bench: --chat needs --openai")
    from .bench.loadgen import RequestSpec, run_load_sync
    from .bench.report import format_table, write_json

    with _client(args) as c:
        meta = c.metadata(args.model, args.version)
    body, headers = build_infer_body(meta, args.batch, args.binary)
    path = f"/v2/models/{args.model}" + (f"/versions/{args.version}" if args.version else "") + "/infer"
    u = urlparse(args.url)
    spec = RequestSpec("POST", path, body, headers)
    res = run_load_sync(u.hostname or "127.0.0.1", u.port or 80, spec, concurrency=args.concurrency,
                        rate=args.rate, duration_s=args.duration, warmup_s=args.warmup)
    s = res.summary()
    row = {"model": args.model, "mode": res.mode, "load": args.concurrency or args.rate, **s}
    print(format_table([row], ["model", "mode", "load", "throughput", "p50", "p90", "p99", "max", "ok", "errors",
                               "unanswered"]))
    if args.json:
        write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "func"}, "result": s})
    return 0 if s["unanswered"] == 0 else 1


def _len_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got '{text}'") from None


def _slo(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=MS (e.g. ttft_ms=200), got '{text}'") from None


def cmd_bench_openai(args) -> int:
    """``rtserve bench MODEL --openai``: streaming load on /v1/completions (or chat), LLM metrics."""
    from .bench.openai_load import OpenAIBenchConfig, run_openai_load_sync
    from .bench.openai_report import format_summary, plot, to_json
    from .bench.report import write_json

    try:
        cfg = OpenAIBenchConfig(
            args.model, chat=args.chat, rate=args.rate, concurrency=args.concurrency,
            num_requests=args.num_requests, duration_s=None if args.num_requests else args.duration,
            input_len=args.input_len, output_len=args.output_len, prompts_file=args.prompts_file,
            vocab_size=args.vocab_size, temperature=args.temperature, seed=args.seed, slos=dict(args.slo or ()),
            warmup_requests=args.warmup_requests, timeout_s=args.timeout, api_key=args.api_key)
    except (ValueError, OSError) as e:
        print(f"rtserve bench: {e}", file=sys.stderr)
        return 2
    u = urlparse(args.url)
    result = run_openai_load_sync(u.hostname or "127.0.0.1", u.port or 80, cfg)
    summary = result.summary()
    load = f"{cfg.rate:g} req/s Poisson" if cfg.rate else f"concurrency {cfg.concurrency}"
    print(f"{cfg.model} {cfg.path}, {load}")
    print(format_summary(summary))
    if args.json:
        write_json(args.json, to_json(result))
    if args.plot:
        plot(result, args.plot)
    return 0 if summary["failed"] == 0 else 1


def cmd_generate(args) -> int:
    import asyncio

    from .llm.async_engine import AsyncLLM
    from .llm.engine import LLM
    from .llm.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
        llm = LLM(args.model_dir, dtype=args.dtype, device=args.device, num_blocks=args.num_blocks)
    except ValueError as e:
        print(f"rtserve generate: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt
    if args.chat:
        if llm.tokenizer is None:
            print("rtserve generate: --chat needs a tokenizer", file=sys.stderr)
            return 2
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    engine = AsyncLLM(llm)

    async def run() -> str | None:
        reason = None
        async for d in engine.generate(prompt, params):
            sys.stdout.write(d.text)
            sys.stdout.flush()
            reason = d.finish_reason or reason
        return reason

    try:
        reason = asyncio.run(run())
    except ValueError as e:
        print(f"rtserve generate: {e}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    print(f"\n[finish: {reason}]", file=sys.stderr)
    return 0


def _client_args(sp) -> None:
    sp.add_argument("--url", default=os.environ.get("RTSERVE_URL", DEFAULT_URL))
    sp.add_argument("--api-key", default=None, help="default: RTSERVE_API_KEY")


# ServerConfig fields whose flag (--field-name), environment variable (RTSERVE_FIELD_NAME) and
# default all come from the field: (type, metavar, help)
_SERVER_FLAGS = {
    "timeout_keep_alive": (float, "SECONDS", "close a keep-alive connection idle this long"),
    "timeout_header": (float, "SECONDS", "close a connection whose request line and headers take longer"),
    "limit_concurrency": (int, "N", "answer 503 while N connections (this one included) are open or N "
                                    "requests are in progress"),
}


def _server_flags(s) -> None:
    from dataclasses import fields

    from .config import ServerConfig

    defaults = {f.name: f.default for f in fields(ServerConfig)}
    for name, (kind, metavar, text) in _SERVER_FLAGS.items():
        default = "no limit" if defaults[name] is None else defaults[name]
        s.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, metavar=metavar,
                       help=f"{text} (default {default}; RTSERVE_{name.upper()})")


def _add_serve_parsers(sub) -> None:
    """serve, models, infer."""
    s = sub.add_parser("serve", help="serve a model repository over HTTP (KServe v2)")
    s.add_argument("--repo", help="model repository (default: $RTSERVE_REPOSITORY, ./model_repository, else the built-in demo)")
    s.add_argument("--host", default=None, help="default 127.0.0.1 (RTSERVE_HOST)")
    s.add_argument("--port", type=int, default=None, help="default 8000 (RTSERVE_PORT)")
    s.add_argument("--max-body-bytes", type=int, default=None)
    s.add_argument("--shutdown-timeout", type=float, default=None, help="seconds to finish in-flight work")
    s.add_argument("--protect-inference", action="store_true", help="inference needs the API key too")
    s.add_argument("--log-level", default=None)
    s.add_argument("--allow-symlinks", action="store_true",
                   help="serve model files that are symlinks to places outside the repository "
                        "(RTSERVE_ALLOW_SYMLINKS); by default they are refused")
    _server_flags(s)
    s.add_argument("--ray", metavar="local|auto|ADDRESS", default=None,
                   help="the Ray cluster for models with executor: ray (default: local)")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list the repository's models and their state")
    _client_args(m)
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("infer", help="send one inference request")
    i.add_argument("model")
    i.add_argument("--input", action="append", required=True, metavar="NAME=FILE.npy|FILE.json|JSON")
    i.add_argument("--output", action="append", metavar="NAME")
    i.add_argument("--version")
    i.add_argument("--json-tensors", action="store_true", help="send JSON tensors instead of binary")
    _client_args(i)
    i.set_defaults(func=cmd_infer)


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="load-test a model: closed loop (--concurrency) or Poisson (--rate)")
    b.add_argument("model")
    mode = b.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int)
    mode.add_argument("--rate", type=float, help="requests per second, Poisson arrivals")
    b.add_argument("--duration", type=float, default=10.0)
    b.add_argument("--warmup", type=float, default=1.0)
    b.add_argument("--batch", type=int, default=1, help="items per request")
    b.add_argument("--binary", action="store_true", help="binary tensors instead of JSON")
    b.add_argument("--version")
    b.add_argument("--json", help="write the results as JSON here")
    o = b.add_argument_group("OpenAI mode (--openai): streaming /v1/completions or /v1/chat/completions")
    o.add_argument("--openai", action="store_true", help="load the OpenAI API; MODEL is the served LLM")
    o.add_argument("--chat", action="store_true", help="/v1/chat/completions (text prompts)")
    o.add_argument("--num-requests", type=int, help="stop after N requests (default: after --duration)")
    o.add_argument("--input-len", "--input-len-range", dest="input_len", type=_len_range, default=(32, 32),
                   metavar="N|MIN:MAX", help="random prompt length, uniform (tokens; words with --chat)")
    o.add_argument("--output-len", "--output-len-range", dest="output_len", type=_len_range, default=(128, 128),
                   metavar="N|MIN:MAX", help="max_tokens with ignore_eos, uniform")
    o.add_argument("--prompts-file", help="one prompt per line, or JSONL with 'prompt' fields")
    o.add_argument("--vocab-size", type=int, default=256, help="random token ids are drawn below this")
    o.add_argument("--temperature", type=float, default=0.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--slo", type=_slo, action="append", metavar="KEY=MS",
                   help="goodput bound, repeatable: ttft_ms, tpot_ms, e2e_ms")
    o.add_argument("--warmup-requests", type=int, default=2, help="unmeasured requests sent first")
    o.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    o.add_argument("--plot", metavar="PATH.png", help="CDFs of TTFT/TPOT/ITL and latency over time")
    _client_args(b)
    b.set_defaults(func=cmd_bench)


def _add_generate_parser(sub) -> None:
    from .llm.engine_config import DTYPES

    g = sub.add_parser("generate", help="generate text offline with a Hugging Face decoder folder, streaming")
    g.add_argument("model_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--device", default="cpu")
    g.add_argument("--num-blocks", type=int, default=512)
    g.set_defaults(func=cmd_generate)


def main(argv: list[str] | None = None) -> int:
    from .compress.cli import add_compress_parser
    from .export.cli import add_convert_parser
    from .split.cli import add_split_parser

    p = argparse.ArgumentParser(prog="rtserve", description="Real-time inference serving")
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve_parsers(sub)
    _add_bench_parser(sub)
    _add_generate_parser(sub)
    add_convert_parser(sub)
    add_compress_parser(sub)
    add_split_parser(sub)
    args = p.parse_args(argv)
    if getattr(args, "api_key", None) is None and hasattr(args, "api_key"):
        args.api_key = os.environ.get("RTSERVE_API_KEY")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
