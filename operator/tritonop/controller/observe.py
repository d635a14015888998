"""From observed Kubernetes objects to the status tritonop reports (pure, no API calls).

Ready means the Deployment's pods pass their readiness probe, which asks Triton itself
(``/v2/health/ready``): every model loaded and answering. Objects merely existing is
not enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tritonop.controller.artifacts import failure_text
from tritonop.status import Condition, ConditionStatus, Endpoints, Phase, ResourceStatus

Obj = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    """What the reconciler read from the cluster for one resource."""

    generation: int
    desired_replicas: int
    deployment: Optional[Obj] = None
    pods: list[Obj] = field(default_factory=list)
    # ArtifactsReady as the prepare or resolve Job says (prepare: job, or a model source
    # being resolved); None: from the pods' init containers (perPod), or the last status.
    artifacts: Optional[tuple[ConditionStatus, str, str]] = None
    # What a running prepare init container's log says of its model download ("downloaded
    # 120 MB of 500 MB (24%)"), or "".
    download: str = ""


def _deployment_conditions(deployment: Obj) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in (deployment.get("status") or {}).get("conditions", [])}


def _prepare_state(pods: list[Obj], download: str = "") -> tuple[ConditionStatus, str, str]:
    """ArtifactsReady from the prepare init containers of the pods (and what the log of a
    running one says of its download)."""
    for pod in pods:
        for state in (pod.get("status") or {}).get("initContainerStatuses", []):
            if state.get("name") != "prepare":
                continue
            terminated = (state.get("state") or {}).get("terminated") or \
                (state.get("lastState") or {}).get("terminated")
            waiting = (state.get("state") or {}).get("waiting") or {}
            if terminated and terminated.get("exitCode", 0) != 0:
                # Its error lines only: from the logs (a traceback) when it wrote no message.
                detail = failure_text(terminated.get("message") or "") or \
                    terminated.get("reason") or "failed"
                return "False", "PrepareFailed", f"prepare init container failed: {detail}"
            if waiting.get("reason") in ("CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff"):
                return "False", "PrepareFailed", f"prepare init container: {waiting['reason']}"
    for pod in pods:
        for state in (pod.get("status") or {}).get("initContainerStatuses", []):
            terminated = (state.get("state") or {}).get("terminated") or {}
            if state.get("name") == "prepare" and terminated.get("exitCode") == 0:
                return "True", "Prepared", "the prepare init container finished"
    waiting = "waiting for a pod to prepare or mount the artifacts"
    if download:
        waiting = f"{waiting}: a prepare init container has {download}"
    return "Unknown", "Preparing", waiting


def _unready_pod(pods: list[Obj]) -> str | None:
    """A pod whose Triton started but fails its readiness probe, as its kubelet says.

    ``started`` turns true once the startup probe (Triton loaded every model) passed; a
    container that is started and still not ready is failing its readiness probe, not
    loading. Returns the pod's name and its Ready condition's reason and message.
    """
    for pod in pods:
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        if not any(s.get("started") and not s.get("ready") for s in statuses):
            continue
        ready = next((c for c in (pod.get("status") or {}).get("conditions") or []
                      if c.get("type") == "Ready"), {})
        name = (pod.get("metadata") or {}).get("name", "?")
        detail = ": ".join(str(part) for part in (ready.get("reason"), ready.get("message"))
                           if part)
        return f"pod {name}: {detail or 'not ready'}"
    return None


def _condition(previous: list[Condition], kind: str, status: ConditionStatus, reason: str,
               message: str, generation: int, now: str) -> Condition:
    """A condition whose transition time only moves when its status changes."""
    old = next((c for c in previous if c.type == kind), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    return Condition(type=kind, status=status, reason=reason, message=message,
                     observed_generation=generation, last_transition_time=since)


def failed_status(
    message: str, generation: int, previous: ResourceStatus, now: str,
    reason: str = "InvalidSpec",
) -> ResourceStatus:
    """The status of a resource that cannot be served: its spec, or a name already taken."""
    condition = _condition(previous.conditions, "ConfigRendered", "False", reason,
                           message, generation, now)
    others = [c for c in previous.conditions if c.type != "ConfigRendered"]
    return previous.model_copy(update={
        "phase": "Failed", "message": message, "observed_generation": generation,
        "conditions": [condition, *others],
    })


APPLY_FAILING = "ApplyFailing"


def failing_status(message: str, generation: int, previous: ResourceStatus, now: str
                   ) -> ResourceStatus:
    """The status of a resource whose children the API server keeps failing to take (a 5xx,
    a timeout): still retried, but said in a condition instead of in silence.

    A resource that served keeps its phase (its pods still serve the last generation
    applied); any other is Pending, never an earlier generation's Failed.
    """
    condition = _condition(previous.conditions, "ConfigRendered", "False", APPLY_FAILING,
                           message, generation, now)
    others = [c for c in previous.conditions if c.type != "ConfigRendered"]
    serving = previous.phase in ("Ready", "Degraded", "Progressing")
    return previous.model_copy(update={
        "phase": previous.phase if serving else "Pending", "message": message,
        "conditions": [condition, *others]})


def observed_status(
    observed: Observed,
    previous: ResourceStatus,
    *,
    selector: str,
    endpoints: dict[str, str],
    config_hash: str,
    now: str,
) -> ResourceStatus:
    """Phase, counts and conditions of a resource whose children were applied."""
    deployment = observed.deployment or {}
    status = deployment.get("status") or {}
    desired = observed.desired_replicas
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    current = (deployment.get("metadata") or {}).get("generation") == status.get(
        "observedGeneration")
    stuck = _deployment_conditions(deployment).get("Progressing", {})
    deadline_exceeded = stuck.get("reason") == "ProgressDeadlineExceeded"
    if observed.artifacts is not None:
        artifacts = observed.artifacts
    else:
        artifacts = ("True", "Ready", "a Triton pod loaded them") if ready else \
            _prepare_state(observed.pods, observed.download)
    # A new version being resolved or prepared while the old pods serve is no fault.
    preparing = observed.artifacts is not None and artifacts[1] in ("Resolving", "Preparing")

    phase: Phase
    if desired == 0:
        phase, message = "Pending", "scaled to zero replicas"
    elif ready >= desired and updated >= desired and current:
        phase, message = "Ready", f"{ready}/{desired} Triton pods report ready"
    elif preparing and not ready:
        phase, message = "Pending", artifacts[2]
    elif (artifacts[0] == "False" and not preparing) or deadline_exceeded:
        phase = "Degraded"
        message = artifacts[2] if artifacts[0] == "False" else stuck.get("message", "stuck")
    elif updated < desired or not current:
        was_serving = previous.phase in ("Ready", "Degraded", "Progressing")
        phase = "Progressing" if was_serving else "Pending"
        message = f"rolling out: {updated}/{desired} pods updated, {ready} ready"
    elif previous.phase in ("Ready", "Degraded", "Progressing") or _unready_pod(observed.pods):
        phase, message = "Degraded", f"only {ready}/{desired} Triton pods report ready"
        if unready := _unready_pod(observed.pods):
            message = f"{message}; {unready}"
    else:
        phase, message = "Pending", f"waiting for Triton: {ready}/{desired} pods ready"

    generation = observed.generation
    conditions = [
        _condition(previous.conditions, "ConfigRendered", "True", "Rendered",
                   f"model repository rendered (config hash {config_hash})", generation, now),
        _condition(previous.conditions, "ArtifactsReady", *artifacts, generation, now),
        _condition(previous.conditions, "Available", "True" if phase == "Ready" else "False",
                   "AllReplicasReady" if phase == "Ready" else "NotAllReplicasReady",
                   message, generation, now),
    ]
    return ResourceStatus(
        phase=phase, message=message, observed_generation=generation,
        replicas=int(status.get("replicas") or 0),
        ready_replicas=ready, ready=f"{ready}/{desired}", selector=selector,
        endpoints=Endpoints(**endpoints), config_hash=config_hash, conditions=conditions,
        artifacts_version=previous.artifacts_version, artifacts_cleaned=previous.artifacts_cleaned,
        model=previous.model,
    )
