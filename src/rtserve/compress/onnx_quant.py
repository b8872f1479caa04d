"""int8 quantization of ONNX models with ONNX Runtime's quantization tool.

Two methods:

- ``int8-dynamic``: weights stored int8 offline, activations quantized per batch at run time
  (``DynamicQuantizeLinear`` + ``MatMulInteger``). No calibration. For MatMul-heavy models
  (transformers, MLPs); Conv is left in float because ONNX Runtime's CPU ``ConvInteger`` kernel only
  takes uint8 weights, and a Conv network wants static quantization anyway.
- ``int8-static``: activation ranges fixed offline from calibration data (MinMax over the samples),
  written in QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs that ORT fuses into int8
  kernels at load), weights int8 per output channel (per-channel scales keep convolution and
  linear layers with uneven channel ranges accurate), activations uint8 (U8S8, ORT's CPU default).

Saturation: on x86 CPUs without VNNI, ORT runs U8S8 with ``VPMADDUBSW``, whose int16 intermediate
sums can saturate. ORT's documentation recommends ``reduce_range`` (7-bit weights) on such machines
and says it is not needed with VNNI; we detect VNNI (``avx512_vnni`` or ``avx_vnni`` in the CPU
flags) and set ``reduce_range`` only without it. The choice and its reason go in the recipe.

Before quantizing, ORT's ``quant_pre_process`` runs (symbolic shape inference and graph
optimization): quantization needs tensor shapes, and it turns e.g. ``Gemm`` into ``MatMul + Add``,
which the dynamic quantizer handles.

Everything is validated before any work (``plan_quantization``): a bad method, a missing source,
static without calibration data, or calibration arrays whose names, dtypes or shapes do not match
the model's inputs raise ``CompressError``.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import CompressError

METHODS = ("int8-dynamic", "int8-static")
DYNAMIC_DIM = 16     # size used for a dynamic non-batch axis (e.g. sequence length) in generated inputs
CALIB_BATCH = 32     # rows per calibration batch when the model's batch axis is dynamic
GENERATED_NOTE = ("calibration data was generated (random inputs from the model's input specs): "
                  "weaker than real data, activation ranges may not match real inputs")

_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def has_vnni(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags include AVX512-VNNI or AVX-VNNI (x86 int8 dot products without
    intermediate saturation). Reads /proc/cpuinfo; False where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni"})
    return False


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]   # None = dynamic axis; axis 0 is the batch axis

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape else None


def model_inputs(path: Path) -> list[InputSpec]:
    """The graph's real inputs (initializers that are also listed as inputs excluded)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError and friends
        raise CompressError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    inits = {i.name for i in graph.initializer}
    specs = []
    for v in graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_DTYPES:
            raise CompressError(f"input '{v.name}': element type {t.elem_type} is not supported")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
        specs.append(InputSpec(v.name, np.dtype(_ONNX_DTYPES[t.elem_type]), dims))
    return specs


@dataclass
class CalibrationData:
    """Named input arrays (axis 0 = samples) and where they came from."""

    arrays: dict[str, np.ndarray]
    source: str                      # "file:<path>" or "generated"

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    @property
    def generated(self) -> bool:
        return self.source == "generated"


