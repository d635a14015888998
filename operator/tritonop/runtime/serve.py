"""``tritonop serve``: prepare, render, start Triton, print how to call it, stop on Ctrl-C."""

from __future__ import annotations

import json
import logging
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
from tritonop.resources import Resource
from tritonop.runtime.local import Ports, TritonServer
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec, quantity_bytes

log = logging.getLogger(__name__)


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
) -> TritonServer:
    """Prepare artifacts, render the repository into ``workdir`` and start a ready server."""
    prepare(resources, artifacts_root, progress=progress)
    repository = workdir / "model_repository"
    write_repository(render_repository(resources, str(artifacts_root)), repository)
    server = TritonServer(repository, workdir, ports, cache_bytes=cache_bytes(resources))
    return server.start()


def openai_usage(resources: list[Resource], port: int) -> list[str]:
    """Working ``curl`` and ``openai`` client calls through the gateway."""
    base = f"http://localhost:{port}/v1"
    lines = [f"OpenAI-compatible API  {base}  (GET {base}/models)", ""]
    for resource in resources:
        name = resource.name
        if isinstance(resource.spec, EmbeddingSearchSpec):
            search = json.dumps({"model": name, "text": "europe climate change storm",
                                 "num_results": 5})
            embed = json.dumps({"model": name, "input": ["hello world", "bonjour"]})
            lines += [
                f"{resource.kind} {name} through the gateway:",
                f"  curl -s {base}/search -H 'Content-Type: application/json' -d '{search}'",
                f"  curl -s {base}/embeddings -H 'Content-Type: application/json' -d '{embed}'",
                "",
            ]
        elif isinstance(resource.spec, LLMServiceSpec):
            chat = json.dumps({"model": name, "max_tokens": 32, "temperature": 0,
                               "messages": [{"role": "user",
                                             "content": "What is the capital of France?"}]})
            lines += [
                f"{resource.kind} {name} through the gateway:",
                f"  curl -s {base}/chat/completions -H 'Content-Type: application/json' \\",
                f"    -d '{chat}'",
                "  python -c \"from openai import OpenAI; "
                f"c = OpenAI(base_url='{base}', api_key='none'); "
                f"r = c.chat.completions.create(model='{name}', max_tokens=32, temperature=0, "
                "messages=[{'role': 'user', 'content': 'What is the capital of France?'}]); "
                "print(r.choices[0].message.content)\"",
                "",
            ]
    return lines


def usage(resources: list[Resource], ports: Ports, openai_port: int | None = None) -> str:
    """Endpoints and one working request per resource, for a person at a terminal."""
    lines = [
        "Triton is ready.",
        f"  HTTP     http://localhost:{ports.http}",
        f"  gRPC     localhost:{ports.grpc}",
        f"  metrics  http://localhost:{ports.metrics}/metrics",
        "",
    ]
    for resource in resources:
        if isinstance(resource.spec, EmbeddingSearchSpec):
            body = json.dumps({"text": "europe climate change storm", "num_results": 5})
            lines += [
                f"{resource.kind} {resource.name}: search",
                f"  curl -s localhost:{ports.http}/v2/models/{resource.name}/generate \\",
                f"    -d '{body}'",
                "embeddings only:",
                f"  curl -s localhost:{ports.http}/v2/models/{resource.name}_embedding/generate"
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
                f"  curl -s localhost:{ports.http}/v2/models/{resource.name}/generate \\",
                f"    -d '{once}'",
                "stream (server-sent events):",
                f"  curl -N localhost:{ports.http}/v2/models/{resource.name}/generate_stream \\",
                f"    -d '{stream}'",
                "",
            ]
    if openai_port is not None:
        lines += openai_usage(resources, openai_port)
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def serve(
    resources: list[Resource],
    artifacts_root: Path,
    ports: Ports,
    workdir: Path | None = None,
    openai_port: int | None = 8080,
) -> int:
    """Serve until SIGINT or SIGTERM; returns tritonserver's exit code.

    With ``openai_port``, the OpenAI-compatible gateway runs on a thread of this process
    beside tritonserver, as it runs in a container beside Triton in a cluster.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tritonop-serve-") as scratch:
        server = start_local(resources, artifacts_root, workdir or Path(scratch), ports)
        gateway = None
        try:
            if openai_port is not None:
                gateway = GatewayThread(
                    gateway_config(resources),
                    TritonAddress(f"localhost:{ports.grpc}", f"localhost:{ports.http}"),
                    openai_port, host="0.0.0.0").start()
            print(usage(resources, ports, openai_port), flush=True)
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
