"""Running the gateway under uvicorn: in the foreground (``tritonop gateway``) or on a thread
beside a local tritonserver (``tritonop serve``, tests)."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from tritonop.gateway.app import create_app
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import GatewayConfig


def uvicorn_config(config: GatewayConfig, triton: TritonAddress, host: str, port: int
                   ) -> uvicorn.Config:
    # One process: the admission bounds must be shared by every request to a model.
    return uvicorn.Config(create_app(config, triton), host=host, port=port,
                          log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=30)


def run(config: GatewayConfig, triton: TritonAddress, host: str = "0.0.0.0",
        port: int = 8080) -> int:
    """Serve until SIGINT or SIGTERM (uvicorn finishes in-flight requests first)."""
    uvicorn.Server(uvicorn_config(config, triton, host, port)).run()
    return 0


class GatewayThread:
    """The gateway on a thread of its own, with its own event loop.

    Args:
        config: the models to serve.
        triton: where Triton's gRPC and HTTP endpoints are.
        port: the OpenAI port on ``host``.
    """

    def __init__(self, config: GatewayConfig, triton: TritonAddress, port: int,
                 host: str = "127.0.0.1") -> None:
        self.server = uvicorn.Server(uvicorn_config(config, triton, host, port))
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 30) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
