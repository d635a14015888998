"""One idempotent reconcile: desired children applied, what is there observed, status made.

It runs from create, update, resume and a timer alike (level-based, not edge-based),
so a child deleted or edited by hand is put back by the next run, and a missed event
costs at most one timer period.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from tritonop import API_GROUP, API_VERSION
from tritonop.controller.kube import Kube, Obj
from tritonop.controller.observe import Observed, failed_status, observed_status
from tritonop.render.kubernetes import (
    CONFIG_HASH_ANNOTATION,
    Images,
    endpoints,
    names,
    render_children,
    selector_labels,
    selector_string,
)
from tritonop.resources import Resource, ResourceError, parse_resource
from tritonop.status import ResourceStatus

# Children that exist only when the spec asks for them: removed when it stops asking.
OPTIONAL_CHILDREN = (
    ("policy/v1", "PodDisruptionBudget", "budget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "autoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy", "policy"),
)
KINDS = ("EmbeddingSearch", "LLMService")


class InvalidResource(Exception):
    """The spec cannot be served; ``status`` says so and what to fix."""

    def __init__(self, message: str, status: ResourceStatus) -> None:
        super().__init__(message)
        self.status = status


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def parse(body: Mapping[str, Any]) -> Resource:
    """The resource, or :class:`InvalidResource` with a Failed status."""
    try:
        return parse_resource({k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")})
    except ResourceError as err:
        raise invalid(body, str(err)) from None


def apply_children(kube: Kube, body: Mapping[str, Any], resource: Resource, images: Images
                   ) -> None:
    """Apply every child with an owner reference; delete optional ones no longer wanted.

    Server-side apply with ``force`` would take over an object of the same name that
    someone else made (a hand-written Deployment, another resource's child). So children
    that exist but are not this resource's are reported, and nothing is applied until
    they are gone: the timer's next run picks it up from there.
    """
    owner = owner_reference(body)
    children = render_children(resource, images)
    taken = [child for child in children if _taken(kube, child, owner["uid"])]
    if taken:
        listed = "; ".join(f"{c['kind']} {c['metadata']['name']!r} already exists in namespace "
                           f"{resource.namespace!r} and is not owned by this {resource.kind}"
                           for c in taken)
        raise invalid(body, f"{listed}: delete or rename it, or give this resource another "
                      "name", reason="NameConflict")
    applied = set()
    for child in children:
        child["metadata"]["ownerReferences"] = [owner]
        kube.apply(child)
        applied.add(child["kind"])
    for api_version, kind, role in OPTIONAL_CHILDREN:
        if kind in applied:
            continue
        existing = kube.get(api_version, kind, resource.namespace, names(resource)[role])
        if existing is not None and owned_by(existing, owner["uid"]):
            kube.delete(api_version, kind, resource.namespace, names(resource)[role])


def _taken(kube: Kube, child: Mapping[str, Any], uid: str) -> bool:
    """Whether an object with ``child``'s name exists and belongs to someone else."""
    meta = child["metadata"]
    existing = kube.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])
    return existing is not None and not owned_by(existing, uid)


def owned_by(child: Mapping[str, Any], uid: str) -> bool:
    """Whether ``child`` belongs to the resource ``uid`` (never delete someone else's)."""
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def observe(kube: Kube, body: Mapping[str, Any], resource: Resource) -> ResourceStatus:
    """Read the Deployment (and its pods while not all are ready) into a status."""
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
    observed = Observed(int(body["metadata"].get("generation") or 1), desired, deployment, pods)
    return observed_status(observed, previous_status(body), selector=selector_string(resource),
                           endpoints=endpoints(resource), config_hash=config_hash, now=now())


def reconcile(kube: Kube, body: Mapping[str, Any], images: Images) -> ResourceStatus:
    """Make the cluster match the resource, and say how far it got."""
    resource = parse(body)
    apply_children(kube, body, resource, images)
    return observe(kube, body, resource)


def refresh(kube: Kube, body: Mapping[str, Any]) -> ResourceStatus | None:
    """Status only, without applying (when a child changed); None for an invalid spec."""
    try:
        resource = parse(body)
    except InvalidResource:
        return None
    return observe(kube, body, resource)


def get_owner(kube: Kube, child: Mapping[str, Any]) -> Obj | None:
    """The tritonop resource that controls ``child``, if any."""
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("apiVersion") == f"{API_GROUP}/{API_VERSION}" and ref.get("kind") in KINDS:
            return kube.get(ref["apiVersion"], ref["kind"], meta["namespace"], ref["name"])
    return None


def status_dict(status: ResourceStatus) -> Obj:
    return status.model_dump(by_alias=True, exclude_none=True)
