"""rtserve's native CPU kernels (``kernels.cpp``): built on first use with the machine's C++ compiler
and loaded as PyTorch operators (``torch.ops.rtserve.linear`` / ``decode_layer``).

Built with ``-O3 -march=native`` for the CPU it runs on (AVX-512, AVX2 or scalar code), against the
installed PyTorch's headers, into a cache folder keyed by the source, the PyTorch version and the
CPU's flags: ``$RTSERVE_NATIVE_CACHE``, else ``~/.cache/rtserve/native``. A file lock makes processes
that start together build it once. ``make install`` builds it ahead (``python -m rtserve.llm.native``, ``__main__.py``).

Everything that uses it has a PyTorch fallback: without a compiler, when the build fails, or with
``RTSERVE_NATIVE=0``, ``ops()`` returns None (with one warning saying why) and the engine runs as
before. No Python package is compiled at install time, so the engine stays importable anywhere.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger("rtserve.native")
SOURCE = Path(__file__).with_name("kernels.cpp")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return [cxx, "-O3", f"-march={_arch()}", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in cpp_extension.include_paths()],
            str(SOURCE), "-o", str(out), f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]


def _arch() -> str:
    """The -march target: ``native``, or ``$RTSERVE_NATIVE_ARCH`` (tests build the AVX2 and scalar
    code on an AVX-512 machine with ``haswell`` and ``x86-64``)."""
    return os.environ.get("RTSERVE_NATIVE_ARCH") or "native"


def library_path() -> Path:
    """Where this source, PyTorch and CPU's build lives (built or not)."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
                         + _arch().encode()).hexdigest()[:16]
    root = Path(os.environ.get("RTSERVE_NATIVE_CACHE") or Path.home() / ".cache" / "rtserve" / "native")
    return root / key / "rtserve_native.so"


def build() -> Path:
    """Compile the library unless this exact build exists; returns its path (raises on failure)."""
    lib = library_path()
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse
        if not lib.exists():
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            done = subprocess.run(_command(tmp), capture_output=True, text=True)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
            os.replace(tmp, lib)
    return lib


def ops():
    """``torch.ops.rtserve`` with the kernels loaded, or None when they are unavailable here."""
    if "ops" in _STATE:  # settled: no lock on the hot path (the layers call this per product)
        return _STATE["ops"]
    with _LOCK:
        if "ops" not in _STATE:  # settled once, at the end (the fast path above reads it unlocked)
            result = None
            if os.environ.get("RTSERVE_NATIVE", "1") == "0":
                _STATE["why"] = "RTSERVE_NATIVE=0"
            else:
                try:
                    torch.ops.load_library(str(build()))
                    result = torch.ops.rtserve
                except (RuntimeError, OSError) as e:
                    _STATE["why"] = str(e)
                    log.warning("native CPU kernels unavailable, using PyTorch operators instead: %s", e)
            _STATE["ops"] = result
        return _STATE["ops"]


def unavailable_reason() -> str | None:
    return None if ops() is not None else str(_STATE.get("why"))


PANEL = 16  # outputs a panel (kernels.cpp)


def pack_panels(w: torch.Tensor) -> torch.Tensor | None:
    """(N, K) -> (N / 16, K, 16), the layout of the kernels' panel products (each panel the weights of
    16 outputs side by side for every k); None when N is not a multiple of 16."""
    n, k = w.shape
    if n % PANEL:
        return None
    return w.reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def pack_int8_pairs(q: torch.Tensor) -> torch.Tensor | None:
    """int8 (N, K) -> (N / 16, K / 2, 32), panels of k pairs (element [p, i, 2 j + t] is output
    16 p + j at k = 2 i + t), the int8 layout of AVX2 builds; None when N is not a multiple of 16
    or K is odd."""
    n, k = q.shape
    if n % PANEL or k % 2:
        return None
    p = q.reshape(n // PANEL, PANEL, k // 2, 2).permute(0, 2, 1, 3)
    return p.reshape(n // PANEL, k // 2, 2 * PANEL).contiguous()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """An int8 (N, K) weight in the layout the native int8 products read: panels of k pairs (int16
    activations) where the build has them and they are its default, else panels, else (N, K) itself.
    ``RTSERVE_INT8_PAIRS=1`` / ``0`` turns pairs on / off. They are the default on AVX-512 builds
    with VNNI (vpdpwssd: 32 products an instruction, twice the float multiply-add's), off on AVX2
    builds: on the 2-core AVX2 EPYC vpmaddwd decoded the 34M Llama 12% faster at 1 sequence but 15%
    slower at 16 and 64 (it issues once a cycle there, as many products as the float multiply-adds)."""
    nat = ops()
    env = os.environ.get("RTSERVE_INT8_PAIRS")
    pairs = nat is not None and nat.int8_pairs() and (env == "1" or (env != "0" and nat.int8_pairs_default()))
    p = pack_int8_pairs(q) if pairs else None
    if p is None:
        p = pack_panels(q)
    return q.contiguous() if p is None else p


def pack_int4(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int4 values in [-8, 7] as int8 (N, K) with float32 scales (N, K / g) -> the layout of the
    native int4 product: uint8 (N / 16, K / 2, 16), byte [p, i, j] holding output 16 p + j at k = 2 i
    (low nibble) and 2 i + 1 (high nibble) as q + 8, and the scales in panels too, (N / 16, K / g, 16).
    None when N is not a multiple of 16, or the group size g is odd or does not divide K."""
    n, k = q.shape
    if n % PANEL or scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1] or (k // scales.shape[1]) % 2:
        return None
    from ..quant_linear import pack_int4 as pack_bytes  # the storage packing: two offset nibbles a byte

    byte = pack_bytes(q)  # (N, K / 2)
    w = byte.reshape(n // PANEL, PANEL, k // 2).transpose(1, 2).contiguous()
    s = scales.float().reshape(n // PANEL, PANEL, -1).transpose(1, 2).contiguous()
    return w, s


def in_features(w: torch.Tensor) -> int:
    """The input features of a weight in any of the kernels' layouts ((N, K), panels, panels of k
    pairs, int4 panels)."""
    pairs = w.dim() == 3 and (w.shape[2] == 2 * PANEL or w.dtype == torch.uint8)
    return 2 * w.shape[1] if pairs else w.shape[1]