def load_feeds(path: Path, inputs: list[InputSpec], what: str = "calibration") -> dict[str, np.ndarray]:
    """Arrays from ``.npz`` (input name -> array) or ``.npy`` (the single input). Raises CompressError."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{what} data {path} does not exist")
    try:
        if path.suffix == ".npy":
            if len(inputs) != 1:
                raise CompressError(f"{what} data {path}: a .npy file holds one array, the model has "
                                    f"{len(inputs)} inputs ({', '.join(i.name for i in inputs)}): use .npz")
            return {inputs[0].name: np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise CompressError(f"{what} data {path}: cannot read it: {e}") from None
    raise CompressError(f"{what} data {path}: expected a .npz (input name -> array) or .npy file")


def check_feeds(arrays: dict[str, np.ndarray], inputs: list[InputSpec], what: str = "calibration",
                extra: tuple[str, ...] = ()) -> int:
    """Check names, dtypes and shapes of ``arrays`` against the model's inputs; returns the number
    of samples (axis 0, equal across inputs). Raises CompressError naming the first problem."""
    names = {i.name for i in inputs}
    unknown = sorted(set(arrays) - names - set(extra))
    if unknown:
        raise CompressError(f"{what} data: unknown input(s) {unknown}; the model's inputs are {sorted(names)}")
    missing = sorted(names - set(arrays))
    if missing:
        raise CompressError(f"{what} data: missing input(s) {missing}")
    counts = set()
    for spec in inputs:
        a = arrays[spec.name]
        if a.dtype != spec.dtype:
            raise CompressError(f"{what} data: input '{spec.name}' has dtype {a.dtype}, the model expects {spec.dtype}")
        if a.ndim != len(spec.shape):
            raise CompressError(f"{what} data: input '{spec.name}' has shape {list(a.shape)}, the model "
                                f"expects rank {len(spec.shape)} ({_shape_text(spec.shape)})")
        for axis, (got, want) in enumerate(zip(a.shape, spec.shape)):
            if axis > 0 and want is not None and got != want:
                raise CompressError(f"{what} data: input '{spec.name}' has shape {list(a.shape)}, the model "
                                    f"expects {_shape_text(spec.shape)}")
        if a.shape[0] == 0:
            raise CompressError(f"{what} data: input '{spec.name}' has no samples")
        counts.add(a.shape[0])
    if len(counts) > 1:
        raise CompressError(f"{what} data: inputs have different sample counts {sorted(counts)}")
    return counts.pop() if counts else 0


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def load_calibration(path: Path, inputs: list[InputSpec]) -> CalibrationData:
    arrays = load_feeds(path, inputs, "calibration")
    check_feeds(arrays, inputs, "calibration")
    return CalibrationData(arrays, f"file:{path}")


def random_feeds(inputs: list[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the specs: floats uniform in [0, 1); integer inputs named like masks
    are ones, like token types zeros, others uniform in [0, 100) (valid ids for any real vocabulary).
    A fixed batch axis wins over ``batch``; other dynamic axes get DYNAMIC_DIM."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = tuple(spec.shape[0] or batch if i == 0 else (d or DYNAMIC_DIM) for i, d in enumerate(spec.shape))
        name = spec.name.lower()
        if spec.dtype.kind == "f":
            a = rng.random(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b" or "mask" in name:
            a = np.ones(shape, dtype=spec.dtype)
        elif "type" in name:
            a = np.zeros(shape, dtype=spec.dtype)
        else:
            a = rng.integers(0, 100, size=shape).astype(spec.dtype)
        feeds[spec.name] = a
    return feeds


def generate_calibration(model: Path | list[InputSpec], n: int, seed: int = 0) -> CalibrationData:
    """``n`` generated samples for ``model`` (a file or its input specs; see ``random_feeds``).
    The recipe and report say this is weaker than real data."""
    inputs = model_inputs(Path(model)) if isinstance(model, (str, Path)) else model
    if n < 1:
        raise CompressError(f"--calibration-samples must be at least 1, got {n}")
    return CalibrationData(random_feeds(inputs, n, seed), "generated")


@dataclass(frozen=True)
class QuantPlan:
    """Everything decided before work starts; becomes the report's recipe."""

    method: str
    source: str
    vnni: bool
    reduce_range: bool
    reduce_range_reason: str
    per_channel: bool
    weight_type: str = "int8"
    activation_type: str = "uint8"
    format: str = ""                    # QDQ (static) | QOperator (dynamic: integer ops)
    calibration: dict = field(default_factory=dict)
    op_types: tuple[str, ...] = ()      # dynamic: the op types quantized
    onnxruntime: str = ""

    def recipe(self) -> dict:
        return asdict(self)


