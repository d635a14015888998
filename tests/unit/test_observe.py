"""Status from observed objects: phases, conditions, and transition times."""

from __future__ import annotations

from tritonop.controller.observe import Observed, failed_status, observed_status
from tritonop.status import ResourceStatus

ENDPOINTS = {"http": "http://x:8000", "grpc": "x:8001", "metrics": "http://x:8002/metrics"}


def deployment(replicas: int, ready: int, updated: int | None = None, current: bool = True,
               conditions: list | None = None) -> dict:
    return {"metadata": {"generation": 2},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": 2 if current else 1, "replicas": replicas,
                       "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated,
                       "conditions": conditions or []}}


def status(observed: Observed, previous: ResourceStatus | None = None, now="T1"):
    return observed_status(observed, previous or ResourceStatus(), selector="a=b",
                           endpoints=ENDPOINTS,
                           config_hash="h", now=now)


def conditions(result: ResourceStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in result.conditions}


def test_waiting_for_the_first_pods_is_pending():
    result = status(Observed(1, 2, deployment(2, 0)))
    assert result.phase == "Pending" and result.ready == "0/2"
    assert conditions(result)["Available"] == ("False", "NotAllReplicasReady")
    assert conditions(result)["ArtifactsReady"] == ("Unknown", "Preparing")


def test_all_ready_is_ready_and_artifacts_are_known_ready():
    result = status(Observed(1, 2, deployment(2, 2)))
    assert result.phase == "Ready"
    assert conditions(result) == {"ConfigRendered": ("True", "Rendered"),
                                  "ArtifactsReady": ("True", "Ready"),
                                  "Available": ("True", "AllReplicasReady")}


def test_losing_pods_after_ready_is_degraded():
    ready = status(Observed(1, 2, deployment(2, 2)))
    assert status(Observed(1, 2, deployment(2, 1)), ready).phase == "Degraded"


def test_a_rollout_after_ready_is_progressing():
    ready = status(Observed(1, 2, deployment(2, 2)))
    rolling = status(Observed(2, 2, deployment(2, 2, updated=1, current=False)), ready)
    assert rolling.phase == "Progressing" and "rolling out" in rolling.message


def test_a_failing_prepare_container_degrades_with_its_message():
    pod = {"status": {"initContainerStatuses": [{"name": "prepare", "state": {
        "terminated": {"exitCode": 2, "message": "corpus /x does not exist"}}}]}}
    result = status(Observed(1, 1, deployment(1, 0), [pod]))
    assert result.phase == "Degraded"
    assert conditions(result)["ArtifactsReady"] == ("False", "PrepareFailed")
    assert "corpus /x does not exist" in result.message


def test_a_prepare_container_that_crashed_reports_its_error_not_its_traceback():
    """With FallbackToLogsOnError the message is the log's tail: a traceback. Status and
    the event take its error line, as a prepare Job's failure does."""
    log = ("Traceback (most recent call last):\n  File \"/app/cli.py\", line 380, in main\n"
           "    secret_key = os.environ['AWS_SECRET_ACCESS_KEY']\n"
           "error: news: model source s3://models/x: no objects under s3://models/x/\n")
    pod = {"status": {"initContainerStatuses": [{"name": "prepare", "state": {
        "terminated": {"exitCode": 1, "message": log}}}]}}
    result = status(Observed(1, 1, deployment(1, 0), [pod]))
    assert conditions(result)["ArtifactsReady"] == ("False", "PrepareFailed")
    assert result.message.endswith("error: news: model source s3://models/x: no objects "
                                   "under s3://models/x/")
    assert "Traceback" not in result.message and "environ" not in result.message


def test_a_stuck_rollout_is_degraded():
    stuck = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
              "message": "ReplicaSet has timed out progressing"}]
    result = status(Observed(1, 1, deployment(1, 0, conditions=stuck)))
    assert result.phase == "Degraded" and "timed out" in result.message


def test_transition_time_moves_only_when_the_status_changes():
    first = status(Observed(1, 1, deployment(1, 0)), now="T1")
    same = status(Observed(1, 1, deployment(1, 0)), first, now="T2")
    ready = status(Observed(1, 1, deployment(1, 1)), same, now="T3")
    time = {c.type: c.last_transition_time for c in same.conditions}
    assert time["Available"] == "T1"
    assert {c.type: c.last_transition_time for c in ready.conditions}["Available"] == "T3"


def test_invalid_spec_keeps_other_conditions_and_says_what_to_fix():
    ready = status(Observed(1, 1, deployment(1, 1)))
    failed = failed_status("spec.search: defaultTopK must be <= maxTopK", 3, ready, "T9")
    assert failed.phase == "Failed" and failed.observed_generation == 3
    assert conditions(failed)["ConfigRendered"] == ("False", "InvalidSpec")
    assert conditions(failed)["Available"] == ("True", "AllReplicasReady")  # still serving


def test_scaled_to_zero_is_pending_not_ready():
    assert status(Observed(1, 0, deployment(0, 0))).phase == "Pending"


def pod(started: bool, ready: bool = False) -> dict:
    conditions = [] if ready else [{
        "type": "Ready", "status": "False", "reason": "ContainersNotReady",
        "message": "containers with unready status: [triton]"}]
    return {"metadata": {"name": "news-triton-abc"},
            "status": {"conditions": conditions, "containerStatuses": [
                {"name": "triton", "started": started, "ready": ready}]}}


def test_a_started_pod_failing_readiness_is_degraded_naming_its_condition():
    result = status(Observed(1, 1, deployment(1, 0), [pod(started=True)]))
    assert result.phase == "Degraded"
    assert "pod news-triton-abc: ContainersNotReady: containers with unready status: [triton]" \
        in result.message
    assert conditions(result)["Available"] == ("False", "NotAllReplicasReady")


def test_a_pod_still_starting_is_pending():
    assert status(Observed(1, 1, deployment(1, 0), [pod(started=False)])).phase == "Pending"


def test_losing_a_pod_names_the_pod_and_its_condition():
    ready = status(Observed(1, 2, deployment(2, 2)))
    degraded = status(Observed(1, 2, deployment(2, 1), [pod(started=True)]), ready)
    assert degraded.message.startswith("only 1/2 Triton pods report ready; pod news-triton-abc")


def test_the_status_patch_removes_an_address_that_no_longer_answers():
    """Status is merge-patched: with api.triton.expose turned off (or after an upgrade),
    Triton's http and grpc addresses must leave status.endpoints, not linger."""
    from tests.support.kube_emulator import _merge
    from tritonop.controller.reconcile import status_dict
    from tritonop.status import Endpoints

    stored = {"phase": "Ready", "endpoints": {"openai": "o", "http": "h", "grpc": "g",
                                              "metrics": "m"}}
    closed = ResourceStatus(phase="Ready", endpoints=Endpoints(openai="o", metrics="m"))
    assert _merge(stored, status_dict(closed))["endpoints"] == {"openai": "o", "metrics": "m"}
