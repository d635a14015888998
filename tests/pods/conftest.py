"""The pod tier: rendered pods run as a kubelet would run them (tests/support/podrunner.py).

Needs root, ``unshare``, ``nsenter``, ``setpriv`` and ``ip``; without them every test here
is skipped with the reason. Pods run one test at a time, each in its own network
namespace. Start-to-Ready times are written to ``<pytest tmp>/pod-timings.txt`` and
printed at the end of the session (``-rA`` or ``-s`` shows them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.podrunner import OtherPod, PodRunner, SecretData, can_run_pods
from tritonop.render.kubernetes import render_children
from tritonop.resources import Resource, parse_resource

REASON = can_run_pods()
TIMINGS: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    if REASON:
        for item in items:
            if "tests/pods/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=REASON))


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "pods: start to Ready under the pod runner")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")


def _pod_starter(folder: Path) -> Iterator[Any]:
    """Start resources' rendered pods under ``folder``; all are stopped at the end."""
    pods: list[PodRunner] = []

    def start(resource: Resource, *, claims: dict[str, Path] | None = None,
              secrets: dict[str, SecretData] | None = None,
              name: str = "pod", patch: Any = None) -> PodRunner:
        children = render_children(resource)
        deployment = next(c for c in children if c["kind"] == "Deployment")
        config_maps = {c["metadata"]["name"]: c["data"] for c in children
                       if c["kind"] == "ConfigMap"}
        if patch is not None:
            patch(deployment, config_maps)
        pod = PodRunner(deployment, config_maps, folder / f"{name}-{len(pods)}",
                        claims=claims, secrets=secrets, name=name,
                        namespace=resource.namespace)
        pods.append(pod)
        return pod.start()

    try:
        yield start
    finally:
        stop_all(pods)


def stop_all(pods: list[PodRunner]) -> None:
    """Stop pods at once, as a node stops them, and with no drain: for teardowns, which
    check nothing about how the pods stop (the gateway would drain for 10 s)."""
    with ThreadPoolExecutor(max(1, len(pods))) as pool:
        for stopped in [pool.submit(pod.stop, drain=False) for pod in pods]:
            stopped.result()


@pytest.fixture
def run_pod(tmp_path) -> Iterator[Any]:
    """Start a resource's rendered pod; every pod is stopped at teardown, pass or fail."""
    yield from _pod_starter(tmp_path)


@pytest.fixture(scope="module")
def module_pods(tmp_path_factory) -> Iterator[Any]:
    """``run_pod`` for pods that a module's tests share (stopped when the module ends)."""
    yield from _pod_starter(tmp_path_factory.mktemp("pods"))


@pytest.fixture
def other_pod() -> Iterator[OtherPod]:
    """Another pod's network namespace (no NetworkPolicy), routed to pods with ``reach``."""
    with OtherPod() as other:
        yield other


def record(name: str, seconds: float) -> None:
    TIMINGS[name] = seconds


def resource(body: dict[str, Any]) -> Resource:
    return parse_resource(json.loads(json.dumps(body)))
