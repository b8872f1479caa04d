"""The real server in a subprocess for end-to-end tests: ``python -m rtserve serve`` on a free
loopback port, waited for on ``/v2/health/ready``, stopped with SIGTERM (then SIGKILL)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import tritonclient.http as tc


def worker_pids(parent: int) -> list[int]:
    """The multiprocessing *spawn* workers whose parent is ``parent``, read from /proc (``ps``
    can cut long command lines, which once let the resource tracker pass for a worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.hostport = f"127.0.0.1:{port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def triton(self) -> tc.InferenceServerClient:
        return tc.InferenceServerClient(self.hostport)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def start_server(repo: Path, log_dir: Path, *flags: str, env: dict | None = None):
    port = free_port()
    log = log_dir / f"server-{port}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port), *flags],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=logf, stderr=subprocess.STDOUT)
    srv = ServerProc(proc, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(srv.url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} at startup:\n{srv.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within 60 s:\n{srv.log_text()[-4000:]}")
            time.sleep(0.1)
        yield srv
    finally:
        _stop(proc)


def serve_in_process(repo: Path, fn, **cfg):
    """Run ``await fn(client)`` against the app in process (``httpx.ASGITransport``), started on
    ``repo`` with ``ServerConfig(**cfg)`` and shut down afterwards; returns what ``fn`` returns."""
    import asyncio

    from rtserve.config import ServerConfig
    from rtserve.server.app import App

    async def main():
        app = App(ServerConfig(repository=str(repo), **cfg))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await fn(c)
        finally:
            await app.shutdown()

    return asyncio.run(main())


async def repository_index(client) -> dict:
    """``/v2/repository/index`` by model name."""
    return {e["name"]: e for e in (await client.post("/v2/repository/index")).json()}
