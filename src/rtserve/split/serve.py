"""``backend: pipeline``: a model cut into stages (``rtserve split``) served as one model.

Each stage is its own instance -- an in-process ONNX Runtime session, a worker process
(``executor: process`` in ``pipeline.json``, tensors through shared memory) or a Ray actor
(``executor: ray``, ``resources: {num_cpus, num_gpus}``) -- on its own device, driven by its own
thread, with queues between the stages. Stages hand each other named tensors: a layer chain one per
cut, a cut ``torch.export`` graph as many as cross the cut (a residual stream, a mask every layer
reads); a tensor flows on until the last stage that reads it. A batch is cut into micro-batches that flow through the
stages in order, so stage k works on micro-batch i while stage k+1 works on micro-batch i-1; and the
batcher keeps up to ``in_flight`` batches (default: one per stage) in the pipeline at once, so stage
1 starts the next batch while stage 2 finishes this one. With worker processes, stages use
separate cores at the same time. Outputs are reassembled in order. A
stage that fails (a dead worker: 503) fails the whole batch with its error.
"""
from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np

from ..backends.base import Backend, check_options, get_backend, register
from ..errors import ConfigError, Unavailable
from ..executors.base import InstanceSpec, make_instances
from ..paths import confined


class _Job:
    def __init__(self, n: int) -> None:
        self.results: list = [None] * n
        self.left = n
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()

    def count(self) -> None:
        """One item finished (or was dropped after an error); the last one wakes the caller."""
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()


def _stage_file(path: Path, i: int, st: dict) -> Path:
    """Stage ``i``'s model file, which must stay in pipeline.json's folder."""
    return confined(Path(path).parent, st["file"], f"{path}: stage {i} 'file'", allow_symlinks=True)


