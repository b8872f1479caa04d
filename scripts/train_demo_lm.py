"""Train the tiny demo language model that ships in ``src/rtserve/demo/data/demo-lm``.

Run once by hand (about ten minutes on two CPU cores); the result is committed, so nothing is
trained when the server starts. The corpus is text that ships with Python itself: the help topics
of ``pydoc_data`` (the language reference as ``help()`` shows it) and the docstrings of common
standard-library modules, so the model's output is recognisably English about Python.

    .venv/bin/python scripts/train_demo_lm.py [--steps 900] [--out src/rtserve/demo/data/demo-lm]

The model is a Llama-architecture decoder (tied embeddings, grouped-query attention) trained with
``transformers`` (a test/dev dependency) and saved with ``save_pretrained`` in bfloat16; the
tokenizer is a byte-level BPE trained with ``tokenizers`` on the same corpus.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import time
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MODULES = ["builtins", "collections", "itertools", "functools", "os", "os.path", "json", "re", "pathlib", "string",
           "textwrap", "datetime", "random", "math", "statistics", "heapq", "bisect", "shutil", "subprocess", "io",
           "logging", "argparse", "dataclasses", "enum", "typing", "contextlib", "threading", "queue", "asyncio",
           "socket", "urllib.parse", "csv", "sqlite3", "zipfile", "tempfile", "time", "calendar", "decimal",
           "fractions", "unittest", "difflib", "pprint", "copy", "operator", "abc", "inspect", "hashlib", "base64"]


def corpus() -> list[str]:
    """Documents: every pydoc topic, and each module's docstring plus its public members' docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    for name in MODULES:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 80:
                parts.append(f"{name}.{attr}\n\n{doc}")
        docs.append("\n\n".join(p for p in parts if p))
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/rtserve/demo/data/demo-lm"))
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    docs = corpus()
    tok = train_tokenizer(docs, args.vocab)
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
        ids.append(eos)
    data = torch.tensor(ids, dtype=torch.long)
    n_val = len(data) // 50
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters, {len(data):,} tokens")

    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, rope_theta=10000.0)
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)

    def batch(src):
        starts = torch.randint(0, len(src) - args.seq - 1, (args.batch,), generator=g)
        return torch.stack([src[s:s + args.seq] for s in starts.tolist()])

    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        lr = 3e-3 * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch(train)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                vx = torch.stack([val[i:i + args.seq] for i in range(0, len(val) - args.seq - 1, args.seq)][:32])
                vloss = model(input_ids=vx, labels=vx).loss.item()
            model.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  val {vloss:.3f}  {time.perf_counter() - t0:6.0f} s",
                  flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": 1024, "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False}, indent=2) + "\n")
    (out / "TRAINING.json").write_text(json.dumps({
        "script": "scripts/train_demo_lm.py", "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "tokens_in_corpus": len(data), "parameters": n_params, "final_val_loss": round(vloss, 4),
        "seconds": round(time.perf_counter() - t0), "python": __import__("sys").version.split()[0]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
