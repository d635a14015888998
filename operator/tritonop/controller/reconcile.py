"""One idempotent reconcile: desired children applied, what is there observed, status made.

It runs from create, update, resume and a timer alike (level-based, not edge-based),
so a child deleted or edited by hand is put back by the next run, and a missed event
costs at most one timer period.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from tritonop import API_GROUP, API_VERSION
from tritonop.artifacts.resolve import UNRESOLVED, model_revision
from tritonop.artifacts.versions import read_corpus_sha256
from tritonop.controller import artifacts
from tritonop.controller.cache import ChildCache, key_of
from tritonop.controller.kube import (
    FIELD_MANAGER,
    Kube,
    Obj,
    is_permanent,
    retry_after,
    server_message,
)
from tritonop.controller.observe import Observed, failed_status, observed_status
from tritonop.controller.policy import DEFAULT_POLICY, OperatorPolicy
from tritonop.render.kubernetes import (
    CONFIG_HASH_ANNOTATION,
    Images,
    endpoints,
    names,
    needs_resolve,
    prepare_mode,
    render_children,
    selector_labels,
    selector_string,
)
from tritonop.resources import MODEL_REVISION_ANNOTATION, Resource, ResourceError, parse_resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop.status import ModelStatus, ResourceStatus, VersionReport

# Children that exist only when the spec asks for them: removed when it stops asking.
OPTIONAL_CHILDREN = (
    ("policy/v1", "PodDisruptionBudget", "budget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "autoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy", "policy"),
)
KINDS = ("EmbeddingSearch", "LLMService")
# The field manager that holds Deployment.spec.replicas while it passes to the HPA.
HANDOVER_MANAGER = "tritonop-handover-to-hpa"
APPLY_REJECTED = "ApplyRejected"
NOT_ALLOWED = "NotAllowed"  # the operator's configuration forbids what the spec asks


class InvalidResource(Exception):
    """The spec cannot be served; ``status`` says so and what to fix."""

    def __init__(self, message: str, status: ResourceStatus) -> None:
        super().__init__(message)
        self.status = status


class RetryLater(Exception):
    """The API server could not take a request now (409, 429, 5xx, a timeout): try again.

    ``delay`` is the server's ``Retry-After`` where it sent one.
    """

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class Pinned(Exception):
    """The resolve Job's revision is pinned in the resource: reconcile ``body`` (the resource
    as the annotation left it) now, rather than wait for an event (kopf reports no change of
    the operator's own annotations)."""

    def __init__(self, body: Obj) -> None:
        super().__init__(f"model revision pinned on {body['metadata']['name']}")
        self.body = body


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def previous_status(body: Mapping[str, Any]) -> ResourceStatus:
    """The status as last written (a hand-edited, unreadable one counts as none)."""
    try:
        return ResourceStatus.model_validate(dict(body.get("status") or {}))
    except ValueError:
        return ResourceStatus()


def owner_reference(body: Mapping[str, Any]) -> Obj:
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def invalid(body: Mapping[str, Any], message: str, reason: str = "InvalidSpec"
            ) -> InvalidResource:
    generation = int(body["metadata"].get("generation") or 1)
    return InvalidResource(message, failed_status(message, generation, previous_status(body),
                                                  now(), reason))


def examples_dir() -> Path | None:
    """Where relative corpus paths resolve: the examples baked into the operator image.

    The prepare step resolves them there too (``--base-dir``), so the operator can hash
    such a corpus into the artifacts fingerprint; without the folder the path stands in.
    """
    folder = Path(os.environ.get("TRITONOP_EXAMPLES_DIR", "/opt/tritonop/examples"))
    return folder if folder.is_dir() else None


def with_default_prepare(kube: Kube, resource: Resource) -> Resource:
    """An EmbeddingSearch that names neither a prepare mode nor a volume, in job mode
    where the cluster has a default StorageClass to make its claim from.

    That is where prepare-once can serve (a claim the operator creates); elsewhere such a
    resource keeps the per-pod init container, which needs no storage. The render alone
    cannot know the cluster, so ``tritonop render`` shows the per-pod default.
    """
    spec = resource.spec
    if not isinstance(spec, EmbeddingSearchSpec):
        return resource
    artifacts = spec.artifacts
    if artifacts.prepare is not None or any(
            volume is not None for volume in (artifacts.empty_dir, artifacts.host_path,
                                              artifacts.persistent_volume_claim)):
        return resource
    if kube.default_storage_class() is None:
        return resource
    job = artifacts.model_copy(update={"prepare": "job"})
    return dataclasses.replace(resource, spec=spec.model_copy(update={"artifacts": job}))


def parse(body: Mapping[str, Any], policy: OperatorPolicy = DEFAULT_POLICY) -> Resource:
    """The resource, with the hash of its corpus, or :class:`InvalidResource` (Failed).

    The corpus is hashed here, once, by the rules a tenant's path must meet in the
    operator (inside the examples folder, a regular file, within the policy's size), and
    pinned into the resource, so that rendering reads no file; a hash annotation the
    tenant wrote on the resource is not trusted.
    """
    try:
        resource = parse_resource(
            {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")},
            examples_dir())
        if isinstance(resource.spec, EmbeddingSearchSpec):
            pinned = read_corpus_sha256(resource, confined=True,
                                        max_bytes=policy.max_corpus_bytes)
            resource = dataclasses.replace(resource, corpus_sha256=pinned)
    except ResourceError as err:
        raise invalid(body, str(err)) from None
    return resource


def check_allowed(body: Mapping[str, Any], resource: Resource, policy: OperatorPolicy) -> None:
    """:class:`InvalidResource` (NotAllowed) for what the operator's configuration forbids."""
    refusals = policy.refusals(resource)
    if refusals:
        raise invalid(body, "; ".join(refusals), reason=NOT_ALLOWED)


def apply_children(kube: Kube, body: Mapping[str, Any], resource: Resource, images: Images,
                   cache: ChildCache | None = None, *, resync: bool = False,
                   hold: frozenset[str] = frozenset()) -> dict[str, Obj]:
    """Apply every child with an owner reference; delete optional ones no longer wanted.

    Server-side apply with ``force`` would take over an object of the same name that
    someone else made (a hand-written Deployment, another resource's child). So children
    that exist but are not this resource's are reported, and nothing is applied until
    they are gone: the timer's next run picks it up from there.

    Every apply is recorded in ``cache``. On a resync, children that the watches show as
    this process left them are neither read nor applied again.

    Args:
        hold: kinds left as they are (the ConfigMap and Deployment while a new artifacts
            version is prepared: the running pods keep theirs).

    Returns:
        The children as the server stored them, by kind, for those applied now.
    """
    owner = owner_reference(body)
    trusted = cache if resync else None
    children = [c for c in render_children(resource, images) if c["kind"] not in hold]
    for child in children:
        child["metadata"]["ownerReferences"] = [owner]
    deployment_name = names(resource)["deployment"]
    live_deployment = _known(kube, trusted, "apps/v1", "Deployment", resource.namespace,
                             deployment_name)
    pending = [child for child in children if trusted is None or not trusted.unchanged(child)
               or (child["kind"] == "Deployment"
                   and needs_handover(resource, live_deployment))]
    if trusted is not None and pending and not _still_there(kube, body):
        return {}  # deleted since kopf's timer read it: nothing to put back
    taken = [child for child in pending if _taken(kube, trusted, child, owner["uid"])]
    if taken:
        raise name_conflict(body, resource, taken)
    stored = {}
    for child in pending:
        if child["kind"] == "Deployment" and resource.spec.autoscaling is not None:
            _hand_replicas_to_hpa(kube, body, resource, child, live_deployment)
        # Every child before this one is on the server by now (applied, or unchanged since):
        # named the same on every try, so that a failure's message does not change.
        applied = [f"{c['kind']} {c['metadata']['name']!r}"
                   for c in children[:children.index(child)]]
        stored[child["kind"]] = _apply(kube, body, child, cache, applied=applied)
    wanted = {child["kind"] for child in children}
    for api_version, kind, role in OPTIONAL_CHILDREN:
        if kind in wanted:
            continue
        name = names(resource)[role]
        existing = _known(kube, trusted, api_version, kind, resource.namespace, name)
        if existing is not None and owned_by(existing, owner["uid"]):
            kube.delete(api_version, kind, resource.namespace, name)
            if cache is not None:
                cache.forget((api_version, kind, resource.namespace, name))
    return stored


def _still_there(kube: Kube, body: Mapping[str, Any]) -> bool:
    """Whether the resource still exists, as this uid, and is not being deleted.

    A resync's body can be older than a deletion: applying children then would recreate
    them for an owner that is gone (the garbage collector would remove them again).
    """
    meta = body["metadata"]
    current = kube.get(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])
    current_meta = (current or {}).get("metadata") or {}
    return current_meta.get("uid") == meta.get("uid") and not current_meta.get(
        "deletionTimestamp")


def _known(kube: Kube, cache: ChildCache | None, api_version: str, kind: str, namespace: str,
           name: str) -> Obj | None:
    """A child as the watches last saw it (a resync), else as the API server has it now."""
    if cache is not None:
        return cache.live((api_version, kind, namespace, name))
    return kube.get(api_version, kind, namespace, name)


def _apply(kube: Kube, body: Mapping[str, Any], child: Obj, cache: ChildCache | None,
           field_manager: str = FIELD_MANAGER, applied: Sequence[str] = ()) -> Obj:
    """Apply one child; a refusal is this generation's failure, anything else a retry.

    The children before it in the render order (``applied``: on the server by now) are
    named in the message and left in place: they are owned by the resource (the garbage
    collector removes them with it), the next try applies them again unchanged, and without
    the Deployment they serve nothing. Deleting them on every failed try would only add
    churn.
    """
    try:
        stored = kube.apply(child, field_manager)
    except ApiException as err:
        what = f"{child['kind']} {child['metadata']['name']!r}"
        message = f"the API server refused {what} ({err.status}): {server_message(err)}"
        if applied:
            message += f" (applied before it, and kept: {', '.join(applied)})"
        if is_permanent(err):
            raise invalid(body, message, reason=APPLY_REJECTED) from None
        raise RetryLater(message, retry_after(err)) from None
    if cache is not None and field_manager == FIELD_MANAGER:
        cache.applied(child, stored)
    return stored


def owns_replicas(deployment: Mapping[str, Any] | None, manager: str = FIELD_MANAGER) -> bool:
    """Whether ``manager`` applied ``spec.replicas`` of ``deployment`` (managedFields)."""
    for entry in ((deployment or {}).get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
            if "f:replicas" in spec:
                return True
    return False


def needs_handover(resource: Resource, deployment: Mapping[str, Any] | None) -> bool:
    """Autoscaling is on, but the operator's apply still owns the replica count."""
    return resource.spec.autoscaling is not None and (
        deployment is None or owns_replicas(deployment))


def handover_manifest(resource: Resource, deployment: Mapping[str, Any] | None) -> Obj:
    """The replicas-only configuration that keeps the count while the HPA takes it over.

    Server-side apply resets a field to its default (1 for replicas) when its only
    manager stops sending it. The Kubernetes docs ("Transferring ownership") hand a
    field to the HPA this way: apply the current value with a second field manager
    first, so that the field keeps an owner; the HPA's first scale then takes it from
    that manager. A new Deployment starts at the spec's count, kept within the HPA's
    bounds.
    """
    scaling = resource.spec.autoscaling
    assert scaling is not None
    if deployment is not None:
        replicas = int((deployment.get("spec") or {}).get("replicas") or 1)
    else:
        replicas = min(max(resource.spec.replicas, scaling.min_replicas), scaling.max_replicas)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": names(resource)["deployment"],
                         "namespace": resource.namespace},
            "spec": {"replicas": replicas}}


