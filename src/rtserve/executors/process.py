"""The ``process`` executor: each model instance runs in its own worker process.

Control messages are small dataclasses on a pipe (below); tensors travel through two shared-memory
arenas that the *server* owns for each worker (inputs and outputs), grown when a batch does not fit.
The server writes a batch's inputs into the input arena and sends their offsets, shapes and dtypes
(``TensorDesc``); the worker runs its backend on views of that memory and writes the outputs into
the output arena; the server copies them out. BYTES tensors (numpy object arrays) go in the message
itself.

A worker that dies (killed, crashed, out of memory) is noticed within ``POLL_S``: the batch it was
running is answered with 503 and a new worker is started for the next one, so later requests
succeed. The server owns the shared memory, so a dead worker leaks none.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, Unavailable
from .base import InstanceSpec, _all_or_none, register_executor

log = logging.getLogger("rtserve.executor")
POLL_S = 0.05
ALIGN = 64
START_TIMEOUT_S = 120.0


class TensorDesc(NamedTuple):
    """Where one numeric tensor lies in an arena."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str  # numpy dtype.str


# -- messages: server -> worker ---------------------------------------------------------------------
@dataclass(frozen=True)
class RunBatch:
    in_arena: str
    inputs: list[TensorDesc]
    inline: dict  # object (BYTES) arrays, sent in the message
    out_arena: str
    out_size: int


@dataclass(frozen=True)
class ArenaGrown:
    """The answer to ``NeedArena``: the output arena to write into now."""

    out_arena: str
    out_size: int


@dataclass(frozen=True)
class Stop:
    pass


# -- messages: worker -> server ---------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    file_inputs: list
    file_outputs: list


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class NeedArena:
    """The outputs need ``size`` bytes, more than the output arena has."""

    size: int


@dataclass(frozen=True)
class BatchDone:
    outputs: list[TensorDesc]
    inline: dict


@dataclass(frozen=True)
class BatchFailed:
    error: str


