"""``prepare: job``: one Job per artifacts version, and pods switched only to complete ones.

The decision is made from the resource's status (``artifactsVersion``: the complete
version the pods load) and the Job of the wanted version, which is named after its
fingerprint, so the whole state is in the cluster and a restarted operator picks up
where it was:

* the wanted fingerprint is the status's version: nothing to prepare (replicas,
  batching, threads and the cache do not change the fingerprint, so they prepare
  nothing); once the Deployment has rolled out on it, a clean-up Job removes the older
  versions from the volume, once per version;
* otherwise the claim and the Job are applied, and while the Job runs the ConfigMap and
  the Deployment are held as they are, so the running pods keep serving the old version
  (and a pod that restarts meanwhile reads the old ConfigMap); when the Job completes
  the new version is recorded and the children rendered from the new spec roll the pods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from tritonop.artifacts.versions import resource_fingerprint
from tritonop.controller.kube import Obj
from tritonop.render.kubernetes import (
    Images,
    artifacts_children,
    prepare_job,
    prepare_mode,
)
from tritonop.resources import Resource
from tritonop.status import ConditionStatus, ResourceStatus

# Children left as they are while a new version is prepared: the running pods' own.
HELD_WHILE_PREPARING = frozenset({"ConfigMap", "Deployment"})
Apply = Callable[[Obj], Obj]
Get = Callable[[Obj], Optional[Obj]]


@dataclass(frozen=True)
class ArtifactsPlan:
    """What the reconcile does about a job-mode resource's artifacts.

    Attributes:
        hold: kinds of children not to apply now.
        condition: ArtifactsReady (status, reason, message).
        version: the complete version the pods load, for ``status.artifactsVersion``.
    """

    hold: frozenset[str]
    condition: tuple[ConditionStatus, str, str]
    version: Optional[str]


def job_state(job: Mapping[str, Any]) -> tuple[str, str]:
    """``Complete``, ``Failed`` or ``Running`` and a message, from a Job's status."""
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "Complete", ""
        if condition.get("type") == "Failed":
            detail = ": ".join(str(part) for part in (condition.get("reason"),
                                                      condition.get("message")) if part)
            return "Failed", detail or "failed"
    if int(status.get("succeeded") or 0) >= 1:
        return "Complete", ""
    return "Running", f"{int(status.get('active') or 0)} pod(s) active, " \
        f"{int(status.get('failed') or 0)} failed"


def plan(resource: Resource, previous: ResourceStatus, apply: Apply, get: Get,
         images: Images) -> ArtifactsPlan | None:
    """Apply the claim and the Job a job-mode resource needs; None for other modes.

    A Job that exists is only read: its pod template is immutable, and one created for
    this fingerprint does the work whatever placement the spec asks for since.

    Args:
        apply: applies one child (owner reference added) and returns it as stored.
        get: reads a child as the server has it (None when absent).
    """
    if prepare_mode(resource) != "job":
        return None
    wanted = resource_fingerprint(resource)
    if previous.artifacts_version == wanted:
        return ArtifactsPlan(frozenset(), ("True", "Prepared",
                                           f"artifacts version {wanted} is complete"), wanted)
    stored: Obj = {}
    for child in artifacts_children(resource, images):
        name = child["metadata"]["name"]
        stored = (get(child) if child["kind"] == "Job" else None) or apply(child)
    state, detail = job_state(stored)
    if state == "Complete":
        return ArtifactsPlan(frozenset(), ("True", "Prepared",
                                           f"Job {name} prepared artifacts version {wanted}"),
                             wanted)
    serving = previous.artifacts_version
    keep = (f"pods keep serving version {serving}" if serving
            else "no version to serve yet: the Deployment waits for it")
    if state == "Failed":
        return ArtifactsPlan(HELD_WHILE_PREPARING, (
            "False", "PrepareFailed", f"Job {name} failed to prepare artifacts version "
            f"{wanted}: {detail}; {keep}; fix the spec or delete the Job to try again"),
            serving)
    return ArtifactsPlan(HELD_WHILE_PREPARING, (
        "False", "Preparing", f"Job {name} is preparing artifacts version {wanted} "
        f"({detail}); {keep}"), serving)


def rolled_out(resource: Resource, deployment: Mapping[str, Any] | None) -> bool:
    """Whether every pod of the Deployment is updated and ready (nothing reads old versions)."""
    if not deployment:
        return False
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    desired = int(spec.get("replicas") or 0)
    return (deployment.get("metadata") or {}).get("generation") == status.get(
        "observedGeneration") and desired > 0 and all(
        int(status.get(key) or 0) >= desired
        for key in ("updatedReplicas", "readyReplicas")) and \
        int(status.get("replicas") or 0) == desired


def clean_up(resource: Resource, previous: ResourceStatus, version: str | None,
             deployment: Callable[[], Mapping[str, Any] | None], apply: Apply,
             images: Images) -> str | None:
    """Start the clean-up Job once the pods all serve ``version``; the version cleaned.

    Old versions stay until then: a pod of the previous ReplicaSet still reads its own.
    """
    if version is None or previous.artifacts_cleaned == version:
        return previous.artifacts_cleaned
    if not rolled_out(resource, deployment()):
        return previous.artifacts_cleaned
    apply(prepare_job(resource, images, cleanup=True))
    return version
