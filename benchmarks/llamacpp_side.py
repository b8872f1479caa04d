"""llama.cpp as the other side of the CPU benchmarks (issue 13): the same Hugging Face checkpoint converted
to GGUF with llama.cpp's own converter, decoded greedily in batches with its low-level C API.

Why each piece is the way it is:

* The random checkpoints of the benchmarks have no tokenizer, and the converter will not write a GGUF
  without one. ``write_llama_tokenizer`` builds a real Llama-style byte-fallback BPE (``<unk> <s> </s>``,
  the 256 ``<0xNN>`` byte tokens, then ``▁``-words reachable by merges) with ``tokenizers``, which the
  converter takes through ``gguf.LlamaHfVocab`` (no sentencepiece needed). Token ids are what both sides
  are fed, so the vocabulary's text never matters, only its size.
* The converter is the official one (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist of the
  installed version), so f32 / f16 / q8_0 are exactly what a user of llama.cpp would run.
* Decoding is llama.cpp's own batched loop (as its ``batched`` example): every sequence's prompt in one
  ``llama_decode`` batch, then one token per sequence per step, sampled by the C greedy sampler; no
  Python-side math, so the figure is llama.cpp's speed, not the binding's.

    python benchmarks/llamacpp_side.py --check   # convert, verify counts, determinism and agreement
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTTYPES = ("f32", "f16", "q8_0")
#: types llama.cpp makes from the f32 GGUF with its quantizer (``llama-quantize``'s library call), as a
#: user of llama.cpp would: the converter writes no 4-bit types (the llama_ftype number of each)
QUANTIZED = {"q4_0": 2}
CONVERTER_ENV = "RTSERVE_LLAMACPP_CONVERTER"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtserve" / "llamacpp"


def available() -> str | None:
    """None when llama_cpp can be used, else why not (the benchmark prints it and skips the rows)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # an ImportError, or a shared library that will not load
        return f"llama_cpp is not importable ({type(e).__name__}: {e}); " \
               "install it with: pip install --no-binary llama-cpp-python llama-cpp-python"
    return None


# ---------------------------------------------------------------- tokenizer

def _synthetic_words(n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """n tokens ``▁a``, ``▁ab``, ``▁abc``... each made by one merge of a shorter token and a letter."""
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
               [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]
    words: list[str] = ["▁", *alphabet]
    merges: list[tuple[str, str]] = []
    frontier = ["▁"]
    while len(words) < n:
        grown = []
        for stem in frontier:
            for ch in alphabet:
                if len(words) >= n:
                    break
                words.append(stem + ch)
                merges.append((stem, ch))
                grown.append(stem + ch)
        frontier = grown
    return words[:n], merges


def write_llama_tokenizer(path: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json of a Llama-2-style byte-fallback BPE with vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < len(specials) + len(byte_tokens) + 64:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-fallback vocabulary")
    words, merges = _synthetic_words(vocab_size - len(specials) - len(byte_tokens))
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + words)}
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, add_prefix_space=None)
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=1))


# ---------------------------------------------------------------- conversion

