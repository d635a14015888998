"""A moving model source on the real control plane: resolved by a Job, pinned, re-resolved.

The Job controller (kube-controller-manager) runs the resolve Job and counts its pod; the
test plays the kubelet for that pod, as ``tritonop resolve`` would end it: phase Succeeded,
the ``resolve`` container terminated with the JSON answer as its message. So that kwok's
kubelet does not end it first (with no message), the kwok nodes are cordoned while a resolve
pod exists: it stays unscheduled, and only the test writes its status. Uncordoned, kwok runs
the prepare Jobs' pods to completion, as in test_artifacts_job.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.cluster.conftest import NAMESPACE
from tests.cluster.helpers import (
    condition,
    example,
    get,
    sample,
    volume_for,
    wait_ready,
    wait_status,
)
from tests.support.cluster import ControlPlane, wait_for
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.controller.reconcile import parse

ES = "EmbeddingSearch"
SOURCE = "hf://acme/bert"
REVISION = "serving.tritonop.dev/model-revision"
FINGERPRINT = "serving.tritonop.dev/artifacts-fingerprint"
OLD, NEW = "1" * 40, "2" * 40


@contextmanager
def cordoned(cluster: ControlPlane) -> Iterator[None]:
    """No new pod is scheduled (so none is run by kwok) inside the block."""
    nodes = [n["metadata"]["name"] for n in cluster.get_json("nodes", "-l", "type=kwok")["items"]]
    for node in nodes:
        cluster.kubectl("cordon", node)
    try:
        yield
    finally:
        for node in nodes:
            cluster.kubectl("uncordon", node)


def jobs(cluster: ControlPlane, name: str, purpose: str) -> list[dict[str, Any]]:
    """The resource's Jobs named for ``purpose`` (resolve, prepare or cleanup)."""
    listed = cluster.get_json("jobs", "-n", NAMESPACE, "-l",
                              f"serving.tritonop.dev/resource=embeddingsearch.{name}")
    return [j for j in listed["items"] if f"{name}-{purpose}-" in j["metadata"]["name"]]


def prepare_jobs(cluster: ControlPlane, name: str) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["labels"][FINGERPRINT]: j for j in jobs(cluster, name, "prepare")}


def complete(job: dict[str, Any]) -> bool:
    return any(c["type"] == "Complete" and c["status"] == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def deployment_version(cluster: ControlPlane, name: str) -> str | None:
    found = get(cluster, "deployment", f"{name}-triton", NAMESPACE)
    return None if found is None else found["spec"]["template"]["metadata"]["annotations"].get(
        FINGERPRINT)


def resolve_pod(cluster: ControlPlane, name: str) -> dict[str, Any]:
    """The pending pod of the resource's resolve Job, as the Job controller made it."""
    def pending() -> dict[str, Any] | None:
        [job] = jobs(cluster, name, "resolve")
        pods = cluster.get_json("pods", "-n", NAMESPACE, "-l",
                                f"batch.kubernetes.io/job-name={job['metadata']['name']}")
        return next((p for p in pods["items"] if p["status"].get("phase") == "Pending"), None)

    return wait_for(pending, 60, f"the resolve Job's pod of {name}", interval=0.5)


def end_as_resolved(cluster: ControlPlane, name: str, pod: dict[str, Any], revision: str
                    ) -> None:
    """What the kubelet writes when ``tritonop resolve`` exits 0 having found ``revision``."""
    [container] = pod["spec"]["containers"]
    message = json.dumps({"name": name, "source": SOURCE, "revision": revision})
    status = {"phase": "Succeeded", "containerStatuses": [{
        "name": container["name"], "image": container["image"], "imageID": "",
        "ready": False, "started": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                 "startedAt": pod["metadata"]["creationTimestamp"],
                                 "finishedAt": pod["metadata"]["creationTimestamp"]}}}]}
    cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", NAMESPACE,
                    "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": status}))


