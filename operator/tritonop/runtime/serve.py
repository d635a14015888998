"""``tritonop serve``: prepare, render, start Triton, print how to call it, stop on Ctrl-C."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path

from tritonop.artifacts.prepare import prepare
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import gateway_config
from tritonop.gateway.server import GatewayThread
from tritonop.render.repository import render_repository, write_repository
from tritonop.render.server_args import ADMIN_KEY_ENV, restricted_api_args
from tritonop.resources import Resource
from tritonop.runtime.local import (
    LOOPBACK,
    Ports,
    ServerError,
    TritonServer,
    connect_host,
    is_loopback,
)
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec, quantity_bytes

log = logging.getLogger(__name__)

# What the printed calls send when the gateway needs a key: the variable, never the key.
KEY_HEADER = '-H "Authorization: Bearer $TRITONOP_API_KEY"'


def cache_bytes(resources: list[Resource]) -> int:
    """One server-wide response cache, sized as the sum of what the resources ask for."""
    return sum(
        quantity_bytes(r.spec.cache.size)
        for r in resources
        if isinstance(r.spec, EmbeddingSearchSpec) and r.spec.cache.enabled
    )


def start_local(
    resources: list[Resource],
    artifacts_root: Path,
    workdir: Path,
    ports: Ports,
    *,
    progress: bool = True,
    host: str = LOOPBACK,
    models_cache: Path | None = None,
) -> TritonServer:
    """Prepare artifacts, render the repository into ``workdir`` and start a ready server
    listening on ``host``.

    The repository is rendered from the resources as prepare pinned them (a remote model
    source at the revision prepare resolved), so it names the versions just built.
    """
    resources = prepare(resources, artifacts_root, progress=progress, models_cache=models_cache)
    repository = workdir / "model_repository"
    write_repository(render_repository(resources, str(artifacts_root)), repository)
    server = TritonServer(repository, workdir, ports, cache_bytes=cache_bytes(resources),
                          address=host, extra_args=tuple(control_api_args(host)))
    return server.start()


def control_api_args(host: str) -> list[str]:
    """Triton's control APIs closed to the network when it listens beyond loopback.

    Nothing ``tritonop serve`` offers needs them, and the repository API loads code: they
    need ``$TRITONOP_TRITON_ADMIN_KEY`` (header ``triton-admin-key``), or, without one, a
    random key that is never shown, which closes them.
    """
    if is_loopback(host):
        return []
    key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
    if any(c in key for c in ",:="):
        raise ServerError(f"{ADMIN_KEY_ENV}: a key must not contain ',', ':' or '=' "
                          "(Triton splits its flag there)")
    return restricted_api_args(key)


def shown_host(host: str) -> str:
    """The host printed in the examples: ``localhost`` wherever it reaches the server."""
    return "localhost" if is_loopback(host) else connect_host(host)


def openai_usage(resources: list[Resource], port: int, host: str = LOOPBACK,
                 keyed: bool = False) -> list[str]:
    """Working ``curl`` and ``openai`` client calls through the gateway.

    With a key, the calls read it from ``$TRITONOP_API_KEY``: the key itself is never
    printed (terminals are logged and shared).
    """
    base = f"http://{shown_host(host)}:{port}/v1"
    auth = f" {KEY_HEADER}" if keyed else ""
    api_key = "os.environ['TRITONOP_API_KEY']" if keyed else "'none'"
    lines = [f"OpenAI-compatible API  {base}  (GET {base}/models)"]
    if keyed:
        lines.append("Every call needs the key; these read it from $TRITONOP_API_KEY.")
    lines.append("")
    for resource in resources:
        name = resource.name
        if isinstance(resource.spec, EmbeddingSearchSpec):
            search = json.dumps({"model": name, "text": "europe climate change storm",
                                 "num_results": 5})
            embed = json.dumps({"model": name, "input": ["hello world", "bonjour"]})
            lines += [
                f"{resource.kind} {name} through the gateway:",
                f"  curl -s {base}/search -H 'Content-Type: application/json'{auth} \\",
                f"    -d '{search}'",
                f"  curl -s {base}/embeddings -H 'Content-Type: application/json'{auth} \\",
                f"    -d '{embed}'",
                "",
            ]
        elif isinstance(resource.spec, LLMServiceSpec):
            chat = json.dumps({"model": name, "max_tokens": 32, "temperature": 0,
                               "messages": [{"role": "user",
                                             "content": "What is the capital of France?"}]})
            lines += [
                f"{resource.kind} {name} through the gateway:",
                f"  curl -s {base}/chat/completions -H 'Content-Type: application/json'"
                f"{auth} \\",
                f"    -d '{chat}'",
                "  python -c \"import os; from openai import OpenAI; "
                f"c = OpenAI(base_url='{base}', api_key={api_key}); "
                f"r = c.chat.completions.create(model='{name}', max_tokens=32, temperature=0, "
                "messages=[{'role': 'user', 'content': 'What is the capital of France?'}]); "
                "print(r.choices[0].message.content)\"",
                "",
            ]
    return lines


def usage(resources: list[Resource], ports: Ports, openai_port: int | None = None,
          host: str = LOOPBACK, keyed: bool = False) -> str:
    """Endpoints and one working request per resource, for a person at a terminal."""
    local = shown_host(host)
    lines = [
        "Triton is ready.",
        f"  HTTP     http://{local}:{ports.http}",
        f"  gRPC     {local}:{ports.grpc}",
        f"  metrics  http://{local}:{ports.metrics}/metrics",
        "",
    ]
    for resource in resources:
        if isinstance(resource.spec, EmbeddingSearchSpec):
            body = json.dumps({"text": "europe climate change storm", "num_results": 5})
            lines += [
                f"{resource.kind} {resource.name}: search",
                f"  curl -s {local}:{ports.http}/v2/models/{resource.name}/generate \\",
                f"    -d '{body}'",
                "embeddings only:",
                f"  curl -s {local}:{ports.http}/v2/models/{resource.name}_embedding/generate"
                " -d '{\"text\": \"hello world\"}'",
                "",
            ]
        elif isinstance(resource.spec, LLMServiceSpec):
            once = json.dumps({"text_input": "What is the capital of France?",
                               "max_tokens": 32, "temperature": 0})
            stream = json.dumps({"text_input": "Write a haiku about batching.",
                                 "max_tokens": 64, "temperature": 0.8, "top_p": 0.95,
                                 "stream": True})
            lines += [
                f"{resource.kind} {resource.name}: generate",
                f"  curl -s {local}:{ports.http}/v2/models/{resource.name}/generate \\",
                f"    -d '{once}'",
                "stream (server-sent events):",
                f"  curl -N {local}:{ports.http}/v2/models/{resource.name}/generate_stream \\",
                f"    -d '{stream}'",
                "",
            ]
    if openai_port is not None:
        lines += openai_usage(resources, openai_port, host, keyed)
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def warn_if_exposed(host: str, gateway: bool, keyed: bool) -> None:
    """Say on stderr what listening beyond this machine opens, and to whom."""
    if is_loopback(host):
        return
    log.warning("listening on %s: Triton's own HTTP and gRPC ports take no key for "
                "inference (anyone who can reach this machine can use the models); its "
                "control APIs need $%s", host, ADMIN_KEY_ENV)
    if gateway and not keyed:
        log.warning("the OpenAI-compatible gateway on %s has no API key: anyone who can "
                    "reach it can use the models (set TRITONOP_API_KEY or --api-key)", host)


def serve(
    resources: list[Resource],
    artifacts_root: Path,
    ports: Ports,
    workdir: Path | None = None,
    openai_port: int | None = 8080,
    host: str = LOOPBACK,
    api_key: str | None = None,
    models_cache: Path | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM; returns tritonserver's exit code.

    With ``openai_port``, the OpenAI-compatible gateway runs on a thread of this process
    beside tritonserver, as it runs in a container beside Triton in a cluster. Both listen
    on ``host``; with ``api_key`` the gateway needs it (the client ``default``).
    """
    warn_if_exposed(host, openai_port is not None, api_key is not None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tritonop-serve-") as scratch:
        server = start_local(resources, artifacts_root, workdir or Path(scratch), ports,
                             host=host, models_cache=models_cache)
        gateway = None
        try:
            if openai_port is not None:
                # A resource's spec.api.auth names a Secret mounted in a pod; here the key
                # is --api-key's.
                config = dataclasses.replace(gateway_config(resources), api_keys=None)
                gateway = GatewayThread(
                    config, TritonAddress(server.grpc_url, server.http_url), openai_port,
                    host=host, api_key=api_key).start()
            print(usage(resources, ports, openai_port, host, keyed=gateway is not None
                        and api_key is not None), flush=True)
            log.info("ready in %.1f s; server log: %s", time.monotonic() - started,
                     server.log_path)
            while not stop.wait(0.5):
                if server.process is None or server.process.poll() is not None:
                    log.error("tritonserver exited:\n%s", server.log_tail())
                    return 1
            print("\nStopping Triton (finishing in-flight requests)...", flush=True)
        finally:
            if gateway is not None:
                gateway.stop()
            code = server.stop()
    return code or 0
