"""What the operator reports when the server refuses a child, or pods do not become ready."""

from __future__ import annotations

import json
import time

from tests.cluster.conftest import NAMESPACE, UNREADY_NAMESPACE
from tests.cluster.helpers import condition, events, example, wait_ready, wait_status
from tests.cluster.test_lifecycle import ready_pods
from tests.support.cluster import ControlPlane, request_count

ES = "EmbeddingSearch"
# Valid for the CRD (affinity is passed through), refused by the server's Deployment validation.
BAD_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
    "nodeSelectorTerms": []}}}
SERVER_MESSAGE = "must have at least one node selector term"


def rejected_deployment_applies(cluster: ControlPlane) -> float:
    return request_count(cluster.raw("/metrics"), lambda labels: all(
        part in labels for part in ('resource="deployments"', 'verb="APPLY"', 'code="422"')))


def test_a_child_the_server_refuses_fails_the_resource_with_its_message(cluster, live_operator):
    before = rejected_deployment_applies(cluster)
    cluster.apply(example(ES, "refused", NAMESPACE, affinity=BAD_AFFINITY))
    resource = wait_status(cluster, ES, "refused", NAMESPACE,
                           lambda r: (r.get("status") or {}).get("phase") in ("Failed",
                                                                             "Degraded"),
                           "Failed or Degraded", timeout=60)
    assert SERVER_MESSAGE in resource["status"]["message"]
    assert any(SERVER_MESSAGE in (c.get("message") or "")
               for c in resource["status"]["conditions"])
    assert any(SERVER_MESSAGE in (e.get("message") or "") and e["type"] == "Warning"
               for e in events(cluster, NAMESPACE, "refused"))
    # The server really refused the Deployment; and no retry storm: over four resync
    # periods, at most one refused apply per period.
    rejected = rejected_deployment_applies(cluster) - before
    assert rejected >= 1
    time.sleep(4 * live_operator.resync_seconds)
    retried = rejected_deployment_applies(cluster) - before - rejected
    assert retried <= 4, f"{retried} refused applies in {4 * live_operator.resync_seconds} s"


def test_pods_that_never_become_ready_are_degraded_naming_the_condition(cluster, live_operator):
    cluster.apply(example(ES, "stuck", UNREADY_NAMESPACE))
    resource = wait_status(cluster, ES, "stuck", UNREADY_NAMESPACE,
                           lambda r: (r.get("status") or {}).get("phase") == "Degraded",
                           "Degraded", timeout=60)
    message = resource["status"]["message"]
    assert "ContainersNotReady" in message or "containers with unready status" in message
    assert condition(resource, "Available")["status"] == "False"


def set_ready(cluster: ControlPlane, pod: str, ready: bool) -> None:
    """Report a pod (not) ready, as its kubelet would when a readiness probe flips."""
    value = "True" if ready else "False"
    entries = [{"type": kind, "status": value} for kind in ("Ready", "ContainersReady")]
    if not ready:
        for entry in entries:
            entry.update(reason="ContainersNotReady",
                         message="containers with unready status: [triton]")
    cluster.kubectl("patch", "pod", pod, "-n", NAMESPACE, "--subresource=status",
                    "--type=strategic", "-p", json.dumps({"status": {"conditions": entries}}))


def test_a_readiness_flap_goes_ready_degraded_ready(cluster, live_operator):
    cluster.apply(example(ES, "flap", NAMESPACE, replicas=2))
    wait_ready(cluster, ES, "flap", NAMESPACE)
    pod = ready_pods(cluster, "flap")[0]["metadata"]["name"]
    set_ready(cluster, pod, False)
    degraded = wait_status(cluster, ES, "flap", NAMESPACE,
                           lambda r: (r.get("status") or {}).get("phase") == "Degraded",
                           "Degraded", timeout=30)
    assert "1/2" in degraded["status"]["message"]
    assert condition(degraded, "Available")["status"] == "False"
    set_ready(cluster, pod, True)
    wait_ready(cluster, ES, "flap", NAMESPACE, timeout=30)
    # In the order the server stored them (timestamps have one-second resolution).
    reasons = [e["reason"] for e in sorted(events(cluster, NAMESPACE, "flap"),
                                           key=lambda e: int(e["metadata"]["resourceVersion"]))
               if e["involvedObject"]["kind"] == ES]
    assert "Degraded" in reasons and reasons[-1] == "Ready", reasons