def _installed_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def _extract_converter(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   any(part in m.name for part in ("convert_hf_to_gguf.py", "/conversion/", "/gguf-py/"))]
        tar.extractall(into, members=members, filter="data")
    found = sorted(into.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise FileNotFoundError(f"no convert_hf_to_gguf.py in {sdist}")
    return found[0]


def find_converter(explicit: str | None = None) -> Path:
    """The converter: the argument, else $RTSERVE_LLAMACPP_CONVERTER, else the cache folder, else fetched.

    Fetching takes the sdist of the installed llama-cpp-python from PyPI (``pip download``) so the
    converter and the library that reads its output are the same version."""
    for given in (explicit, os.environ.get(CONVERTER_ENV)):
        if given:
            p = Path(given)
            p = p / "convert_hf_to_gguf.py" if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(f"llama.cpp converter not found at {p}")
            return p
    ver = _installed_version()
    cached = CACHE / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if cached.is_file():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as dl:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "--dest", dl, f"llama-cpp-python=={ver}"], check=True)
        sdists = sorted(Path(dl).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise FileNotFoundError(f"pip download gave no llama-cpp-python {ver} sdist")
        return _extract_converter(sdists[0], CACHE)


def _write_sentencepiece_shim(into: Path) -> None:
    """The Llama converter imports sentencepiece before it looks for tokenizer.model, so without the
    package it fails instead of falling back to tokenizer.json. The shim only lets that import pass:
    there is no tokenizer.model, the converter raises FileNotFoundError and takes gguf.LlamaHfVocab."""
    (into / "sentencepiece.py").write_text(
        "class SentencePieceProcessor:  # rtserve shim: no tokenizer.model is ever read\n"
        "    def __init__(self, *a, **k):\n"
        "        raise ImportError('sentencepiece is not installed (rtserve shim)')\n")


def convert(hf_dir: Path, outtype: str, out: Path, converter: Path) -> Path:
    """One GGUF of the checkpoint in hf_dir (which must hold a tokenizer: see write_llama_tokenizer)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    with tempfile.TemporaryDirectory() as shim:
        env = dict(os.environ)
        if importlib.util.find_spec("sentencepiece") is None:
            _write_sentencepiece_shim(Path(shim))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outtype", outtype,
                               "--outfile", str(out)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{proc.stderr[-3000:]}")
    return out


def prepare_hf_dir(checkpoint: Path, into: Path, vocab_size: int) -> Path:
    """A folder with the checkpoint's files (linked, not copied) and a tokenizer, for the converter;
    the checkpoint's own folder is left as it was, so the other engines load exactly what they did."""
    into.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.is_file() and not f.name.startswith("tokenizer"):
            (into / f.name).symlink_to(f.resolve())
    write_llama_tokenizer(into, vocab_size)
    return into


def quantize(f32: Path, outtype: str, out: Path, threads: int = 2) -> Path:
    """A GGUF of type ``outtype`` (one of ``QUANTIZED``) made from the f32 GGUF by llama.cpp's quantizer
    with its default parameters, as ``llama-quantize f32.gguf out.gguf q4_0`` does."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[outtype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize to {outtype} failed ({rc})")
    return out


def convert_all(checkpoint: Path, workdir: Path, vocab_size: int, outtypes=OUTTYPES,
                converter: str | None = None) -> dict[str, Path]:
    """GGUFs of the checkpoint: the converter's types, then llama.cpp's quantizer's from the f32 one."""
    conv = find_converter(converter)
    hf_dir = prepare_hf_dir(checkpoint, workdir / "hf", vocab_size)
    direct = [t for t in outtypes if t not in QUANTIZED]
    if any(t in QUANTIZED for t in outtypes) and "f32" not in direct:
        direct.append("f32")
    out = {t: convert(hf_dir, t, workdir / f"model-{t}.gguf", conv) for t in direct}
    for t in (t for t in outtypes if t in QUANTIZED):
        out[t] = quantize(out["f32"], t, workdir / f"model-{t}.gguf")
    return {t: out[t] for t in outtypes}


# ---------------------------------------------------------------- batched greedy decoding

@dataclass(frozen=True)
class ContextShape:
    """What a llama.cpp context is sized for; a new shape makes a new context (outside any timing)."""
    n_seq: int
    n_ctx_seq: int
    n_batch: int


class LlamaCppModel:
    """One GGUF loaded once; ``generate`` decodes n prompts as n sequences of one batched context.

    The KV cache is split per sequence (``kv_unified`` false: each sequence attends over its own
    cells only), which is llama.cpp's default and faster than one shared cache for independent prompts."""

    def __init__(self, gguf: Path, threads: int, kv_unified: bool = False):
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)
        self._ll = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.threads, self.kv_unified = threads, kv_unified
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.sampler = llama_cpp.llama_sampler_init_greedy()
        self.ctx = None
        self.shape: ContextShape | None = None
        self.batch = None

    def _context(self, shape: ContextShape) -> None:
        if self.shape == shape:
            self._ll.llama_memory_clear(self._ll.llama_get_memory(self.ctx), True)
            return
        self._free_context()
        p = self._ll.llama_context_default_params()
        p.n_ctx = shape.n_seq * shape.n_ctx_seq
        p.n_batch = shape.n_batch
        p.n_ubatch = min(shape.n_batch, 512)
        p.n_seq_max = shape.n_seq
        p.n_threads = p.n_threads_batch = self.threads
        p.kv_unified = self.kv_unified
        p.no_perf = True
        self.ctx = self._ll.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {shape}")
        self.batch = self._ll.llama_batch_init(shape.n_batch, 0, 1)
        self.shape = shape

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits), in batch order."""
        b = self.batch
        for k, (tok, pos, seq, out) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, out
            b.seq_id[k][0] = seq
        b.n_tokens = len(entries)
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations, EOS ignored: exactly new_tokens per prompt."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        per_seq = -(-(longest + new_tokens + 1) // 256) * 256
        self._context(ContextShape(n, per_seq, max(sum(len(p) for p in prompts), n)))
        entries = [(t, j, i, j == len(p) - 1) for i, p in enumerate(prompts) for j, t in enumerate(p)]
        self._decode(entries)
        out_idx = [k for k, e in enumerate(entries) if e[3]]  # the row of each sequence's logits
        outs: list[list[int]] = [[] for _ in prompts]
        for step in range(new_tokens):
            for i, idx in enumerate(out_idx):
                outs[i].append(self._ll.llama_sampler_sample(self.sampler, self.ctx, idx))
            if step == new_tokens - 1:
                break
            self._decode([(outs[i][-1], len(p) + step, i, True) for i, p in enumerate(prompts)])
            out_idx = list(range(n))
        return outs

    def _free_context(self) -> None:
        if self.ctx is not None:
            self._ll.llama_batch_free(self.batch)
            self._ll.llama_free(self.ctx)
            self.ctx = self.batch = self.shape = None

    def close(self) -> None:
        self._free_context()
        if self.sampler is not None:
            self._ll.llama_sampler_free(self.sampler)
            self._ll.llama_model_free(self.model)
            self.sampler = self.model = None


def throughput(model: LlamaCppModel, prompts: list[list[int]], new_tokens: int) -> float:
    """Output tok/s as benchmarks/llm_cpu.py counts it: all generated tokens / wall time, prefill included.
    Call once with the same prompts before timing: the first call at a new batch size makes the context."""
    t0 = time.perf_counter()
    out = model.generate(prompts, new_tokens)
    dt = time.perf_counter() - t0
    assert len(out) == len(prompts) and all(len(o) == new_tokens for o in out)
    return len(prompts) * new_tokens / dt


def load_all(ggufs: dict[str, Path], threads: int) -> dict[str, LlamaCppModel]:
    return {f"llamacpp_{t}": LlamaCppModel(p, threads) for t, p in ggufs.items()}


# ---------------------------------------------------------------- checks

def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check(threads: int, new_tokens: int, converter: str | None) -> dict:
    """Convert the benchmark's checkpoint, then: c x new_tokens tokens come out, twice the same, and
    f32's greedy tokens against transformers' greedy generate on one prompt (matching prefix)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llm_cpu

    torch.set_num_threads(threads)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model, _ = llm_cpu.build(ckpt)
        t0 = time.perf_counter()
        ggufs = convert_all(ckpt, Path(tmp) / "gguf", model.config.vocab_size, converter=converter)
        report["convert_s"] = round(time.perf_counter() - t0, 1)
        report["gguf_mb"] = {t: round(p.stat().st_size / 2**20, 1) for t, p in ggufs.items()}
        ps = llm_cpu.prompts(16, 32)
        with torch.no_grad():
            ids = torch.tensor(ps[:1])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, 32:].tolist()
        for name, m in load_all(ggufs, threads).items():
            a, b = m.generate(ps, new_tokens), m.generate(ps, new_tokens)
            single = m.generate(ps[:1], new_tokens)[0]
            report[name] = {"tokens": sum(map(len, a)), "expected": len(ps) * new_tokens,
                            "deterministic": a == b, "batch_of_1_matches_batch_of_16": single == a[0],
                            "prefix_vs_transformers": common_prefix(single, ref), "of": new_tokens}
            m.close()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="convert, verify counts, determinism, agreement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--converter", default=None, help=f"convert_hf_to_gguf.py or its folder (or ${CONVERTER_ENV})")
    args = ap.parse_args()
    if (why := available()) is not None:
        print(why)
        return 1
    if args.check:
        print(json.dumps(check(args.threads, args.new_tokens, args.converter), indent=1))
        return 0
    print(find_converter(args.converter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
