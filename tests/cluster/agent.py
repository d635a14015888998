"""The README's quickstart on a node whose pods really run: the node agent's lifetime and
the README's commands, shared by the quickstart modules."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.cluster import ROOT, ControlPlane, Operator, wait_for
from tests.support.node_agent import NodeAgent

SYSTEM = "tritonop-system"
KWOK_NODES = ("kwok-node-0", "kwok-node-1")
SEED_REQUEST = {"text": "europe climate change storm", "num_results": 5}


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


def news_pods(cluster: ControlPlane, namespace: str = "default") -> list[dict[str, Any]]:
    return [p for p in pods(cluster, namespace, "app.kubernetes.io/instance=news")
            if not p["metadata"].get("deletionTimestamp")]


def ready_endpoints(cluster: ControlPlane, namespace: str = "default", service: str = "news"
                    ) -> tuple[list[str], int]:
    """The ready addresses of a Service's EndpointSlices, and its gateway port."""
    slices = cluster.get_json("endpointslices", "-n", namespace, "-l",
                              f"kubernetes.io/service-name={service}")["items"]
    addresses = sorted(a for s in slices for e in s.get("endpoints") or []
                       if e["conditions"].get("ready") for a in e["addresses"])
    ports = {p["port"] for s in slices for p in s.get("ports") or [] if p["name"] == "openai"}
    return addresses, ports.pop() if len(ports) == 1 else 0


def reference_top5(node: NodeAgent, pod_name: str, namespace: str = "default") -> list[int]:
    """The seed's top 5 by sentence-transformers and numpy over the pod's own index."""
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    from tritonop.artifacts.sources import locate
    from tritonop.resources import iter_resources

    (news,) = iter_resources([ROOT / "examples" / "news-search.yaml"])
    (index,) = (node.pod(namespace, pod_name).runner.volumes["artifacts"] / "news").glob(
        "*/index")
    matrix = load_file(str(index / "embeddings.safetensors"))["embeddings"]
    query = SentenceTransformer(str(locate(news.spec.model.source)), device="cpu").encode(
        SEED_REQUEST["text"], normalize_embeddings=True)
    return np.argsort(-(matrix @ query), kind="stable")[:5].tolist()


def assert_every_endpoint_answers(cluster: ControlPlane, expected_pods: int,
                                  namespace: str = "default") -> list[int]:
    """The seed's search through each ready endpoint of the Service; the ids they agree on."""
    def listed() -> tuple[list[str], int] | None:
        found = ready_endpoints(cluster, namespace)
        return found if len(found[0]) == expected_pods else None

    addresses, port = wait_for(listed, 60, f"{expected_pods} ready endpoints")
    ips = sorted(p["status"]["podIP"] for p in news_pods(cluster, namespace) if ready(p))
    assert addresses == ips and port == 8080
    answers = [post(f"http://{ip}:{port}/v1/search", {"model": "news", **SEED_REQUEST})
               for ip in addresses]
    ids = [[hit["id"] for hit in answer["data"]] for answer in answers]
    assert all(i == ids[0] and len(i) == 5 for i in ids), ids
    return ids[0]


def record_figure(record: Callable[[str, object], None], name: str, seconds: float,
                  load_start: float) -> None:
    """A time for docs/benchmarks.md (`python -m bench.quickstart <junit xml>`), with the
    machine's load average (1 min) when it started and ended: this machine is shared."""
    record(f"{name}_seconds", round(seconds, 1))
    record(f"{name}_load_average", f"{load_start:.1f} {os.getloadavg()[0]:.1f}")
