"""Run the app under uvicorn (httptools + uvloop) with graceful shutdown on SIGTERM/SIGINT:
readiness turns false at once, new connections are refused, in-flight requests finish within
``shutdown_timeout_s``, then models are drained and unloaded."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from ..config import ServerConfig
from .app import App
from .http_protocol import protocol_factory


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: App) -> None:
        super().__init__(config)
        self.rt_app = app

    def handle_exit(self, sig, frame) -> None:
        loop = getattr(self.rt_app, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.rt_app.begin_shutdown)
        else:
            self.rt_app.shutting_down = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after shutting down, so a clean drain would end with
        # "killed by SIGTERM"; rtserve exits 0 once everything in flight has been answered.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def uvicorn_config(app: App, config: ServerConfig) -> uvicorn.Config:
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return uvicorn.Config(
        app, host=config.host, port=config.port, loop=loop, http=protocol_factory(config.timeout_header),
        lifespan="on", log_level=config.log_level, access_log=False,
        timeout_graceful_shutdown=config.shutdown_timeout_s, backlog=4096,
        timeout_keep_alive=config.timeout_keep_alive, limit_concurrency=config.limit_concurrency,
    )


def serve(config: ServerConfig, app: App | None = None) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = app or App(config)
    server = _Server(uvicorn_config(app, config), app)
    server.run()
