"""Helpers for tests that talk to a real tritonserver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonop.render.repository import artifact_dirs
from tritonop.resources import Resource, parse_resource
from tritonop.runtime.local import Ports, TritonServer
from tritonop.runtime.serve import start_local

API = "serving.tritonop.dev/v1alpha1"


@contextmanager
def serving(args: list[str], timeout: float = 300, env: Mapping[str, str] | None = None
            ) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``tritonop serve ARGS`` until it says it serves; kill it at exit if still running.

    Yields the process and what it printed up to its ready line, so that a test can
    check the printed examples and then stop it the way a user does (Ctrl-C). ``env``:
    the process's environment (default: this one's).
    """
    command = [sys.executable, "-m", "tritonop.cli", "serve", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**(os.environ if env is None else env),
                                               "PYTHONUNBUFFERED": "1"})
    try:
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline() if process.stdout else ""
            assert line, "serve exited early:\n" + "".join(output)
            output.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        yield process, "".join(output)
    finally:
        if process.poll() is None:
            # Ctrl-C first: serve stops tritonserver, which runs in a session of its own and
            # would outlive a killed serve.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


# A tiny corpus that the tiny servers of the tests search.
TINY_TEXTS = [
    "severe storm warning for northern europe", "heatwave and drought in the south",
    "football club wins the cup", "new python release with faster startup",
    "linux kernel adds a scheduler", "jazz festival opens downtown",
    "stock markets fall on rate fears", "flooding closes mountain roads",
    "climate summit ends without a deal", "text editor for programmers",
    "database engine with SQL support", "wind farm opens off the coast",
]


# The tiny texts as JSONL records with fields to filter on (some missing, one null).
FILTER_FIELDS = {"lang": "string", "year": "number", "draft": "boolean", "tags": "stringList"}
FILTER_RECORDS = [
    {"text": text, **({"lang": ("en", "de", "fr")[i % 3]} if i != 5 else {}),
     "year": None if i == 7 else 2015 + i, "draft": i % 4 == 0,
     "tags": [("news", "tech", "weather")[i % 3]] + (["europe"] if i % 2 else [])}
    for i, text in enumerate(TINY_TEXTS)
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_to_close(sock: socket.socket) -> bytes:
    """Everything a server sends on ``sock`` until it closes it (a reset ends it too)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def embedding_search(name: str, corpus: Path, **spec: Any) -> Resource:
    """An EmbeddingSearch resource over ``corpus`` with spec overrides."""
    body = {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": name},
            "spec": {"corpus": {"source": str(corpus)}, **spec}}
    return parse_resource(body)


def seed_export(resource: Resource, artifacts_root: Path, exported: dict[str, Path]) -> None:
    """Copy an already exported encoder in place, so that preparing skips the export."""
    model_dir = Path(artifact_dirs(resource, str(artifacts_root))[0])
    if not model_dir.exists():
        shutil.copytree(exported[resource.spec.model.format], model_dir)


def post_json(url: str, body: dict[str, Any] | bytes, timeout: float = 300) -> tuple[int, Any]:
    """POST JSON; returns (HTTP status, decoded body) for errors too."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@dataclass
class RunningTriton:
    """A started server plus what the tests need to reach it."""

    server: TritonServer
    artifacts_root: Path
    resources: dict[str, Resource]

    @property
    def http(self) -> str:
        return f"http://{self.server.http_url}"

    def generate(self, model: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
        return post_json(f"{self.http}/v2/models/{model}/generate", body)

    def model_stats(self, model: str) -> dict[str, Any]:
        (stats,) = get_json(f"{self.http}/v2/models/{model}/stats")["model_stats"]
        return stats


@contextmanager
def running_triton(resources: list[Resource], artifacts_root: Path, workdir: Path
                   ) -> Iterator[RunningTriton]:
    """Prepare, render and serve ``resources`` on free ports; stop the server afterwards."""
    ports = Ports(free_port(), free_port(), free_port())
    server = start_local(resources, artifacts_root, workdir, ports, progress=False)
    try:
        yield RunningTriton(server, artifacts_root, {r.name: r for r in resources})
    finally:
        server.stop()


def served_embeddings(triton: RunningTriton, model: str, texts: list[str]) -> np.ndarray:
    """The embeddings ``<model>_embedding`` serves for ``texts``, one request each."""
    rows = []
    for text in texts:
        status, body = triton.generate(f"{model}_embedding", {"text": text})
        assert status == 200, body
        rows.append(body["embedding"])
    return np.array(rows, dtype=np.float32)
