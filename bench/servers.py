"""Starting what the scenarios measure: tritonop's Triton, and the FastAPI baseline.

Both run as children of the benchmark process, on free local ports, and are stopped
when their ``with`` block ends, so every comparison runs in one process tree.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tritonop.resources import Resource, parse_resource
from tritonop.runtime.local import Ports, TritonServer
from tritonop.runtime.serve import start_local

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports() -> Ports:
    return Ports(free_port(), free_port(), free_port())


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, mappings merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["spec.stages.encoder.instances=2"]`` -> the nested mapping it stands for."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep or not path:
            raise ValueError(f"--set wants PATH=VALUE, got {assignment!r}")
        node: dict[str, Any] = {}
        leaf = node
        keys = path.split(".")
        for key in keys[:-1]:
            leaf = leaf.setdefault(key, {})
        leaf[keys[-1]] = yaml.safe_load(raw)
        overrides = deep_merge(overrides, node)
    return overrides


def load_body(example: Path) -> dict[str, Any]:
    """The one resource document in an example YAML file."""
    documents = [d for d in yaml.safe_load_all(Path(example).read_text()) if d]
    if len(documents) != 1:
        raise ValueError(f"{example}: the benchmark wants exactly one resource")
    return documents[0]


def bench_resource(example: Path, overrides: Mapping[str, Any] | None = None,
                   *, corpus: Path | None = None) -> Resource:
    """The example resource as benchmarked: response cache off, then ``overrides``.

    The cache is off because the load generator repeats queries, and answers from the
    cache would measure the cache, not the pipeline (the baselines have none).
    """
    body = deep_merge(load_body(example), {"spec": {"cache": {"enabled": False}}})
    body = deep_merge(body, overrides or {})
    if corpus is not None:
        body["spec"]["corpus"]["source"] = str(corpus)
    return parse_resource(body, Path(example).parent.resolve())


@contextmanager
def triton(resources: list[Resource], artifacts_root: Path, workdir: Path) -> Iterator[
        TritonServer]:
    """Prepare artifacts (cached), render, start a ready ``tritonserver``; stop it after."""
    server = start_local(resources, artifacts_root, workdir, free_ports(), progress=False)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def triton_repository(repository: Path, workdir: Path) -> Iterator[TritonServer]:
    """A ``tritonserver`` over an already written model repository."""
    server = TritonServer(repository, workdir, free_ports()).start()
    try:
        yield server
    finally:
        server.stop()


def stub_processes(server: TritonServer, model: str) -> list[Any]:
    """The Python-backend stub processes (one per instance) of ``model``."""
    import psutil

    assert server.process is not None
    marker = f"/{model}/1/model.py"
    found = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if any(marker in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def cpu_seconds(server: TritonServer) -> Any:
    """A function giving the CPU seconds used so far by tritonserver and its stubs."""
    import psutil

    assert server.process is not None
    root = psutil.Process(server.process.pid)

    def seconds() -> float:
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    return seconds


def own_cpu_seconds() -> float:
    """CPU seconds used so far by this process (the load generator)."""
    times = os.times()
    return times.user + times.system


def triton_version(server: TritonServer) -> str:
    with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=10) as response:
        return str(json.loads(response.read()).get("version", "?"))


def model_stats(server: TritonServer) -> dict[str, dict[str, Any]]:
    """Per-model execution counts and mean time per stage (ms), from Triton's statistics."""
    url = f"http://{server.http_url}/v2/models/stats"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    stats = {}
    for model in body["model_stats"]:
        inference = model["inference_stats"]
        done = int(inference["success"]["count"])
        if not done:
            continue
        stats[model["name"]] = {
            "inferences": int(model["inference_count"]),
            "executions": int(model["execution_count"]),
            "requests": done,
            **{f"{part}_ms": round(inference[part]["ns"] / max(done, 1) / 1e6, 3)
               for part in STAGE_PARTS},
            **{f"{part}_ns": int(inference[part]["ns"]) for part in STAGE_PARTS},
        }
    return stats


STAGE_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


def stats_delta(before: dict[str, dict[str, Any]],
                after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Between two snapshots: executions, inferences, rows per execution, and the mean
    milliseconds a request spent queued and computing in each model."""
    delta = {}
    for name, now in after.items():
        was = before.get(name, {})
        inferences = now["inferences"] - was.get("inferences", 0)
        executions = now["executions"] - was.get("executions", 0)
        requests = now["requests"] - was.get("requests", 0)
        if executions:
            delta[name] = {"inferences": inferences, "executions": executions,
                           "mean_batch": round(inferences / executions, 2),
                           **{f"{part}_ms": round((now[f"{part}_ns"] - was.get(f"{part}_ns", 0))
                                                  / max(requests, 1) / 1e6, 3)
                              for part in STAGE_PARTS}}
    return delta


@contextmanager
def fastapi_baseline(model_dir: Path, index_dir: Path, *, workers: int, threads: int,
                     workdir: Path, timeout: float = 300.0) -> Iterator[str]:
    """Run ``bench.baseline_service`` under uvicorn; yields its search URL."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, BENCH_MODEL_DIR=str(model_dir), BENCH_INDEX_DIR=str(index_dir),
               BENCH_TORCH_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    log_path = workdir / f"uvicorn-{workers}w.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.baseline_service:app",
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
             "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_workers(f"http://127.0.0.1:{port}/health", workers, process, log_path,
                          timeout)
        yield f"http://127.0.0.1:{port}/search"
    finally:
        _stop_group(process)


def _wait_for_workers(url: str, workers: int, process: subprocess.Popen[bytes],
                      log_path: Path, timeout: float) -> None:
    """Until ``workers`` distinct worker processes have answered (each loads the model)."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            request = urllib.request.Request(url, headers={"Connection": "close"})
            with urllib.request.urlopen(request, timeout=5) as response:
                seen.add(int(json.loads(response.read())["pid"]))
            if len(seen) >= workers:
                return
            time.sleep(0.05)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    _stop_group(process)
    raise RuntimeError(f"uvicorn with {workers} workers: only {len(seen)} answered in "
                       f"{timeout:.0f} s; log: {log_path}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
