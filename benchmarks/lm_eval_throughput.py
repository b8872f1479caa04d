"""lm-evaluation-harness throughput: a multiple-choice task scored through `rtserve serve`
(``--model local-completions``: echo, logprobs=1, several prompts per request) against
``--model hf`` in process, on the ~34M Llama of benchmarks/llm_cpu.py (random weights, float32),
side by side, in ``--rounds`` alternating rounds (the best of each side); documents/s = documents / wall time of ``lm_eval.simple_evaluate`` (lm-eval's own
work included on both sides).

The random checkpoint gets a word-level tokenizer over its whole 32000-token vocabulary; the script
writes the documents (a 24-word question, 4 choices of 1 to 3 words each; 4 loglikelihood requests
per document). A second table measures what scoring costs the engine itself, on the same prompts in
lm-eval's order (longest first, then by tokens) and batches of the same size: with
``prompt_logprobs`` (the head and a log_softmax at every position) with the prefix cache on (a
question's blocks, with their scores, serve its other choices) and off, and without (max_tokens 1:
the last position only).

    python benchmarks/lm_eval_throughput.py [--docs 1000] [--batch-size 16] [--rounds 2] [--num-concurrent 1] [--out benchmarks/results/lm_eval_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from llm_cpu import build  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402

TASK = """task: bench_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {path}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_checkpoint(path: Path) -> int:
    """The 34M Llama and a word-level tokenizer ("<s>", "</s>", "<unk>", then w3 .. w31999)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    _, n_params = build(path)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return n_params


def write_task(root: Path, docs: int) -> Path:
    rng = random.Random(0)
    word = lambda: f"w{rng.randrange(3, 32000)}"  # noqa: E731
    lines = []
    for _ in range(docs):
        choices = [" ".join(word() for _ in range(rng.randint(1, 3))) for _ in range(4)]
        lines.append(json.dumps({"question": " ".join(word() for _ in range(24)), "choices": choices,
                                 "answer": rng.randrange(4)}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bench_mc.yaml").write_text(TASK.format(path=root / "docs.jsonl"))
    return tasks


def evaluate(model, model_args: dict | None, tasks: Path, batch_size: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["bench_mc"], batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    return out, time.perf_counter() - t0


def hf_lm(ckpt: Path, batch_size: int):
    """``--model hf``, loaded before any clock starts (the server is started before it too)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=batch_size)