def _hand_replicas_to_hpa(kube: Kube, body: Mapping[str, Any], resource: Resource,
                          deployment: Obj, live: Obj | None) -> None:
    """Before the operator's apply drops ``spec.replicas``, give it a second owner.

    A new Deployment is created with the count first (it cannot be created from a
    replicas-only configuration), then handed over like an existing one. Where no
    managedFields are reported, the handover is done anyway: it only repeats the count.
    """
    meta = deployment["metadata"]
    live = live or kube.get("apps/v1", "Deployment", meta["namespace"], meta["name"])
    if live is None:
        first = {**deployment, "spec": {**deployment["spec"],
                                        **handover_manifest(resource, None)["spec"]}}
        live = _apply(kube, body, first, None)
    if owns_replicas(live) or not (live.get("metadata") or {}).get("managedFields"):
        _apply(kube, body, handover_manifest(resource, live), None, HANDOVER_MANAGER)


def name_conflict(body: Mapping[str, Any], resource: Resource,
                  taken: list[Obj]) -> InvalidResource:
    """The failure for children whose names belong to objects someone else owns."""
    listed = "; ".join(f"{c['kind']} {c['metadata']['name']!r} already exists in namespace "
                       f"{resource.namespace!r} and is not owned by this {resource.kind}"
                       for c in taken)
    return invalid(body, f"{listed}: delete or rename it, or give this resource another name",
                   reason="NameConflict")


