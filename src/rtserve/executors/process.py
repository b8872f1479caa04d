"""The ``process`` executor: each model instance runs in its own worker process.

Control messages are small tuples on a pipe; tensors travel through two shared-memory arenas that
the *server* owns for each worker (inputs and outputs), grown when a batch does not fit. The server
writes a batch's inputs into the input arena and sends their offsets, shapes and dtypes; the worker
runs its backend on views of that memory and writes the outputs into the output arena; the server
copies them out. BYTES tensors (numpy object arrays) go in the message itself.

A worker that dies (killed, crashed, out of memory) is noticed within ``POLL_S``: the batch it was
running is answered with 503 and a new worker is started for the next one, so later requests
succeed. The server owns the shared memory, so a dead worker leaks none.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from ..errors import ConfigError, Unavailable

log = logging.getLogger("rtserve.executor")
POLL_S = 0.05
ALIGN = 64
START_TIMEOUT_S = 120.0


def _layout(arrays: dict[str, np.ndarray]) -> tuple[list, dict, int]:
    """Offsets for the numeric arrays (64-byte aligned), object arrays kept aside; total bytes."""
    descs, inline, off = [], {}, 0
    for name, a in arrays.items():
        if a.dtype == object:
            inline[name] = a
            continue
        a = np.ascontiguousarray(a)
        descs.append((name, off, a.shape, a.dtype.str))
        off += -(-a.nbytes // ALIGN) * ALIGN
    return descs, inline, off


def _write(buf, arrays: dict[str, np.ndarray], descs) -> None:
    for name, off, shape, dt in descs:
        np.ndarray(shape, np.dtype(dt), buffer=buf, offset=off)[...] = arrays[name]


def _read(buf, descs, copy: bool) -> dict[str, np.ndarray]:
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


def _worker_main(conn, backend_name: str, path: str, device: str, options: dict, instances: int,
                 output_names) -> None:
    """The worker process: load the backend, then serve ``run`` messages until told to stop."""
    from ..backends.base import get_backend

    try:
        if ":" in backend_name:  # "module:Class", for backends that are not in the registry (LLM stages)
            import importlib

            mod, cls = backend_name.split(":")
            factory = getattr(importlib.import_module(mod), cls)
        else:
            factory = get_backend(backend_name)
        backend = factory(Path(path), device, options, instances, output_names)
    except Exception as e:  # noqa: BLE001 - reported to the server, which raises ConfigError
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", backend.file_inputs, backend.file_outputs))
    ins, outs = _Attached(), _Attached()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            backend.close()
            return
        _, in_name, descs, inline, out_name, out_size = msg
        try:
            inputs = _read(ins.get(in_name).buf, descs, copy=False)
            inputs.update(inline)
            result = backend.run(inputs)
            odescs, oinline, need = _layout(result)
            if need > out_size:
                conn.send(("grow", need))
                _, out_name, out_size = conn.recv()
            _write(outs.get(out_name).buf, result, odescs)
            conn.send(("ok", odescs, oinline))
        except Exception as e:  # noqa: BLE001 - the batch fails, the worker goes on
            conn.send(("fail", f"{type(e).__name__}: {e}"))


class ProcessInstance:
    """A model instance in a worker process; ``run`` has the backend's signature, so the batcher's
    instance thread drives it exactly like an in-process backend."""

    def __init__(self, backend_name: str, path: Path, device: str, options: dict, instances: int,
                 output_names, index: int = 0) -> None:
        self.args = (backend_name, str(path), device, dict(options), instances, output_names)
        self.index = index
        self.restarts = 0
        self._lock = threading.Lock()
        self._ctx = mp.get_context("spawn")
        self._arenas: dict[str, shared_memory.SharedMemory] = {}
        self._start()

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_worker_main, args=(child, *self.args), daemon=True,
                                      name=f"rtserve-worker-{self.index}")
        self.proc.start()
        child.close()
        self.conn = parent
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.conn.poll(POLL_S):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"worker process for {self.args[1]} did not start (exit code {self.proc.exitcode})")
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise ConfigError(f"worker process for {self.args[1]} exited at start (exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            self.proc.join(5)
            raise ConfigError(f"worker process: {msg[1]}")
        _, self.file_inputs, self.file_outputs = msg

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
        log.warning("worker %d (%s) %s; starting a new one", self.index, self.args[1], why)
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
                self.conn.send(("stop",))
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
                self.conn.send(("run", ins.name, descs, inline, outs.name, outs.size))
                msg = self._reply()
                if msg[0] == "grow":
                    outs = self._arena("out", msg[1])
                    self.conn.send(("arena", outs.name, outs.size))
                    msg = self._reply()
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
                code = self.proc.exitcode
                self._restart(f"died (exit code {code}, {type(e).__name__})")
                raise Unavailable(f"the worker process running this batch died (exit code {code}); it has been "
                                  "restarted, retry the request") from None
            if msg[0] == "fail":
                raise RuntimeError(msg[1])
            _, odescs, oinline = msg
            out = _read(outs.buf, odescs, copy=True)
            out.update(oinline)
            return out
