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


def usage(resources: list[Resource], ports: Ports) -> str:
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
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def serve(
    resources: list[Resource],
    artifacts_root: Path,
    ports: Ports,
    workdir: Path | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM; returns tritonserver's exit code."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tritonop-serve-") as scratch:
        server = start_local(resources, artifacts_root, workdir or Path(scratch), ports)
        try:
            print(usage(resources, ports), flush=True)
            log.info("ready in %.1f s; server log: %s", time.monotonic() - started,
                     server.log_path)
            while not stop.wait(0.5):
                if server.process is None or server.process.poll() is not None:
                    log.error("tritonserver exited:\n%s", server.log_tail())
                    return 1
            print("\nStopping Triton (finishing in-flight requests)...", flush=True)
        finally:
            code = server.stop()
    return code or 0