def _taken(kube: Kube, cache: ChildCache | None, child: Mapping[str, Any], uid: str) -> bool:
    """Whether an object with ``child``'s name exists and belongs to someone else."""
    if cache is not None:
        seen = cache.live(key_of(child))
        if seen is not None and owned_by(seen, uid):
            return False  # ours, as the watch saw it: no need to read it back
    meta = child["metadata"]
    existing = kube.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])
    return existing is not None and not owned_by(existing, uid)


def owned_by(child: Mapping[str, Any], uid: str) -> bool:
    """Whether ``child`` belongs to the resource ``uid`` (never delete someone else's)."""
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def observe(kube: Kube, body: Mapping[str, Any], resource: Resource,
            deployment: Obj | None = None, generation: int | None = None,
            artifacts_state: tuple[Any, str, str] | None = None) -> ResourceStatus:
    """The Deployment (and its pods while not all are ready) as a status.

    Args:
        deployment: the Deployment as just applied or watched; read when not given.
        generation: the generation whose children are out there (the one applied).
    """
    if deployment is None:
        deployment = kube.get("apps/v1", "Deployment", resource.namespace,
                              names(resource)["deployment"])
    desired = resource.spec.replicas
    if resource.spec.autoscaling is not None and deployment is not None:
        desired = int((deployment.get("spec") or {}).get("replicas") or 0)
    status = (deployment or {}).get("status") or {}
    pods = []
    if int(status.get("readyReplicas") or 0) < desired:
        pods = kube.list("v1", "Pod", resource.namespace, selector_labels(resource))
    template = ((deployment or {}).get("spec") or {}).get("template") or {}
    config_hash = ((template.get("metadata") or {}).get("annotations") or {}).get(
        CONFIG_HASH_ANNOTATION, "")
    if generation is None:
        generation = int(body["metadata"].get("generation") or 1)
    if artifacts_state is None and (prepare_mode(resource) == "job"
                                    or needs_resolve(resource)):
        # A status-only refresh: the prepare (or resolve) Job's verdict stands until the
        # next reconcile.
        last = next((c for c in previous_status(body).conditions
                     if c.type == "ArtifactsReady"), None)
        if last is not None:
            artifacts_state = (last.status, last.reason, last.message)
    download = ""
    if artifacts_state is None and pods and not int(status.get("readyReplicas") or 0):
        # Per-pod prepare, no pod ready yet: a prepare init container may be downloading.
        def pod_log(pod: str, container: str) -> str:
            return kube.pod_log(resource.namespace, pod, container)

        download = artifacts.download_progress(pods, "prepare", pod_log, resource.name,
                                               init=True)
    observed = Observed(generation, desired, deployment, pods, artifacts_state, download)
    return observed_status(observed, previous_status(body), selector=selector_string(resource),
                           endpoints=endpoints(resource), config_hash=config_hash, now=now())