def plan_quantization(src: Path, method: str, calibration: CalibrationData | None = None, *,
                      inputs: list[InputSpec] | None = None, per_channel: bool | None = None,
                      reduce_range: bool | None = None, vnni: bool | None = None) -> QuantPlan:
    """Validate the request and decide the settings; touches nothing. Raises CompressError."""
    if method not in METHODS:
        raise CompressError(f"--quantize '{method}' is not one of {', '.join(METHODS)}")
    src = Path(src)
    if not src.is_file():
        raise CompressError(f"source model {src} does not exist")
    if src.suffix != ".onnx":
        raise CompressError(f"source model {src}: int8 quantization here takes an .onnx file")
    inputs = inputs if inputs is not None else model_inputs(src)
    if method == "int8-static":
        if calibration is None:
            raise CompressError("int8-static needs calibration data: --calibration FILE.npz or --calibration-samples N")
        check_feeds(calibration.arrays, inputs, "calibration")
        for spec in inputs:
            if spec.fixed_batch and calibration.num_samples < spec.fixed_batch:
                raise CompressError(f"calibration data: {calibration.num_samples} samples, fewer than the "
                                    f"model's fixed batch {spec.fixed_batch}")
    import onnxruntime as ort
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    vnni = has_vnni() if vnni is None else vnni
    if reduce_range is None:
        reduce_range = not vnni
        reason = ("VNNI present: U8S8 does not saturate, full 8-bit weights" if vnni else
                  "no VNNI: U8S8 runs on VPMADDUBSW, which can saturate; 7-bit weights (ORT's advice)")
    else:
        reason = "set explicitly"
    calib = {}
    if calibration is not None and method == "int8-static":
        calib = {"source": calibration.source, "samples": calibration.num_samples, "method": "MinMax"}
    static = method == "int8-static"
    return QuantPlan(
        method=method, source=str(src), vnni=vnni, reduce_range=reduce_range, reduce_range_reason=reason,
        # per output channel for both: measured on MiniLM (dynamic), per-tensor int8 weights lose
        # fidelity (mean cosine 0.970 against fp32) where per-channel keeps it (0.994)
        per_channel=True if per_channel is None else per_channel,
        format="QDQ" if static else "QOperator", calibration=calib,
        op_types=() if static else tuple(o for o in IntegerOpsRegistry if o != "Conv"),
        onnxruntime=ort.__version__)


class _Reader:
    """ORT CalibrationDataReader over in-memory arrays, in batches along axis 0."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int, exact: bool) -> None:
        n = next(iter(arrays.values())).shape[0]
        stop = n - n % batch if exact else n  # a fixed batch axis takes whole batches only
        self._batches = iter([{k: v[i:min(i + batch, stop)] for k, v in arrays.items()}
                              for i in range(0, stop, batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - ORT only calls this for some calibrators
        pass


def _pre_process(src: Path, tmp: Path) -> tuple[Path, str]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "pre.onnx"
    try:
        quant_pre_process(str(src), str(out))
        return out, "ok"
    except Exception as e:  # symbolic shape inference fails on some graphs: quantize the original
        return src, f"skipped ({type(e).__name__}: {e})"[:300]


def quantize_onnx(src: Path, dst: Path, method: str, calibration: CalibrationData | None = None, *,
                  plan: QuantPlan | None = None, per_channel: bool | None = None,
                  reduce_range: bool | None = None) -> dict:
    """Quantize ``src`` into ``dst`` (a file path); returns the recipe (the plan plus what happened).
    Validation happens first (``plan_quantization``), so bad input raises before any file is written."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    inputs = model_inputs(Path(src)) if Path(src).is_file() else None
    plan = plan or plan_quantization(src, method, calibration, inputs=inputs, per_channel=per_channel,
                                     reduce_range=reduce_range)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a line per unquantized node
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model, pre = _pre_process(Path(src), Path(tmp))
            if plan.method == "int8-dynamic":
                quantize_dynamic(str(model), str(dst), weight_type=QuantType.QInt8, per_channel=plan.per_channel,
                                 reduce_range=plan.reduce_range, op_types_to_quantize=list(plan.op_types))
            else:
                assert calibration is not None and inputs is not None
                fixed = next((i.fixed_batch for i in inputs if i.fixed_batch), None)
                quantize_static(str(model), str(dst), _Reader(calibration.arrays, fixed or CALIB_BATCH, exact=bool(fixed)),
                                quant_format=QuantFormat.QDQ, per_channel=plan.per_channel,
                                reduce_range=plan.reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.getLogger().setLevel(quiet)
    recipe = plan.recipe()
    recipe["pre_process"] = pre
    if calibration is not None and calibration.generated and plan.method == "int8-static":
        recipe["calibration"]["note"] = GENERATED_NOTE
    return recipe
