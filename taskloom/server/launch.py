"""Running the app under uvicorn: `taskloom serve`, and a server in a background thread for
tests and embedding. SIGTERM stops accepting, lets in-flight requests finish within the grace
period, aborts the rest, and returns normally (exit status 0)."""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import uvicorn

from taskloom.engine.client import EngineClient
from taskloom.server.app import build_app

logger = logging.getLogger(__name__)


def uvicorn_config(client: EngineClient, model_name: str, host: str, port: int,
                   api_key: str | None, max_queue: int | None,
                   shutdown_grace: float, log_level: str = "info",
                   tool_call_parser: str | None = None) -> uvicorn.Config:
    app = build_app(client, model_name, api_key=api_key, max_queue=max_queue,
                    tool_call_parser=tool_call_parser)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                          timeout_graceful_shutdown=shutdown_grace, access_log=False)


def serve(config: uvicorn.Config) -> None:
    """Serve until SIGTERM or Ctrl-C; both end in a graceful shutdown and a normal return."""
    stopped: list[int] = []
    # uvicorn re-raises the signal that stopped it once it is done; these handlers take it.
    previous = {sig: signal.signal(sig, lambda s, _: stopped.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        logger.info("stopped by signal %d", stopped[0])


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a daemon thread (tests, notebooks)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="taskloom-http",
                                       daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.server.config.host}:{self.server.config.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