def reconcile(kube: Kube, body: Mapping[str, Any], images: Images,
              cache: ChildCache | None = None, *, resync: bool = False,
              policy: OperatorPolicy = DEFAULT_POLICY) -> ResourceStatus:
    """Make the cluster match the resource, and say how far it got.

    Args:
        cache: the children as watched, and what was applied to them.
        resync: trust ``cache``: only what changed is read and applied.
        policy: what the operator's configuration allows; checked before anything is
            rendered or applied.
    """
    resource = parse(body, policy)
    check_allowed(body, resource, policy)
    resource = with_default_prepare(kube, resource)
    previous = previous_status(body)

    def apply_owned(child: Obj) -> Obj:
        """Apply an artifacts child (claim, Job): never one that someone else owns (a
        user's claim named like ours would otherwise be adopted, and deleted with us)."""
        owner = owner_reference(body)
        if _taken(kube, None, child, owner["uid"]):
            raise name_conflict(body, resource, [child])
        child["metadata"]["ownerReferences"] = [owner]
        return _apply(kube, body, child, None)

    def get_child(child: Obj) -> Obj | None:
        meta = child["metadata"]
        return kube.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])

    def job_pods(job: str) -> list[Obj]:
        return job_pods_of(kube, resource.namespace, job)

    def pod_log(pod: str, container: str) -> str:
        return kube.pod_log(resource.namespace, pod, container)

    # A moving model source is resolved first: nothing names an artifacts version before.
    resolving = needs_resolve(resource)
    plan = None if resolving else artifacts.plan(resource, previous, apply_owned, get_child,
                                                  images, job_pods, pod_log)
    hold = plan.hold if plan else frozenset()
    if resolving:
        hold = artifacts.HELD_WHILE_PREPARING
    stored = apply_children(kube, body, resource, images, cache, resync=resync, hold=hold)
    if resolving:
        # After the other children: the resolve pod runs as the resource's ServiceAccount.
        resolution = artifacts.resolve(resource, previous, apply_owned, get_child, job_pods,
                                       images)
        assert resolution is not None
        if resolution.revision is not None:
            raise Pinned(pin(kube, body, resolution))
        plan = resolution.plan
    deployment = stored.get("Deployment")
    if deployment is None and cache is not None and resync:
        deployment = cache.live(("apps/v1", "Deployment", resource.namespace,
                                 names(resource)["deployment"]))
    status = observe(kube, body, resource, deployment,
                     artifacts_state=plan.condition if plan else None)
    status = status.model_copy(update={"model": model_status(resource)})
    if plan is None:
        return status
    cleaned = artifacts.clean_up(resource, previous, plan.version,
                                 lambda: deployment or status_deployment(kube, resource),
                                 apply_owned, images) if not plan.hold else \
        previous.artifacts_cleaned
    # What the version's prepare Job reported, kept only while it is that version's.
    return status.model_copy(update={
        "artifacts_version": plan.version, "artifacts_cleaned": cleaned,
        "index": _of_version(plan.index or previous.index, plan.version),
        "encoder": _of_version(plan.encoder or previous.encoder, plan.version)})


