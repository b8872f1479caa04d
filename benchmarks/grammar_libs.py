"""Grammar libraries for structured outputs, side by side on this machine: llguidance and xgrammar.

For each tokenizer (the 320-token byte-level BPE of the tests, and a 32k byte-level BPE trained here
on the Python sources of the running interpreter: nothing downloaded) and each JSON schema: the
tokenizer setup time, the schema's compile time (no cache; median of ``--repeats``), and the time to
compute one token's mask while walking a valid answer token by token (mean over the walk, best of
``--repeats`` walks). JSON without free whitespace in both (llguidance ``whitespace_flexible: false``,
xgrammar ``any_whitespace=False``). Also: each library's import time in a fresh interpreter and the
packages it requires.

    python benchmarks/grammar_libs.py [--repeats 3] [--out benchmarks/results/grammar_libs.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import requires
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))

from rtserve.bench.report import format_table, write_json  # noqa: E402

SCHEMAS = {
    "person": ({"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
                "properties": {"name": {"type": "string", "maxLength": 8},
                               "age": {"type": "integer", "minimum": 0, "maximum": 99},
                               "role": {"enum": ["admin", "user", "guest"]}}},
               {"name": "Ada", "age": 36, "role": "admin"}),
    "order": ({"type": "object", "additionalProperties": False, "required": ["id", "items", "note"],
               "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                              "items": {"type": "array", "maxItems": 4, "items": {
                                  "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                                  "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}},
                              "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 40}]}}},
              {"id": 42, "items": [{"sku": "ABC-123", "qty": 2}, {"sku": "XYZ-999", "qty": 10}],
               "note": "leave it at the door"}),
}


def _wide_schema():
    props, value = {}, {}
    for i in range(24):
        kind = ("string", "integer", "boolean", "enum")[i % 4]
        name = f"field_{i}"
        if kind == "string":
            props[name], value[name] = {"type": "string", "maxLength": 32}, f"value number {i}"
        elif kind == "integer":
            props[name], value[name] = {"type": "integer", "minimum": 0, "maximum": 100000}, i * 37
        elif kind == "boolean":
            props[name], value[name] = {"type": "boolean"}, i % 3 == 0
        else:
            props[name], value[name] = {"enum": ["red", "green", "blue", "cyan"]}, "green"
    return ({"type": "object", "additionalProperties": False, "required": list(props), "properties": props}, value)


SCHEMAS["wide24"] = _wide_schema()


def bpe_tokenizer(path: Path, vocab_size: int) -> Path:
    """A byte-level BPE ``tokenizer.json`` (``<s>`` = 0, ``</s>`` = 1) of ``vocab_size`` tokens, trained
    on this interpreter's own Python sources (deterministic: sorted files, the first 8 MB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def corpus(limit=8_000_000):
        n = 0
        for f in sorted(glob.glob(sys.prefix + "/lib/python3*/**/*.py", recursive=True)):
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield text
            n += len(text)
            if n > limit:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def text_lm_tokenizer(path: Path) -> Path:
    """The 320-token tokenizer of tests/models.py's ``write_text_lm`` (its training, no weights)."""
    from models import LM_TEXT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LM_TEXT, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: Path) -> None:
        import llguidance as llg

        self.llg = llg
        self.tok = llg.LLTokenizer(tokenizer_json.read_text(), eos_token=[1])
        self.mask = torch.zeros((self.tok.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        g = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def walk(self, compiled, tokens: list[int]) -> float:
        m = compiled.deep_copy()
        t = 0.0
        for tok in tokens:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
            t += time.perf_counter() - t0
            assert m.consume_token(tok), m.get_error()
        return t / len(tokens)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: Path) -> None:
        import transformers
        import xgrammar as xgr

        self.xgr = xgr
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="</s>")
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=hf.vocab_size, stop_token_ids=[1])
        self.mask = xgr.allocate_token_bitmask(1, self.info.vocab_size)

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False, max_threads=1)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def walk(self, compiled, tokens: list[int]) -> float:
        m = self.xgr.GrammarMatcher(compiled)
        t = 0.0
        for tok in tokens:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(self.mask)
            t += time.perf_counter() - t0
            assert m.accept_token(tok)
        return t / len(tokens)


def cpu_name() -> str:
    """The CPU model (``lscpu``'s "Model name") and the cores this process may use."""
    import os

    name = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def measure(lib_cls, tokenizer_json: Path, vocab: str, repeats: int) -> list[dict]:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_json))
    t0 = time.perf_counter()
    lib = lib_cls(tokenizer_json)
    setup_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for name, (schema, example) in SCHEMAS.items():
        compile_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compiled = lib.compile(schema)
            compile_s.append(time.perf_counter() - t0)
        tokens = hf.encode(json.dumps(example, separators=(",", ":")), add_special_tokens=False).ids
        mask_s = min(lib.walk(compiled, tokens) for _ in range(repeats))
        rows.append({"library": lib.name, "tokenizer": vocab, "schema": name, "tokenizer_setup_ms": round(setup_ms, 1),
                     "compile_ms": round(statistics.median(compile_s) * 1e3, 2), "tokens": len(tokens),
                     "mask_us_per_token": round(mask_s * 1e6, 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "grammar_libs.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {"bpe-320 (tests)": text_lm_tokenizer(Path(tmp) / "t320"),
                      "bpe-32k": bpe_tokenizer(Path(tmp) / "t32k", 32000)}
        for vocab, path in tokenizers.items():
            for lib in (LLGuidance, XGrammar):
                rows += measure(lib, path, vocab, args.repeats)
    libs = {name: {"import_s": round(import_seconds(name), 3),
                   "requires": [r for r in requires(name) or [] if "extra ==" not in r]}
            for name in ("llguidance", "xgrammar")}
    print(format_table(rows, ["library", "tokenizer", "schema", "tokenizer_setup_ms", "compile_ms", "tokens",
                              "mask_us_per_token"]))
    for name, info in libs.items():
        print(f"{name}: import {info['import_s']:.2f} s in a fresh interpreter; requires: "
              f"{', '.join(info['requires']) or 'nothing'}")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "rows": rows, "libraries": libs,
                          "argv": sys.argv[1:]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
