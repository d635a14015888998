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
  While it runs, the newest ``progress: ...`` line in its pod's log says how much of the
  model is downloaded (:func:`download_progress`).

A moving remote model source (a hub branch, an S3 prefix) is resolved before any of that,
in both prepare modes: a resolve Job asks the store which exact revision it means now, and
the operator pins the answer in the resource's ``serving.tritonop.dev/model-revision``
annotation (:func:`resolve`). Only the pinned resource names an artifacts version; until
then the pods' own children are held, as while preparing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from tritonop.artifacts.progress import last_progress
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.controller.kube import Obj
from tritonop.render.kubernetes import (
    Images,
    artifacts_children,
    needs_resolve,
    prepare_job,
    prepare_mode,
    resolve_job,
)
from tritonop.resources import Resource
from tritonop.status import (
    ConditionStatus,
    EncoderStatus,
    IndexStatus,
    ResourceStatus,
    VersionReport,
)

# Children left as they are while a new version is prepared: the running pods' own.
HELD_WHILE_PREPARING = frozenset({"ConfigMap", "Deployment"})
Apply = Callable[[Obj], Obj]
Get = Callable[[Obj], Optional[Obj]]
Pods = Callable[[str], list[Obj]]  # the pods of the Job of that name
PodLog = Callable[[str, str], str]  # the tail of a pod's container's log; "" if unreadable
# The most running pods whose logs are read for a download's progress, per reconcile.
LOGS_READ = 3
# The most of a pod's termination message that a condition repeats.
MESSAGE_LIMIT = 1000


@dataclass(frozen=True)
class ArtifactsPlan:
    """What the reconcile does about a job-mode resource's artifacts.

    Attributes:
        hold: kinds of children not to apply now.
        condition: ArtifactsReady (status, reason, message).
        version: the complete version the pods load, for ``status.artifactsVersion``.
        index: ``status.index``: what the prepare Job of a version reported of its search
            index (kept from the previous status until another version completes).
        encoder: ``status.encoder``: what it reported of an int8 encoder, kept likewise.
    """

    hold: frozenset[str]
    condition: tuple[ConditionStatus, str, str]
    version: Optional[str]
    index: Optional[IndexStatus] = None
    encoder: Optional[EncoderStatus] = None


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


def termination_message(pods: Sequence[Mapping[str, Any]], container: str) -> str:
    """What ``container`` of a Job's pods said as it ended: a succeeded pod's, else the
    newest failed one's (``state`` or ``lastState``); "" when none said anything."""
    said: list[tuple[int, str, str]] = []
    for pod in pods:
        status = pod.get("status") or {}
        for entry in status.get("containerStatuses") or []:
            if entry.get("name") != container:
                continue
            terminated = (entry.get("state") or {}).get("terminated") or \
                (entry.get("lastState") or {}).get("terminated") or {}
            message = str(terminated.get("message") or "").strip()
            if message:
                succeeded = int(status.get("phase") == "Succeeded")
                said.append((succeeded, str(terminated.get("finishedAt") or ""), message))
    return max(said)[2] if said else ""


def download_progress(pods: Sequence[Mapping[str, Any]], container: str, log: PodLog,
                      resource: str, *, init: bool = False) -> str:
    """What a running ``container`` of these pods last said of its model download, from
    its log's ``progress: ...`` lines (:mod:`tritonop.artifacts.progress`), e.g.
    "downloaded 120 MB of 500 MB (24%)"; "" when none is running or none said any (no
    download, a cached model, a log that cannot be read).

    Args:
        log: reads the tail of a container's log, by pod and container name.
        resource: the resource whose download counts.
        init: ``container`` is an init container (per-pod prepare), not a Job's container.
    """
    key = "initContainerStatuses" if init else "containerStatuses"
    running = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name")
        statuses = (pod.get("status") or {}).get(key) or []
        if name and any(entry.get("name") == container and "running" in (
                entry.get("state") or {}) for entry in statuses):
            running.append(str(name))
    for name in running[:LOGS_READ]:
        progress = last_progress(log(name, container), resource)
        if progress is not None:
            return progress.describe()
    return ""


def failure_text(message: str) -> str:
    """A CLI's failure from its termination message: its ``error: ...`` lines, else its last
    line (the logs stand in when the command wrote no message), cut to a condition's size."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    text = " ".join(errors or lines[-1:])
    return text if len(text) <= MESSAGE_LIMIT else f"...{text[-MESSAGE_LIMIT:]}"


def prepared_index(message: str, version: str) -> IndexStatus | None:
    """``status.index`` from a prepare Job's termination message (``{"name", "version",
    "index": {...}}``, see ``tritonop prepare``); None when it carries no such report (an
    older image, or a message cut short)."""
    return _prepared(message, version, "index", IndexStatus)


def prepared_encoder(message: str, version: str) -> EncoderStatus | None:
    """``status.encoder`` from a prepare Job's termination message (its ``encoder``, which
    an int8 encoder's report has); None without one."""
    return _prepared(message, version, "encoder", EncoderStatus)


def _prepared(message: str, version: str, key: str,
              model: type[VersionReport]) -> VersionReport | None:
    """The ``key`` report of ``version`` in a termination message, as ``model``."""
    try:
        result = json.loads(message)
        report = result.get(key) if result.get("version") == version else None
        return model(version=version, **report) if isinstance(report, dict) else None
    except (ValueError, TypeError, AttributeError):  # pydantic's errors are ValueErrors
        return None