def _of_version(report: VersionReport | None, version: str | None) -> VersionReport | None:
    return report if report is not None and report.version == version else None


def job_pods_of(kube: Kube, namespace: str, job: str) -> list[Obj]:
    """The pods of Job ``job``, by the label the Job controller puts on them (its older
    name where the newer one finds none: clusters before Kubernetes 1.27)."""
    for label in ("batch.kubernetes.io/job-name", "job-name"):
        pods = kube.list("v1", "Pod", namespace, {label: job})
        if pods:
            return pods
    return []


def pin(kube: Kube, body: Mapping[str, Any], resolution: artifacts.Resolution) -> Obj:
    """Pin the resolved revision in the resource's annotation; then delete the resolve Job.

    The merge patch carries the resourceVersion the reconcile read: a spec changed since
    (another source) gets a 409 and a retry, never the old source's revision. The Job goes
    (its pods with it) once its answer is kept, so that removing the annotation later
    resolves afresh instead of reading this Job again.

    Returns:
        The resource as the server stored it.
    """
    assert resolution.revision is not None
    stored = kube.patch(dict(body), {"metadata": {"annotations": {
        MODEL_REVISION_ANNOTATION: resolution.revision}}})
    meta = resolution.job["metadata"]
    kube.delete("batch/v1", "Job", meta["namespace"], meta["name"], propagation="Background")
    return stored


