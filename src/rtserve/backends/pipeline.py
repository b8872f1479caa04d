"""``backend: pipeline``: a model cut into stages (``rtserve split``) served as one model.

Each stage is its own instance -- an in-process ONNX Runtime session, a worker process
(``executor: process`` in ``pipeline.json``, tensors through shared memory) or a Ray actor
(``executor: ray``, ``resources: {num_cpus, num_gpus}``) -- on its own device, driven by its own
thread, with queues between the stages. A batch is cut into micro-batches that flow through the
stages in order, so stage k works on micro-batch i while stage k+1 works on micro-batch i-1: with
worker processes, stages use separate cores at the same time. Outputs are reassembled in order. A
stage that fails (a dead worker: 503) fails the whole batch with its error.
"""
from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .base import Backend, check_options, register


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


@register
class PipelineBackend(Backend):
    name = "pipeline"
    file_names = ("pipeline.json",)
    OPTIONS = {"micro_batch"}

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
        self.stages, self.io = [], []
        try:
            for i, st in enumerate(stages):
                file = Path(path).parent / st["file"]
                opts = {"intra_op_threads": int(st.get("threads", 1))}
                kind = "torch" if file.suffix == ".pt2" else "onnx"  # a stage is an ONNX or a .pt2 file
                executor = st.get("executor", "local")
                if executor == "process":
                    from ..executors.process import ProcessInstance

                    self.stages.append(ProcessInstance(kind, file, st.get("device", "cpu"), opts, 1, None, i))
                elif executor == "ray":  # a Ray actor on whichever node has the stage's resources
                    from ..executors.ray_executor import PlacementGroup, RayInstance

                    group = PlacementGroup(1, st.get("resources", {}))
                    self.stages.append(RayInstance(kind, file, st.get("device", "cpu"), opts, 1, None, 0, group))
                elif executor != "local":
                    raise ConfigError(f"{path}: stage {i}: executor '{executor}' is not one of local, process, ray")
                else:
                    from .base import get_backend

                    self.stages.append(get_backend(kind)(file, st.get("device", "cpu"), opts, 1))
                self.io.append((st["input"], st["output"]))
        except BaseException:
            for s in self.stages:
                s.close()
            raise
        for k in range(len(stages) - 1):  # stage k's output is stage k+1's input
            out = next(o for o in self.stages[k].file_outputs if o.name == self.io[k][1])
            inp = next(i for i in self.stages[k + 1].file_inputs if i.name == self.io[k + 1][0])
            if out.datatype != inp.datatype or len(out.shape) != len(inp.shape):
                raise ConfigError(f"{path}: stage {k} gives {out.datatype} {list(out.shape)}, stage {k + 1} takes "
                                  f"{inp.datatype} {list(inp.shape)}")
        self.file_inputs = self.stages[0].file_inputs
        self.file_outputs = self.stages[-1].file_outputs
        self.queues = [queue.Queue() for _ in self.stages]
        self.threads = [threading.Thread(target=self._stage_loop, args=(k,), daemon=True, name=f"rtserve-stage-{k}")
                        for k in range(len(self.stages))]
        for t in self.threads:
            t.start()

    def _stage_loop(self, k: int) -> None:
        stage, (name_in, name_out) = self.stages[k], self.io[k]
        last = k == len(self.stages) - 1
        while True:
            item = self.queues[k].get()
            if item is None:
                return
            job, i, x = item
            if job.error is None:
                try:
                    x = stage.run({name_in: x})[name_out]
                except BaseException as e:  # noqa: BLE001 - the batch fails, the pipeline goes on
                    job.error = e
            if last or job.error is not None:
                job.results[i] = x
                job.count()  # each item is counted once: at the last stage, or where it stopped
            else:
                self.queues[k + 1].put((job, i, x))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs[self.io[0][0]]
        chunks = [x[i:i + self.micro] for i in range(0, len(x), self.micro)] or [x]
        job = _Job(len(chunks))
        for i, c in enumerate(chunks):
            self.queues[0].put((job, i, c))
        job.done.wait()
        if job.error is not None:
            raise job.error
        return {self.io[-1][1]: np.concatenate(job.results)}

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join(5)
        for s in self.stages:
            s.close()