@register
class PipelineBackend(Backend):
    name = "pipeline"
    file_names = ("pipeline.json",)
    OPTIONS = {"micro_batch", "in_flight"}

    def __init__(self, path: Path, device: str, options: dict, instances: int = 1,
                 output_names: list[str] | None = None) -> None:
        super().__init__(path, device, options, instances, output_names)
        check_options(self.name, options, self.OPTIONS)
        try:
            spec = json.loads(Path(path).read_text())
            stages = spec["stages"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}: not a pipeline description ({e})") from None
        if len(stages) < 2:
            raise ConfigError(f"{path}: a pipeline needs at least 2 stages")
        self.micro = int(options.get("micro_batch", spec.get("micro_batch", 8)))
        if self.micro < 1:
            raise ConfigError("micro_batch must be >= 1")
        # batches in flight at once: by default one per stage. More keeps compute-bound stages
        # busier (benchmarks/split_pipeline.py: BERT +33-42% at two per stage) but makes batches
        # smaller, which costs weight-bound stages (the MLP there: -17%)
        self.in_flight = int(options.get("in_flight", spec.get("in_flight", len(stages))))
        if self.in_flight < 1:
            raise ConfigError("in_flight must be >= 1")
        self.stages, self.io = [], []
        try:
            for i, st in enumerate(stages):
                self.stages.append(self._make_stage(path, i, st))
                # a layer chain names one tensor per side; a cut graph may hand over several
                self.io.append((list(st["inputs"] if "inputs" in st else [st["input"]]),
                                list(st["outputs"] if "outputs" in st else [st["output"]])))
            self._wire(path, spec)
        except BaseException:
            for s in self.stages:
                s.close()
            raise
        self._closed = False
        self._accepting = threading.Lock()  # run's check-and-enqueue and close's stop marker exclude each other
        self.num_accepted = 0  # batches taken by run (under the lock), for callers that wait on it
        self.queues = [queue.Queue() for _ in self.stages]
        self.threads = [threading.Thread(target=self._stage_loop, args=(k,), daemon=True, name=f"rtserve-stage-{k}")
                        for k in range(len(self.stages))]
        for t in self.threads:
            t.start()

    @classmethod
    def model_files(cls, path: Path) -> list[Path]:
        """pipeline.json and its stages' files (an unreadable description is ``__init__``'s error)."""
        try:
            stages = json.loads(Path(path).read_text())["stages"]
            return [path] + [_stage_file(path, i, st) for i, st in enumerate(stages)]
        except (OSError, ValueError, KeyError, TypeError):
            return [path]

    @staticmethod
    def _make_stage(path: Path, i: int, st: dict):
        """Stage ``i``: an ONNX or .pt2 file on its executor (local, process or ray) and device."""
        file = _stage_file(path, i, st)
        # the stage backend's options: threads, plus any it names (e.g. memory_fraction)
        opts = {"intra_op_threads": int(st.get("threads", 1)), **st.get("options", {})}
        backend = get_backend("torch" if file.suffix == ".pt2" else "onnx")
        executor = st.get("executor", "local")
        try:
            spec = InstanceSpec.of(backend, file, st.get("device", "cpu"), opts)
            return make_instances(executor, spec, 1, st.get("resources", {}) if executor == "ray" else {})[0]
        except ConfigError as e:
            raise ConfigError(f"{path}: stage {i}: {e.message}") from None

    def _wire(self, path: Path, spec: dict) -> None:
        """Check that every stage input is a model input or an earlier stage's output of the same
        datatype and rank; work out the model's tensors and what each stage may drop afterwards."""
        self.input_names = list(spec.get("inputs") or self.io[0][0])
        self.output_names = list(spec.get("outputs") or self.io[-1][1])
        have: dict = {}  # tensor name -> (stage that makes it or -1, spec)
        for k, (ins, outs) in enumerate(self.io):
            specs_in = {s.name: s for s in self.stages[k].file_inputs}
            specs_out = {s.name: s for s in self.stages[k].file_outputs}
            for name in ins:
                if name not in specs_in:
                    raise ConfigError(f"{path}: stage {k} has no input '{name}'")
                got = specs_in[name]
                if name in have:
                    src, made = have[name]
                    if made.datatype != got.datatype or len(made.shape) != len(got.shape):
                        raise ConfigError(f"{path}: stage {src} gives {made.datatype} {list(made.shape)} as '{name}', "
                                          f"stage {k} takes {got.datatype} {list(got.shape)}")
                elif name in self.input_names:
                    have[name] = (-1, got)
                else:
                    raise ConfigError(f"{path}: stage {k} reads '{name}', which no earlier stage makes")
            for name in outs:
                if name not in specs_out:
                    raise ConfigError(f"{path}: stage {k} has no output '{name}'")
                have[name] = (k, specs_out[name])
        missing = [n for n in [*self.input_names, *self.output_names] if n not in have]
        if missing:
            raise ConfigError(f"{path}: no stage takes or makes {', '.join(missing)}")
        self.file_inputs = [have[n][1] for n in self.input_names]
        self.file_outputs = [have[n][1] for n in self.output_names]
        # after stage k, keep only what a later stage reads or the model returns
        self.keep = [set(self.output_names).union(*[set(ins) for ins, _ in self.io[k + 1:]])
                     for k in range(len(self.io))]

    def _stage_loop(self, k: int) -> None:
        stage, (names_in, _) = self.stages[k], self.io[k]
        last = k == len(self.stages) - 1
        while True:
            item = self.queues[k].get()
            if item is None:  # shutting down: what was queued before has been passed on
                if not last:
                    self.queues[k + 1].put(None)
                return
            job, i, env = item
            if job.error is None:
                try:
                    env = {**env, **stage.run({n: env[n] for n in names_in})}
                    env = {n: v for n, v in env.items() if n in self.keep[k]}
                except BaseException as e:  # noqa: BLE001 - the batch fails, the pipeline goes on
                    job.error = e
            if last or job.error is not None:
                job.results[i] = env
                job.count()  # each item is counted once: at the last stage, or where it stopped
            else:
                self.queues[k + 1].put((job, i, env))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(inputs[self.input_names[0]])
        starts = list(range(0, n, self.micro)) or [0]
        job = _Job(len(starts))
        with self._accepting:  # every item of an accepted batch is queued ahead of close's stop marker
            if self._closed:
                raise Unavailable("the pipeline is closed")
            for i, a in enumerate(starts):  # micro-batches: every model input cut along the batch axis
                self.queues[0].put((job, i, {name: inputs[name][a:a + self.micro] for name in self.input_names}))
            self.num_accepted += 1
        job.done.wait()
        if job.error is not None:
            raise job.error
        return {name: np.concatenate([r[name] for r in job.results]) for name in self.output_names}

    def close(self) -> None:
        """Batches already in the pipeline finish (the stop travels behind them), then the stages close."""
        with self._accepting:
            if self._closed:
                return
            self._closed = True
            self.queues[0].put(None)
        for t in self.threads:
            t.join(30)
        for s in self.stages:
            s.close()