def exit_text(code: int | None) -> str:
    """``-9`` -> ``killed by signal SIGKILL``; a plain exit code otherwise."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _layout(arrays: dict[str, np.ndarray]) -> tuple[list[TensorDesc], dict, int]:
    """Offsets for the numeric arrays (64-byte aligned), object arrays kept aside; total bytes."""
    descs, inline, off = [], {}, 0
    for name, a in arrays.items():
        if a.dtype == object:
            inline[name] = a
            continue
        a = np.ascontiguousarray(a)
        descs.append(TensorDesc(name, off, a.shape, a.dtype.str))
        off += -(-a.nbytes // ALIGN) * ALIGN
    return descs, inline, off


def _write(buf, arrays: dict[str, np.ndarray], descs) -> None:
    for name, off, shape, dt in descs:
        np.ndarray(shape, np.dtype(dt), buffer=buf, offset=off)[...] = arrays[name]


def _read(buf, descs: list[TensorDesc], copy: bool) -> dict[str, np.ndarray]:
    out = {}
    for name, off, shape, dt in descs:
        a = np.ndarray(shape, np.dtype(dt), buffer=buf, offset=off)
        out[name] = a.copy() if copy else a
    return out


class _Attached:
    """The worker's handle on the server's arenas, reopened when the server grows one."""

    def __init__(self) -> None:
        self.shm: dict[str, shared_memory.SharedMemory] = {}

    def get(self, name: str) -> shared_memory.SharedMemory:
        shm = self.shm.get(name)
        if shm is None:
            for old in self.shm.values():
                old.close()
            # a spawned worker shares the server's resource tracker, so attaching registers nothing new
            # and the server's unlink stays the only one
            shm = shared_memory.SharedMemory(name=name)
            self.shm = {name: shm}
        return shm


def _worker_main(conn, spec: InstanceSpec) -> None:
    """The worker process: build the instance, then serve ``RunBatch`` messages until ``Stop``."""
    try:
        backend = spec.build()
    except Exception as e:  # noqa: BLE001 - reported to the server, which raises ConfigError
        conn.send(LoadFailed(f"{type(e).__name__}: {e}"))
        return
    conn.send(Ready(backend.file_inputs, backend.file_outputs))
    ins, outs = _Attached(), _Attached()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if isinstance(msg, Stop):
            backend.close()
            return
        try:
            conn.send(_run_batch(conn, backend, msg, ins, outs))
        except Exception as e:  # noqa: BLE001 - the batch fails, the worker goes on
            conn.send(BatchFailed(f"{type(e).__name__}: {e}"))


def _run_batch(conn, backend, msg: RunBatch, ins: "_Attached", outs: "_Attached") -> BatchDone:
    inputs = _read(ins.get(msg.in_arena).buf, msg.inputs, copy=False)
    inputs.update(msg.inline)
    result = backend.run(inputs)
    descs, inline, need = _layout(result)
    out_arena, out_size = msg.out_arena, msg.out_size
    if need > out_size:
        conn.send(NeedArena(need))
        grown: ArenaGrown = conn.recv()
        out_arena, out_size = grown.out_arena, grown.out_size
    _write(outs.get(out_arena).buf, result, descs)
    return BatchDone(descs, inline)


class ProcessInstance:
    """A model instance in a worker process; ``run`` has the backend's signature, so the batcher's
    instance thread drives it exactly like an in-process backend."""

    in_flight = 1

    def __init__(self, spec: InstanceSpec, index: int = 0) -> None:
        self.spec = spec
        self.index = index
        self.restarts = 0
        self._lock = threading.Lock()
        self._ctx = mp.get_context("spawn")
        self._arenas: dict[str, shared_memory.SharedMemory] = {}
        self._start()

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True,
                                      name=f"rtserve-worker-{self.index}")
        self.proc.start()
        child.close()
        self.conn = parent
        where = self.spec.path
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.conn.poll(POLL_S):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"worker process for {where} did not start ({exit_text(self.proc.exitcode)})")
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise ConfigError(f"worker process for {where} exited at start ({exit_text(self.proc.exitcode)})") from None
        if isinstance(msg, LoadFailed):
            self.proc.join(5)
            raise ConfigError(f"worker process: {msg.error}")
        self.file_inputs, self.file_outputs = msg.file_inputs, msg.file_outputs

    def _arena(self, role: str, size: int) -> shared_memory.SharedMemory:
        shm = self._arenas.get(role)
        if shm is None or shm.size < size:
            if shm is not None:
                shm.close()
                shm.unlink()
            shm = shared_memory.SharedMemory(create=True, size=max(size, 1 << 20, 2 * (shm.size if shm else 0)))
            self._arenas[role] = shm
        return shm

    def _restart(self, why: str) -> None:
        self.restarts += 1
        log.warning("worker %d (%s) %s; starting a new one", self.index, self.spec.path, why)
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self._start()

    def close(self) -> None:
        with self._lock:
            try:
                self.conn.send(Stop())
            except OSError:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
            for shm in self._arenas.values():
                shm.close()
                shm.unlink()
            self._arenas.clear()

    # -- running -----------------------------------------------------------------------------------
    def _reply(self):
        while not self.conn.poll(POLL_S):
            if not self.proc.is_alive():
                raise EOFError
        return self.conn.recv()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            try:
                descs, inline, size = _layout(inputs)
                ins = self._arena("in", size)
                _write(ins.buf, inputs, descs)
                outs = self._arena("out", 0)
                self.conn.send(RunBatch(ins.name, descs, inline, outs.name, outs.size))
                msg = self._reply()
                if isinstance(msg, NeedArena):
                    outs = self._arena("out", msg.size)
                    self.conn.send(ArenaGrown(outs.name, outs.size))
                    msg = self._reply()
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
                self.proc.join(1)  # reap it, so its exit code (or signal) is known
                how = exit_text(self.proc.exitcode)
                self._restart(f"died ({how}, {type(e).__name__})")
                raise Unavailable(f"the worker process running this batch died ({how}); it has been "
                                  "restarted, retry the request") from None
            if isinstance(msg, BatchFailed):
                raise RuntimeError(msg.error)
            out = _read(outs.buf, msg.outputs, copy=True)
            out.update(msg.inline)
            return out


@register_executor("process")
def make_process_instances(spec: InstanceSpec, count: int, options: dict) -> list[ProcessInstance]:
    if options:
        raise ConfigError(f"executor_options: the process executor takes none (got '{sorted(options)[0]}')")
    return _all_or_none(lambda i=i: ProcessInstance(spec, i) for i in range(count))