def serve(repo: Path, port: int, threads: int):
    proc = subprocess.Popen([sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port),
                             "--log-level", "warning"], env={**os.environ, "PYTHONPATH": str(HERE.parent / "src"),
                                                             "OMP_NUM_THREADS": str(threads)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def prompts_of(ckpt: Path, samples: list) -> list[list[int]]:
    """The token ids lm-eval sent for each (context, continuation), in document order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)

    def pairs(args):  # lm-eval logs (context, continuation) as a list of pairs or {"gen_args_i": {"arg_0", "arg_1"}}
        return [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else args

    return [tok(c + x).input_ids for s in sorted(samples, key=lambda s: s["doc_id"]) for c, x in pairs(s["arguments"])]


def engine_cost(ckpt: Path, prompts: list[list[int]], batch: int) -> dict:
    """The same prompts through the engine in lm-eval's order and batches of ``batch``: scored
    (as the server scores echo with logprobs: no ranks) with the prefix cache on and off, and the
    last position only."""
    from rtserve.llm.engine import LLM
    from rtserve.llm.sampling_params import SamplingParams

    prompts = sorted(prompts, key=lambda t: (-len(t), tuple(t)))  # lm-eval's Collator order
    scored = SamplingParams(max_tokens=0, prompt_logprobs=1, prompt_ranks=False)
    rows = {}
    for name, params, cache in (("prompt_logprobs=1, prefix cache on", scored, True),
                                ("prompt_logprobs=1, prefix cache off", scored, False),
                                ("max_tokens=1: last position, prefix cache on",
                                 SamplingParams(max_tokens=1, temperature=0), True)):
        llm = LLM(ckpt, num_blocks=4096, block_size=16, enable_prefix_caching=cache)
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            llm.generate(prompts[i:i + batch], params)
        rows[name] = (time.perf_counter() - t0, llm.scheduler.bm.num_prefix_hits)
    return rows


def engine_only(args) -> int:
    """The engine table alone, in a fresh process, on the prompts lm-eval would send."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root)
        tasks = write_task(root, args.docs)  # noqa: F841 - writes docs.jsonl
        tok = AutoTokenizer.from_pretrained(root)
        docs = [json.loads(line) for line in (root / "docs.jsonl").read_text().splitlines()]
        prompts = [tok(d["question"] + " " + c).input_ids for d in docs for c in d["choices"]]
        cache = engine_cost(root, prompts, args.batch_size)
    rows = [{"engine, 4 requests/doc": k, "docs_s": args.docs / t, "wall_s": t, "prefix_hit_blocks": h}
            for k, (t, h) in cache.items()]
    print(f"torch threads {torch.get_num_threads()}")
    print(format_table(rows, list(rows[0])))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16, help="requests per lm-eval batch (prompts per HTTP request)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-concurrent", type=int, default=1,
                    help="lm-eval's num_concurrent: requests in flight to the server at once")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times; best of each")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--out", default=str(HERE / "results" / "lm_eval_throughput.json"))
    ap.add_argument("--engine-only", action="store_true", help="only the engine table (no lm-eval, no server)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine_only:
        return engine_only(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / "repo" / "lm" / "1"
        ckpt.mkdir(parents=True)
        n_params = write_checkpoint(ckpt)
        (root / "repo" / "lm" / "model.yaml").write_text(
            "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 4096\n  block_size: 16\n  max_num_seqs: 64\n")
        tasks = write_task(root, args.docs)
        proc = serve(root / "repo", args.port, args.threads)
        hf_model = hf_lm(ckpt, args.batch_size)
        t_served = t_hf = float("inf")
        try:  # interleaved rounds, best of each side: the machine is shared and noisy
            for _ in range(args.rounds):
                served, t = evaluate("local-completions", {
                    "base_url": f"http://127.0.0.1:{args.port}/v1/completions", "model": "lm",
                    "tokenizer_backend": "huggingface", "tokenizer": str(ckpt), "add_bos_token": True,
                    "max_length": 2048, "num_concurrent": args.num_concurrent, "max_retries": 1}, tasks,
                    args.batch_size)
                t_served = min(t_served, t)
                hf, t = evaluate(hf_model, None, tasks, args.batch_size)
                t_hf = min(t_hf, t)
                print(f"round: served {args.docs / t_served:.2f} docs/s, hf {args.docs / t_hf:.2f} docs/s "
                      "(best so far)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        ll = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in served["samples"]["bench_mc"]}
        ref = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in hf["samples"]["bench_mc"]}
        max_diff = max(abs(a - b) for d in ll for a, b in zip(ll[d], ref[d]))
        cache = engine_cost(ckpt, prompts_of(ckpt, served["samples"]["bench_mc"]), args.batch_size)
    rows = [{"model": "rtserve serve (local-completions)", "docs_s": args.docs / t_served,
             "acc": served["results"]["bench_mc"]["acc,none"], "wall_s": t_served},
            {"model": "transformers in process (hf)", "docs_s": args.docs / t_hf,
             "acc": hf["results"]["bench_mc"]["acc,none"], "wall_s": t_hf}]
    engine_rows = [{"engine, 4 requests/doc": k, "docs_s": args.docs / t, "wall_s": t, "prefix_hit_blocks": h}
                   for k, (t, h) in cache.items()]
    print(f"\n{args.docs} multiple-choice documents (4 choices), Llama {n_params / 1e6:.1f}M float32, "
          f"{args.threads} threads, lm-eval batch size {args.batch_size}, num_concurrent {args.num_concurrent}")
    print(format_table(rows, list(rows[0])))
    print(f"max |loglikelihood difference| per choice, server vs hf: {max_diff:.2e}; "
          f"ratio rtserve/hf: {rows[0]['docs_s'] / rows[1]['docs_s']:.2f}")
    print(format_table(engine_rows, list(engine_rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "params": n_params, "docs": args.docs,
                          "threads": args.threads, "batch_size": args.batch_size, "rows": rows,
                          "max_loglikelihood_diff": max_diff, "prefix_cache": engine_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
