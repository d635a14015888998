"""The README's quickstart on a node whose pods really run: the node agent's lifetime and
the README's commands, shared by the quickstart modules."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.cluster import ROOT, ControlPlane, Operator, wait_for
from tests.support.node_agent import NodeAgent

SYSTEM = "tritonop-system"
KWOK_NODES = ("kwok-node-0", "kwok-node-1")


def kubectl(cluster: ControlPlane, command: str, timeout: float = 120) -> str:
    """A README command line (``kubectl ...``), run from the repository root as written."""
    argv = command.split()
    assert argv[0] == "kubectl"
    result = subprocess.run([cluster.binary("kubectl"),
                             f"--kubeconfig={cluster.admin_kubeconfig}", *argv[1:]],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def pods(cluster: ControlPlane, namespace: str, selector: str) -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@contextmanager
def agent_node(cluster: ControlPlane, operator: Operator, workdir: Path) -> Iterator[NodeAgent]:
    """The node agent, alone schedulable; the host-run operator stopped meanwhile (the next
    test's ``live_operator`` starts it again), deploy/'s Deployment back at 0 at the end.

    The quickstart starts as a new user's cluster does, with no resources: those earlier
    tests left are deleted first (their children go by owner references).
    Left in place, the in-cluster operator would prepare each of them again on this node
    (it reads their corpora from its image's examples folder, not the test folders the
    host-run operator read, so their artifacts versions differ): in CI, ten real prepare
    pods at once on two cores, and the quickstart's own Job starved past its timeout.
    """
    clear_resources(cluster)
    operator.stop()
    for name in KWOK_NODES:
        cluster.kubectl("cordon", name)
    agent = NodeAgent(cluster, workdir).start()
    try:
        yield agent
    finally:
        cluster.kubectl("delete", "esearch,llm", "--all", "--all-namespaces", "--timeout=180s",
                        check=False)
        cluster.kubectl("scale", "deployment/tritonop", "-n", SYSTEM, "--replicas=0",
                        check=False)
        try:
            wait_for(lambda: not cluster.get_json("pods", "--all-namespaces", "--field-selector",
                                                  f"spec.nodeName={agent.name}")["items"],
                     180, "the pods on the agent's node to go")
        finally:
            agent.stop()
            for name in KWOK_NODES:
                cluster.kubectl("uncordon", name, check=False)


def clear_resources(cluster: ControlPlane) -> None:
    """Delete every EmbeddingSearch and LLMService; the finalizers of those whose operator
    no longer runs (an earlier test's namespaced one) are removed as an admin would."""
    cluster.kubectl("delete", "esearch,llm", "--all", "--all-namespaces", "--wait=false")

    def remaining() -> list[dict[str, Any]]:
        return cluster.get_json("esearch,llm", "--all-namespaces")["items"]

    for item in remaining():
        meta = item["metadata"]
        cluster.kubectl("patch", item["kind"].lower(), meta["name"], "-n", meta["namespace"],
                        "--type=merge", "-p", '{"metadata": {"finalizers": null}}', check=False)
    wait_for(lambda: not remaining(), 120, "earlier tests' resources to go")


def operator_pod(cluster: ControlPlane) -> dict[str, Any] | None:
    found = pods(cluster, SYSTEM, "app.kubernetes.io/name=tritonop")
    return found[0] if len(found) == 1 else None