def model_status(resource: Resource) -> ModelStatus | None:
    """``status.model``: the source and its exact revision, while the resource has one."""
    revision = model_revision(resource)
    if revision is None or revision == UNRESOLVED:
        return None
    return ModelStatus(source=resource.spec.model.source, resolved_revision=revision)


def status_deployment(kube: Kube, resource: Resource) -> Obj | None:
    return kube.get("apps/v1", "Deployment", resource.namespace, names(resource)["deployment"])


def refresh(kube: Kube, body: Mapping[str, Any], deployment: Obj | None = None,
            policy: OperatorPolicy = DEFAULT_POLICY) -> ResourceStatus | None:
    """Status only, without applying (a child changed), for the generation last applied.

    The status says which generation its children come from. A child's event may come
    before the handlers applied a new spec: then the generation in the body was never
    applied, and ``kubectl wait --for=condition=Available`` must not pass on the old
    pods. So nothing is refreshed until the status is of the body's own generation,
    nor while it reports a failure (a refused apply, a name taken): that stands until
    a reconcile clears it.

    Returns:
        None when there is nothing to refresh.
    """
    previous = previous_status(body)
    generation = int(body["metadata"].get("generation") or 1)
    if previous.observed_generation != generation or previous.phase == "Failed":
        return None
    try:
        resource = with_default_prepare(kube, parse(body, policy))
    except InvalidResource:
        return None
    return observe(kube, body, resource, deployment, generation)


def get_owner(kube: Kube, child: Mapping[str, Any]) -> Obj | None:
    """The tritonop resource that controls ``child``, if any."""
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("apiVersion") == f"{API_GROUP}/{API_VERSION}" and ref.get("kind") in KINDS:
            return kube.get(ref["apiVersion"], ref["kind"], meta["namespace"], ref["name"])
    return None


def status_dict(status: ResourceStatus) -> Obj:
    """The status as a merge patch: the endpoints carry nulls, which remove an address
    that no longer answers (``api.triton.expose`` turned off, or an older release's), and
    so does ``model`` when the resource has no exact revision (the annotation removed)."""
    body = status.model_dump(by_alias=True, exclude_none=True)
    if status.endpoints is not None:
        body["endpoints"] = status.endpoints.model_dump(by_alias=True)
    body.setdefault("model", None)
    return body


def rejected(status: ResourceStatus, generation: int) -> bool:
    """Whether the API server refused this generation's children (no use re-applying)."""
    rendered = next((c for c in status.conditions if c.type == "ConfigRendered"), None)
    return (status.phase == "Failed" and status.observed_generation == generation
            and rendered is not None and rendered.reason == APPLY_REJECTED)
