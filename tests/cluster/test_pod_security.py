"""Pod Security on a real API server: what the operator creates is admitted as "restricted".

The namespace here enforces the Pod Security Standard "restricted" (PodSecurity admission
in kube-apiserver). The examples' pods are created by the real controllers (the
ReplicaSet's and the Job's, which the API server would refuse for any violation) and run
by kwok; a pod rendered with a host path is refused there, which shows the check is live;
and such a resource is refused by the operator itself, whose deploy/ defaults allow none.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.cluster.helpers import (
    EXAMPLES,
    children,
    condition,
    events,
    example,
    wait_ready,
    wait_status,
)
from tests.support.cluster import ControlPlane, wait_for
from tritonop.render.kubernetes import render_children
from tritonop.resources import parse_resource

RESTRICTED = "tritonop-restricted"
ENFORCE = "pod-security.kubernetes.io/enforce"
ES = "EmbeddingSearch"


@pytest.fixture(scope="module")
def restricted(cluster: ControlPlane) -> str:
    cluster.create_namespace(RESTRICTED, enforce="restricted")
    labels = cluster.get_json("namespace", RESTRICTED)["metadata"]["labels"]
    assert labels[ENFORCE] == "restricted"
    return RESTRICTED


def pods_of(cluster: ControlPlane, selector: str) -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-n", RESTRICTED, "-l", selector)["items"]


def test_the_examples_pods_are_admitted_in_a_restricted_namespace(cluster, live_operator,
                                                                  restricted):
    for doc in EXAMPLES.values():
        cluster.apply({**copy.deepcopy(doc), "metadata": {
            "name": doc["metadata"]["name"], "namespace": restricted}})
    for kind, doc in sorted(EXAMPLES.items()):
        name = doc["metadata"]["name"]
        wait_ready(cluster, kind, name, restricted, timeout=120)
        pods = children(cluster, restricted, name)["Pod"]
        assert pods, f"{kind} {name}: no pod"
        for pod in pods:  # prepared per pod: the init container was admitted too
            assert [c["name"] for c in pod["spec"]["initContainers"]] == ["prepare"]


def test_a_prepare_job_and_its_pod_are_admitted_in_a_restricted_namespace(
        cluster, live_operator, restricted):
    name = "jobbed"
    cluster.apply({  # for the operator's claim: this control plane has no provisioner
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "psa-jobbed-pv"},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                 "hostPath": {"path": "/var/tmp/psa-jobbed"},
                 "claimRef": {"namespace": restricted, "name": f"{name}-artifacts"}}})
    cluster.apply(example(ES, name, restricted, artifacts={"prepare": "job"}))
    wait_ready(cluster, ES, name, restricted, timeout=120)
    jobs = cluster.get_json("jobs", "-n", restricted, "-l",
                            f"serving.tritonop.dev/resource=embeddingsearch.{name}")["items"]
    [job] = [j for j in jobs if "-prepare-" in j["metadata"]["name"]]
    assert pods_of(cluster, f"batch.kubernetes.io/job-name={job['metadata']['name']}")
    assert children(cluster, restricted, name)["Pod"]


def rendered_pod(**spec: Any) -> dict[str, Any]:
    """The example EmbeddingSearch's pod as its Deployment would create it, as a Pod."""
    resource = parse_resource(example(ES, "rendered", RESTRICTED, **spec))
    [deployment] = [c for c in render_children(resource) if c["kind"] == "Deployment"]
    pod_spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
    # The resource's own ServiceAccount exists only once the operator made it; admission
    # of a pod that names a missing one fails before Pod Security is asked.
    pod_spec["serviceAccountName"] = "default"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "rendered", "namespace": RESTRICTED}, "spec": pod_spec}


def test_the_api_server_refuses_a_host_path_pod_there(cluster, restricted):
    def dry_run(pod: dict[str, Any]):
        return cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod),
                               check=False)

    accepted = dry_run(rendered_pod())
    assert accepted.returncode == 0, accepted.stderr
    refused = dry_run(rendered_pod(artifacts={"hostPath": {"path": "/"}, "prepare": "perPod"}))
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr
    assert 'volume "artifacts"' in refused.stderr and "hostPath" in refused.stderr


def test_a_host_path_resource_fails_not_allowed_by_the_operators_defaults(
        cluster, live_operator, restricted):
    name = "host"
    cluster.apply(example(ES, name, restricted, artifacts={"hostPath": {"path": "/"}}))
    failed = wait_status(cluster, ES, name, restricted,
                         lambda r: (r.get("status") or {}).get("phase") == "Failed", "Failed")
    rendered = condition(failed, "ConfigRendered")
    assert (rendered["status"], rendered["reason"]) == ("False", "NotAllowed")
    message = failed["status"]["message"]
    assert message.startswith("spec.artifacts.hostPath: this operator does not allow host paths")
    assert "TRITONOP_ALLOW_HOST_PATH=true" in message
    warning = wait_for(lambda: [e for e in events(cluster, restricted, name)
                                if e["type"] == "Warning"], 30, "the Warning event")
    assert [(e["reason"], e["message"]) for e in warning] == [("Failed", message)]
    assert children(cluster, restricted, name) == {}
