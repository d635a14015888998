"""Small helpers for the cluster tier: resources to apply and waits on what the server says."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import yaml

from tests.support.cluster import ROOT, ControlPlane, wait_for

API = "serving.tritonop.dev/v1alpha1"
PLURAL = {"EmbeddingSearch": "embeddingsearches", "LLMService": "llmservices"}
# One example per kind, those that run here: examples/mistral.yaml needs a GPU and the Hub.
EXAMPLES = {doc["kind"]: doc for path in sorted((ROOT / "examples").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text())
            if doc and not doc["spec"].get("gpus")}


def example(kind: str, name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """The example resource of ``kind`` (examples/), renamed, with ``spec`` merged on top."""
    resource = copy.deepcopy(EXAMPLES[kind])
    resource["metadata"] = {"name": name, "namespace": namespace}
    resource["spec"].update(spec)
    return resource


def get(cluster: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", PLURAL.get(kind, kind), name, "-n", namespace, "-o", "json",
                             check=False)
    if result.returncode != 0:
        if "NotFound" in result.stderr:
            return None
        raise AssertionError(result.stderr)
    return json.loads(result.stdout)


def status(cluster: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any]:
    return (get(cluster, kind, name, namespace) or {}).get("status") or {}


def wait_status(cluster: ControlPlane, kind: str, name: str, namespace: str,
                check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
                ) -> dict[str, Any]:
    """The resource, once ``check`` holds for it; the last status is in the timeout error."""
    last: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        nonlocal last
        last = get(cluster, kind, name, namespace) or {}
        return last if check(last) else None

    try:
        return wait_for(probe, timeout, f"{kind} {name}: {what}", interval=0.5)
    except TimeoutError as err:
        raise AssertionError(f"{err}; status: {json.dumps(last.get('status'), indent=1)}"
                             ) from None


def ready_at_generation(resource: dict[str, Any]) -> bool:
    """Phase Ready, reported for the generation the server holds."""
    status = resource.get("status") or {}
    return (status.get("phase") == "Ready" and
            status.get("observedGeneration") == resource["metadata"]["generation"])


def wait_ready(cluster: ControlPlane, kind: str, name: str, namespace: str,
               timeout: float = 90) -> dict[str, Any]:
    return wait_status(cluster, kind, name, namespace, ready_at_generation,
                       "Ready at its current generation", timeout)


def condition(resource: dict[str, Any], kind: str) -> dict[str, Any]:
    for entry in (resource.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return entry
    return {}


def children(cluster: ControlPlane, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    """Every object labelled as ``name``'s, by kind (lowercase plural)."""
    kinds = ("configmaps,serviceaccounts,services,deployments,replicasets,pods,"
             "poddisruptionbudgets,horizontalpodautoscalers,networkpolicies")
    items = cluster.get_json(kinds, "-n", namespace, "-l",
                             f"app.kubernetes.io/instance={name}")["items"]
    found: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        found.setdefault(item["kind"], []).append(item)
    return found


def delete(cluster: ControlPlane, kind: str, name: str, namespace: str,
           wait: bool = True) -> None:
    cluster.kubectl("delete", PLURAL.get(kind, kind), name, "-n", namespace,
                    "--ignore-not-found", f"--wait={str(wait).lower()}", "--timeout=60s")


def events(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """Events whose involved object is ``name`` (any kind)."""
    return cluster.get_json("events", "-n", namespace, "--field-selector",
                            f"involvedObject.name={name}")["items"]


def sample(seconds: float, probe: Callable[[], Any], interval: float = 0.2) -> list[Any]:
    """``probe()`` every ``interval`` for ``seconds``: what a watcher would have seen."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(probe())
        time.sleep(interval)
    return seen


def volume_for(cluster: ControlPlane, name: str, namespace: str) -> None:
    """A PersistentVolume reserved for the operator's claim ``<name>-artifacts``."""
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{name}-pv"},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                 "hostPath": {"path": f"/var/tmp/{name}"},
                 "claimRef": {"namespace": namespace, "name": f"{name}-artifacts"}}})
