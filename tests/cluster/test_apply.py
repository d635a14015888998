"""Server-side apply on a real server: fields the operator stops sending are really released."""

from __future__ import annotations

import threading

from tests.cluster.conftest import NAMESPACE
from tests.cluster.helpers import example, wait_ready, wait_status
from tests.support.cluster import ControlPlane, wait_for

ES = "EmbeddingSearch"


def merge_patch(cluster: ControlPlane, name: str, patch: str) -> None:
    cluster.kubectl("patch", "esearch", name, "-n", NAMESPACE, "--type=merge", "-p", patch)


def test_autoscaling_on_and_off_never_drops_the_replicas(cluster, live_operator):
    cluster.apply(example(ES, "scaled", NAMESPACE, replicas=3))
    wait_ready(cluster, ES, "scaled", NAMESPACE)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # what the Deployment asked for, every 0.2 s
        while not stop.wait(0.2):
            result = cluster.kubectl("get", "deployment", "scaled-triton", "-n", NAMESPACE,
                                     "-o", "jsonpath={.spec.replicas}", check=False)
            if result.returncode == 0 and result.stdout:
                seen.append(int(result.stdout))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        merge_patch(cluster, "scaled",
                    '{"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}}')
        wait_for(lambda: cluster.kubectl("get", "hpa", "scaled-triton", "-n", NAMESPACE,
                                         check=False).returncode == 0, 60, "the HPA")
        # Long enough for the HPA controller (5 s sync here) to act on a dropped count.
        wait_ready(cluster, ES, "scaled", NAMESPACE)
        wait_for(lambda: len(seen) > 60, 30, "12 s of samples")
        merge_patch(cluster, "scaled", '{"spec": {"autoscaling": null}}')
        wait_for(lambda: cluster.kubectl("get", "hpa", "scaled-triton", "-n", NAMESPACE,
                                         check=False).returncode != 0, 60, "the HPA removed")
        mark = len(seen)
        wait_for(lambda: len(seen) > mark + 25, 30, "5 s of samples")
    finally:
        stop.set()
        watcher.join()
    assert seen and min(seen) >= 3, f"spec.replicas went down to {min(seen)}: {seen}"
    resource = wait_ready(cluster, ES, "scaled", NAMESPACE)
    assert resource["status"]["readyReplicas"] == 3


def test_prepare_none_removes_the_init_container(cluster, live_operator):
    """perPod -> none: the init container the operator stops sending is really released."""
    claim = {"persistentVolumeClaim": {"claimName": "artifacts"}}
    cluster.apply(example(ES, "prepared", NAMESPACE, artifacts={**claim, "prepare": "perPod"}))

    def init_containers() -> list[str]:
        deployment = cluster.get_json("deployment", "prepared-triton", "-n", NAMESPACE)
        return [c["name"] for c in deployment["spec"]["template"]["spec"].get(
            "initContainers") or []]

    wait_for(lambda: cluster.kubectl("get", "deployment", "prepared-triton", "-n", NAMESPACE,
                                     check=False).returncode == 0, 60, "the Deployment")
    assert init_containers()
    cluster.apply(example(ES, "prepared", NAMESPACE, artifacts={**claim, "prepare": "none"}))
    wait_status(cluster, ES, "prepared", NAMESPACE,
                lambda r: (r.get("status") or {}).get("observedGeneration") == 2,
                "generation 2 observed")
    wait_for(lambda: init_containers() == [], 30, "the init container released")