def resolved_revision(message: str) -> str:
    """The revision in a resolve Job's termination message (``{"name", "source",
    "revision"}``).

    Raises:
        ValueError: the message is not such an object.
    """
    try:
        result = json.loads(message)
    except ValueError:
        result = None
    revision = result.get("revision") if isinstance(result, dict) else None
    if not isinstance(revision, str) or not revision:
        shown = message if len(message) <= 200 else f"{message[:200]}..."
        raise ValueError(f"no revision in its termination message {shown!r}")
    return revision


@dataclass(frozen=True)
class Resolution:
    """Where resolving a moving model source stands.

    Attributes:
        plan: what the reconcile holds meanwhile, and ArtifactsReady.
        job: the resolve Job as rendered.
        revision: the revision its pod reported, to pin (the Job completed); else None.
    """

    plan: ArtifactsPlan
    job: Obj
    revision: Optional[str] = None


def resolve(resource: Resource, previous: ResourceStatus, apply: Apply, get: Get,
            pods: Pods, images: Images) -> Resolution | None:
    """Run the resolve Job of a resource whose model source moves; None when it needs none.

    The Job is applied once and then only read. Complete: its pod's termination message
    gives the revision, for the reconcile to pin. Failed: the failure stands, with the
    pod's ``error: ...``, and the Job is kept, so no new one runs (and fails again) until
    the spec, or the credentials, are fixed and the Job deleted. Meanwhile the children
    that would serve or prepare the unpinned version are held: no prepare Job, no
    Deployment change, and a resource already serving keeps serving.

    Args:
        pods: lists the pods of the Job of that name.
    """
    if not needs_resolve(resource):
        return None
    job = resolve_job(resource, images)
    name = job["metadata"]["name"]
    source = resource.spec.model.source
    serving = previous.artifacts_version
    keep = (f"pods keep serving version {serving}" if serving
            else "the pods stay as they are until it is pinned")
    state, detail = job_state(get(job) or apply(job))
    if state == "Running":
        return Resolution(ArtifactsPlan(HELD_WHILE_PREPARING, (
            "False", "Resolving", f"Job {name} is resolving model source {source} to an "
            f"exact revision ({detail}); {keep}"), serving), job)
    said = termination_message(pods(name), "resolve")
    if state == "Complete":
        try:
            revision = resolved_revision(said)
        except ValueError as err:
            detail = f"Job {name} completed, but with {err}"
        else:
            return Resolution(ArtifactsPlan(HELD_WHILE_PREPARING, (
                "False", "Resolving", f"model source {source} resolved to revision "
                f"{revision} by Job {name}; {keep}"), serving), job, revision)
    elif said:
        detail = failure_text(said)
    return Resolution(ArtifactsPlan(HELD_WHILE_PREPARING, (
        "False", "PrepareFailed", f"resolving model source {source} failed: {detail}; fix "
        f"the spec or credentials, or delete Job {name} to try again"), serving), job)


def plan(resource: Resource, previous: ResourceStatus, apply: Apply, get: Get,
         images: Images, pods: Pods | None = None,
         log: PodLog | None = None) -> ArtifactsPlan | None:
    """Apply the claim and the Job a job-mode resource needs; None for other modes.

    A Job that exists is only read: its pod template is immutable, and one created for
    this fingerprint does the work whatever placement the spec asks for since.

    Args:
        apply: applies one child (owner reference added) and returns it as stored.
        get: reads a child as the server has it (None when absent).
        pods: lists the pods of the Job of that name: a failed Job's pod says why
            (prepare's ``error: ...`` lines, its termination message).
        log: reads the tail of a pod's log: while the Job runs, its pod's newest progress
            line says how much of the model is downloaded. The Job's status stays the same
            meanwhile, so the resync timer's reconciles are what bring it up to date.
    """
    if prepare_mode(resource) != "job":
        return None
    wanted = resource_fingerprint(resource)
    if previous.artifacts_version == wanted:
        return ArtifactsPlan(frozenset(), ("True", "Prepared",
                                           f"artifacts version {wanted} is complete"), wanted,
                             previous.index, previous.encoder)
    stored: Obj = {}
    for child in artifacts_children(resource, images):
        name = child["metadata"]["name"]
        stored = (get(child) if child["kind"] == "Job" else None) or apply(child)
    state, detail = job_state(stored)
    if state == "Complete":
        said = termination_message(pods(name), "prepare") if pods else ""
        return ArtifactsPlan(frozenset(), ("True", "Prepared",
                                           f"Job {name} prepared artifacts version {wanted}"),
                             wanted, prepared_index(said, wanted),
                             prepared_encoder(said, wanted))
    serving = previous.artifacts_version
    keep = (f"pods keep serving version {serving}" if serving
            else "no version to serve yet: the Deployment waits for it")
    if state == "Failed":
        said = failure_text(termination_message(pods(name), "prepare")) if pods else ""
        detail = f"{detail}; {said}" if said else detail
        return ArtifactsPlan(HELD_WHILE_PREPARING, (
            "False", "PrepareFailed", f"Job {name} failed to prepare artifacts version "
            f"{wanted}: {detail}; {keep}; fix the spec or delete the Job to try again"),
            serving, previous.index, previous.encoder)
    if pods is not None and log is not None:
        said = download_progress(pods(name), "prepare", log, resource.name)
        detail = f"{detail}; {said}" if said else detail
    return ArtifactsPlan(HELD_WHILE_PREPARING, (
        "False", "Preparing", f"Job {name} is preparing artifacts version {wanted} "
        f"({detail}); {keep}"), serving, previous.index, previous.encoder)


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
