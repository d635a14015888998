"""The real operator's lifecycle on a real control plane: create, roll, repair, delete, restart.

Pods come from the real Deployment and ReplicaSet controllers, are placed by the real
scheduler on kwok nodes and reported Ready by kwok; children go away by the real garbage
collector. The operator holds only deploy/'s RBAC.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.cluster.conftest import CRD_NAMES, NAMESPACE
from tests.cluster.helpers import (
    children,
    delete,
    example,
    get,
    ready_at_generation,
    sample,
    wait_ready,
)
from tests.support.cluster import ROOT, ControlPlane, Operator, wait_for

ES = "EmbeddingSearch"
HASH = "serving.tritonop.dev/config-hash"
CHILD_KINDS = {"ConfigMap", "ServiceAccount", "Service", "Deployment", "NetworkPolicy"}


def template_hash(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["annotations"][HASH]


def ready_pods(cluster: ControlPlane, name: str, namespace: str = NAMESPACE) -> list[dict]:
    return [pod for pod in children(cluster, namespace, name).get("Pod", [])
            if not pod["metadata"].get("deletionTimestamp") and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in pod["status"].get("conditions", []))]


def deployment(cluster: ControlPlane, name: str, namespace: str = NAMESPACE) -> dict:
    return cluster.get_json("deployment", f"{name}-triton", "-n", namespace)


def test_create_makes_owned_children_and_ready_pods(cluster, live_operator):
    cluster.apply(example(ES, "life", NAMESPACE, replicas=2))
    resource = wait_ready(cluster, ES, "life", NAMESPACE)
    uid = resource["metadata"]["uid"]
    found = children(cluster, NAMESPACE, "life")
    assert CHILD_KINDS <= set(found)
    for kind in CHILD_KINDS:
        (child,) = found[kind]
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            ES, "life", uid, True), kind
    # The Deployment controller made one ReplicaSet, which made the pods kwok runs.
    (replica_set,) = found["ReplicaSet"]
    assert replica_set["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert len(ready_pods(cluster, "life")) == 2
    assert resource["status"]["readyReplicas"] == 2
    # The scale subresource reports what the operator published.
    scale = cluster.get_json("esearch", "life", "-n", NAMESPACE, "--subresource=scale")
    assert scale["status"]["replicas"] == 2
    assert "app.kubernetes.io/instance=life" in scale["status"]["selector"]
    cluster.kubectl("wait", "--for=condition=Available", "esearch/life", "-n", NAMESPACE,
                    "--timeout=5s")


def test_spec_change_rolls_the_pods_and_reports_the_new_generation(cluster, live_operator):
    cluster.apply(example(ES, "roll", NAMESPACE, replicas=2))
    before = wait_ready(cluster, ES, "roll", NAMESPACE)
    old_hash = template_hash(deployment(cluster, "roll"))
    changed = example(ES, "roll", NAMESPACE, replicas=2)
    changed["spec"]["search"] = {"defaultTopK": 5, "maxTopK": 50}
    cluster.apply(changed)
    generation = before["metadata"]["generation"] + 1

    def probe() -> tuple[dict, dict]:
        return get(cluster, ES, "roll", NAMESPACE), deployment(cluster, "roll")

    # Whenever the status claims Ready at the new generation, the new pods must be the ready
    # ones: observedGeneration never runs ahead of what was applied and rolled out.
    for resource, seen in sample(8, probe, interval=0.3):
        if ready_at_generation(resource) and resource["metadata"]["generation"] == generation:
            assert template_hash(seen) != old_hash
            assert seen["status"].get("updatedReplicas") == 2
    wait_ready(cluster, ES, "roll", NAMESPACE)
    new_hash = template_hash(deployment(cluster, "roll"))
    assert new_hash != old_hash
    pods = ready_pods(cluster, "roll")
    assert len(pods) == 2
    assert {pod["metadata"]["annotations"][HASH] for pod in pods} == {new_hash}


def test_children_deleted_or_edited_by_hand_come_back(cluster, live_operator):
    cluster.apply(example(ES, "repair", NAMESPACE))
    wait_ready(cluster, ES, "repair", NAMESPACE)
    service_uid = cluster.get_json("service", "repair", "-n", NAMESPACE)["metadata"]["uid"]
    cluster.kubectl("delete", "service", "repair", "-n", NAMESPACE)
    cluster.kubectl("delete", "configmap", "repair-triton", "-n", NAMESPACE)
    cluster.kubectl("set", "image", "deployment/repair-triton", "-n", NAMESPACE,
                    "triton=example.com/not-ours:1")

    def repaired() -> bool:
        service = cluster.kubectl("get", "service", "repair", "-n", NAMESPACE, "-o",
                                  "jsonpath={.metadata.uid}", check=False)
        config = cluster.kubectl("get", "configmap", "repair-triton", "-n", NAMESPACE,
                                 check=False)
        image = cluster.kubectl("get", "deployment", "repair-triton", "-n", NAMESPACE, "-o",
                                "jsonpath={.spec.template.spec.containers[0].image}").stdout
        return (service.returncode == 0 and service.stdout != service_uid and
                config.returncode == 0 and image != "example.com/not-ours:1")

    wait_for(repaired, 60, "the Service, ConfigMap and Triton image put back")
    wait_ready(cluster, ES, "repair", NAMESPACE)


def wait_gone(cluster: ControlPlane, name: str, timeout: float = 60) -> None:
    wait_for(lambda: not children(cluster, NAMESPACE, name) and
             get(cluster, ES, name, NAMESPACE) is None, timeout,
             f"{name} and all its children deleted")


def test_delete_removes_everything_through_garbage_collection(cluster, live_operator):
    cluster.apply(example(ES, "gone", NAMESPACE))
    wait_ready(cluster, ES, "gone", NAMESPACE)
    delete(cluster, ES, "gone", NAMESPACE)
    wait_gone(cluster, "gone")


def test_delete_while_the_operator_is_stopped(cluster, live_operator):
    cluster.apply(example(ES, "orphan", NAMESPACE))
    wait_ready(cluster, ES, "orphan", NAMESPACE)
    live_operator.stop()
    try:
        delete(cluster, ES, "orphan", NAMESPACE, wait=False)
        wait_gone(cluster, "orphan", timeout=30)
    finally:
        live_operator.start()
        wait_gone(cluster, "orphan")


def test_operator_restarted_mid_rollout_converges_without_duplicates(cluster, live_operator):
    cluster.apply(example(ES, "restart", NAMESPACE, replicas=3))
    wait_ready(cluster, ES, "restart", NAMESPACE)
    changed = example(ES, "restart", NAMESPACE, replicas=3)
    changed["spec"]["search"] = {"defaultTopK": 7, "maxTopK": 70}
    old_hash = template_hash(deployment(cluster, "restart"))
    cluster.apply(changed)
    # Stop as soon as the rollout has begun (the new template is applied, pods not all new).
    wait_for(lambda: template_hash(deployment(cluster, "restart")) != old_hash, 30,
             "the rollout to begin", interval=0.1)
    live_operator.stop()
    live_operator.start()
    resource = wait_ready(cluster, ES, "restart", NAMESPACE)
    assert resource["metadata"]["generation"] == resource["status"]["observedGeneration"]
    found = children(cluster, NAMESPACE, "restart")
    assert {kind: len(found[kind]) for kind in CHILD_KINDS} == dict.fromkeys(CHILD_KINDS, 1)
    active = [rs for rs in found["ReplicaSet"] if rs["spec"]["replicas"]]
    assert len(active) == 1
    wait_for(lambda: len(children(cluster, NAMESPACE, "restart").get("Pod", [])) == 3, 30,
             "old pods gone")


def test_resources_created_before_the_operator_started_are_served(cluster, live_operator):
    live_operator.stop()
    try:
        cluster.apply(example(ES, "early", NAMESPACE))
    finally:
        live_operator.start()
    wait_ready(cluster, ES, "early", NAMESPACE)


def test_crds_installed_after_the_operator_started_are_served(cluster, live_operator):
    llm_crd = next(name for name in CRD_NAMES if name.startswith("llmservices"))
    live_operator.stop()
    cluster.kubectl("delete", "crd", llm_crd, "--timeout=60s")
    try:
        live_operator.start()
        cluster.kubectl("apply", "-f", str(ROOT / "crds" / f"{llm_crd}.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{llm_crd}",
                        "--timeout=60s")
        cluster.apply(example("LLMService", "late", NAMESPACE))
        wait_ready(cluster, "LLMService", "late", NAMESPACE)
    finally:
        cluster.kubectl("apply", "-f", str(ROOT / "crds" / f"{llm_crd}.yaml"))


def namespaced_install(cluster: ControlPlane, namespace: str, workdir: Path) -> Path:
    """deploy/namespaced/ moved to ``namespace`` by an overlay, as its comment says to."""
    overlay = workdir / f"overlay-{namespace}"
    overlay.mkdir(exist_ok=True)
    base = os.path.relpath(ROOT / "deploy" / "namespaced", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: {namespace}\nresources:\n  - {base}\n")
    cluster.create_namespace(namespace)
    cluster.kubectl("apply", "-k", str(overlay))
    cluster.kubectl("rollout", "status", "deployment/tritonop", "-n", namespace,
                    "--timeout=120s")
    cluster.kubectl("scale", "deployment/tritonop", "-n", namespace, "--replicas=0")
    return overlay


def test_namespaced_install_serves_its_own_namespace(cluster, live_operator, tmp_path):
    namespace = "tritonop-ns"
    overlay = namespaced_install(cluster, namespace, tmp_path)
    live_operator.stop()  # only the namespaced operator may act now
    confined = Operator(cluster, account_namespace=namespace, kustomization=overlay)
    try:
        confined.start()
        cluster.apply(example(ES, "local", namespace))
        wait_ready(cluster, ES, "local", namespace)
        assert CHILD_KINDS <= set(children(cluster, namespace, "local"))
        cluster.apply(example(ES, "elsewhere", NAMESPACE))
        assert all((get(cluster, ES, "elsewhere", NAMESPACE) or {}).get("status") is None
                   for _ in sample(3, lambda: None))
        assert " 403 " not in confined.log() and "Forbidden" not in confined.log()
        delete(cluster, ES, "local", namespace)
    finally:
        confined.stop()
        live_operator.start()
    wait_ready(cluster, ES, "elsewhere", NAMESPACE)