def expected_fingerprint(body: dict[str, Any], revision: str) -> str:
    """The artifacts version the operator renders for ``body`` pinned at ``revision``."""
    annotated = {**body, "metadata": {**body["metadata"], "annotations": {REVISION: revision}}}
    return resource_fingerprint(parse(annotated))


def pinned_at(revision: str):
    def check(resource: dict[str, Any]) -> bool:
        annotations = resource.get("metadata", {}).get("annotations") or {}
        model = (resource.get("status") or {}).get("model") or {}
        return annotations.get(REVISION) == revision and \
            model.get("resolvedRevision") == revision
    return check


def test_a_moving_source_is_pinned_and_a_new_revision_rolls_out_as_a_new_version(
        cluster, live_operator):
    name = "resolved"
    volume_for(cluster, name, NAMESPACE)
    body = example(ES, name, NAMESPACE, replicas=2, artifacts={"prepare": "job"},
                   model={"source": SOURCE, "format": "onnx"})
    first = expected_fingerprint(body, OLD)

    with cordoned(cluster):
        cluster.apply(body)
        pod = resolve_pod(cluster, name)
        resolving = wait_status(cluster, ES, name, NAMESPACE,
                                lambda r: condition(r, "ArtifactsReady").get("reason")
                                == "Resolving", "Resolving")
        assert prepare_jobs(cluster, name) == {}, "nothing is prepared before the pin"
        assert get(cluster, "deployment", f"{name}-triton", NAMESPACE) is None
        end_as_resolved(cluster, name, pod, OLD)
        resource = wait_status(cluster, ES, name, NAMESPACE, pinned_at(OLD),
                               f"pinned at {OLD}")
        job = wait_for(lambda: prepare_jobs(cluster, name).get(first), 60,
                       "the prepare Job of the pinned version")
        wait_for(lambda: not jobs(cluster, name, "resolve"), 60, "the resolve Job deleted")
    message = condition(resolving, "ArtifactsReady")["message"]
    assert SOURCE in message and pod["metadata"]["labels"]["job-name"] in message
    assert resource["status"]["model"] == {"source": SOURCE, "resolvedRevision": OLD}
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--expect-fingerprint") + 1] == first
    document = next(e["value"] for e in container["env"] if e["name"] == "TRITONOP_RESOURCE")
    assert f"{REVISION}: '{OLD}'" in document
    resource = wait_ready(cluster, ES, name, NAMESPACE, timeout=120)
    assert resource["status"]["artifactsVersion"] == first == deployment_version(cluster, name)

    # The user asks for the branch's newest commit: the next version is prepared beside the
    # pods that serve the old one, and they move only once its Job has completed.
    second = expected_fingerprint(body, NEW)
    with cordoned(cluster):
        cluster.kubectl("annotate", "embeddingsearch", name, "-n", NAMESPACE, f"{REVISION}-")
        pod = resolve_pod(cluster, name)
        end_as_resolved(cluster, name, pod, NEW)
        wait_status(cluster, ES, name, NAMESPACE, pinned_at(NEW), f"pinned at {NEW}")
        wait_for(lambda: second in prepare_jobs(cluster, name), 60, "the new prepare Job")
        seen = sample(5, lambda: (deployment_version(cluster, name),
                                  complete(prepare_jobs(cluster, name)[second])))
        held = get(cluster, ES, name, NAMESPACE)
    assert second != first
    assert set(seen) == {(first, False)}, "the old version serves while the new one prepares"
    assert held["status"]["artifactsVersion"] == first
    assert held["status"]["phase"] == "Ready"
    assert condition(held, "ArtifactsReady")["reason"] == "Preparing"
    resource = wait_status(cluster, ES, name, NAMESPACE,
                           lambda r: (r.get("status") or {}).get("artifactsVersion") == second
                           and r["status"].get("phase") == "Ready", "Ready on the new version",
                           timeout=120)
    assert deployment_version(cluster, name) == second
    assert resource["status"]["model"]["resolvedRevision"] == NEW
