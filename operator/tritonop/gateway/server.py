"""Running the gateway under uvicorn: in the foreground (``tritonop gateway``) or on a thread
beside a local tritonserver (``tritonop serve``, tests)."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

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
DRAIN_SECONDS = 10.0
"""How long a stopping gateway keeps taking new requests after its readiness turned 503
(``--drain-seconds``). A pod's deletion reaches its clients' routes asynchronously: the
EndpointSlice controller marks the endpoint not ready, then every node's kube-proxy (at
most one sync a second by default, longer on a busy node) and every ingress controller
stops sending to it. Until then new connections still arrive; refused, they would be
failed requests. Ten seconds covers that with room on a loaded cluster and, with
:data:`GRACEFUL_SHUTDOWN_SECONDS`, leaves Triton its turn within the pod's 60 s grace."""
MAX_DRAIN_SECONDS = 120.0
"""The most ``--drain-seconds`` may ask (a pod's grace period must cover it)."""
GRACEFUL_SHUTDOWN_SECONDS = 30
"""After the drain, how long in-flight requests and streams may take to finish before
uvicorn cancels them."""
CLOSE_HEADER = (b"connection", b"close")

log = logging.getLogger(__name__)


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
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
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
        port: int = 8080, *, api_key: str | None = None, tls: TLSFiles | None = None,
        drain_seconds: float = DRAIN_SECONDS) -> int:
    """Serve until SIGINT or SIGTERM, then drain (see :class:`GatewayServer`)."""
    GatewayServer(uvicorn_config(config, triton, host, port, api_key=api_key, tls=tls),
                  drain_seconds=drain_seconds).run()
    return 0


class Drain:
    """When a stopping gateway stops taking connections, on the monotonic clock.

    Args:
        seconds: how long new requests are still served after the stop was asked for.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since: float | None = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self, now: float) -> bool:
        """Start draining; False when it had started already (a second signal)."""
        if self.since is not None:
            return False
        self.since = now
        return True

    def over(self, now: float) -> bool:
        """Whether the drain window has passed: time to close the listening socket."""
        return self.since is not None and now - self.since >= self.seconds


class GatewayServer(uvicorn.Server):
    """uvicorn's server, which drains before it stops and reloads a renewed TLS
    certificate (checked once a second, on uvicorn's own tick).

    The first SIGTERM or SIGINT starts the drain: ``/health/ready`` answers 503 at once
    (liveness stays 200), so the kubelet takes the pod out of its Service's endpoints, while
    new and in-flight requests are served for ``drain_seconds`` (answers then carry
    ``Connection: close``, which moves kept-alive clients to another pod). Then uvicorn's
    own shutdown: the listening socket closes and in-flight requests and streams get up to
    :data:`GRACEFUL_SHUTDOWN_SECONDS` to finish. A second signal exits at once. The exit
    status is 0: the stop was asked for. (Off the main thread, as in ``tritonop serve``, no
    signal reaches the server; ``should_exit`` stops it without a drain.)

    Args:
        config: uvicorn's configuration, its app made by :func:`create_app`.
        drain_seconds: see :data:`DRAIN_SECONDS`.
    """

    def __init__(self, config: uvicorn.Config, drain_seconds: float = 0.0) -> None:
        super().__init__(config)
        self.certificates = (CertificateFiles(Path(config.ssl_certfile), Path(config.ssl_keyfile))
                             if config.ssl_certfile and config.ssl_keyfile else None)
        self.drain = Drain(drain_seconds)
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would raise the signal again once served, and the process would
        # end "killed by SIGTERM" after a clean stop.
        if self.drain.begin(time.monotonic()) and not self.should_exit:
            log.warning("%s: not ready; serving new requests for %g s more, then finishing "
                        "those in flight (a second signal stops at once)",
                        signal.Signals(sig).name, self.drain.seconds)
            self._mark_draining()
            return
        log.warning("%s again: stopping now", signal.Signals(sig).name)
        self.force_exit = self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_connections)

    def _mark_draining(self) -> None:
        state = getattr(self.config.app, "state", None)
        gateway = getattr(state, "gateway", None)
        if gateway is not None:
            gateway.draining = True
        self._close_connections_after_answers()

    def _close_connections_after_answers(self) -> None:
        headers = self.server_state.default_headers
        if CLOSE_HEADER not in headers:
            self.server_state.default_headers = [*headers, CLOSE_HEADER]

    def _abort_connections(self) -> None:
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()

    async def on_tick(self, counter: int) -> bool:
        self._loop = asyncio.get_running_loop()
        if counter % 10 == 0 and self.certificates is not None and self.config.ssl is not None:
            self.certificates.refresh(self.config.ssl)
        should_exit = await super().on_tick(counter)  # it renews the default headers
        if self.drain.draining:
            self._close_connections_after_answers()
        if self.drain.over(time.monotonic()):
            self.should_exit = True
        return should_exit or self.should_exit


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
