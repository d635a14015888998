"""Running the gateway under uvicorn: in the foreground (``tritonop gateway``) or on a thread
beside a local tritonserver (``tritonop serve``, tests)."""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from tritonop.gateway.app import create_app
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import GatewayConfig
from tritonop.gateway.connections import HEADER_TIMEOUT_SECONDS, protocol_class
from tritonop.gateway.tls import CertificateFiles

MIN_CONNECTIONS = 1024
"""Connections and requests at once before new requests get 503: well above what clients'
pools keep open, since an idle kept-alive connection counts too."""
RESERVED_FILES = 128
"""File descriptors left for Triton connections, logs and the process itself."""


@dataclass(frozen=True)
class TLSFiles:
    """A certificate chain and its private key (PEM), as a kubernetes.io/tls Secret holds."""

    cert: Path
    key: Path


def uvicorn_config(config: GatewayConfig, triton: TritonAddress, host: str, port: int,
                   *, api_key: str | None = None, tls: TLSFiles | None = None,
                   header_timeout: float = HEADER_TIMEOUT_SECONDS) -> uvicorn.Config:
    # One process: the admission bounds must be shared by every request to a model.
    # uvicorn's own access log is off: it would log query strings; auth.AccessLog does not.
    return uvicorn.Config(create_app(config, triton, api_key), host=host, port=port,
                          log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=30,
                          http=protocol_class(header_timeout),
                          limit_concurrency=connection_limit(config),
                          ssl_certfile=tls.cert if tls else None,
                          ssl_keyfile=tls.key if tls else None)


def connection_limit(config: GatewayConfig) -> int:
    """uvicorn's ``limit_concurrency``: connections (and requests) beyond it get 503 at once.

    Four times the admission places of every model (the rest of each request's life is
    waiting for Triton or a client), at least :data:`MIN_CONNECTIONS`, and never more than
    the process's file descriptors allow, so that the limit answers before ``accept`` fails.
    """
    places = sum(m.admission.max_in_flight + m.admission.max_waiting
                 for m in config.models.values())
    wanted = max(MIN_CONNECTIONS, 4 * places)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(64, min(wanted, soft - RESERVED_FILES))


def run(config: GatewayConfig, triton: TritonAddress, host: str = "0.0.0.0",
        port: int = 8080, *, api_key: str | None = None, tls: TLSFiles | None = None) -> int:
    """Serve until SIGINT or SIGTERM (uvicorn finishes in-flight requests first)."""
    GatewayServer(uvicorn_config(config, triton, host, port, api_key=api_key, tls=tls)).run()
    return 0


class GatewayServer(uvicorn.Server):
    """uvicorn's server, which also reloads a renewed TLS certificate (checked once a
    second, on uvicorn's own tick)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.certificates = (CertificateFiles(Path(config.ssl_certfile), Path(config.ssl_keyfile))
                             if config.ssl_certfile and config.ssl_keyfile else None)

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0 and self.certificates is not None and self.config.ssl is not None:
            self.certificates.refresh(self.config.ssl)
        return await super().on_tick(counter)


class GatewayThread:
    """The gateway on a thread of its own, with its own event loop.

    Args:
        config: the models to serve.
        triton: where Triton's gRPC and HTTP endpoints are.
        port: the OpenAI port on ``host``.
        host: the address to listen on (loopback unless asked otherwise).
        api_key: one key for the client ``default``, beside ``config.api_keys``.
        tls: serve HTTPS with these files.
        header_timeout: seconds a request head may take to arrive.
    """

    def __init__(self, config: GatewayConfig, triton: TritonAddress, port: int,
                 host: str = "127.0.0.1", *, api_key: str | None = None,
                 tls: TLSFiles | None = None,
                 header_timeout: float = HEADER_TIMEOUT_SECONDS) -> None:
        self.server = GatewayServer(uvicorn_config(config, triton, host, port,
                                                   api_key=api_key, tls=tls,
                                                   header_timeout=header_timeout))
        self.url = f"{'https' if tls else 'http'}://{host}:{port}"
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
