"""kopf handlers: thin decorators, one call down into :mod:`tritonop.controller.reconcile`.

Run with ``kopf run -m tritonop.controller.handlers --all-namespaces`` (or ``-n NS`` for
a namespaced install); the operator image does that.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from tritonop import API_GROUP, API_VERSION
from tritonop.controller import discovery
from tritonop.controller import kube as kube_api
from tritonop.controller.cache import ChildCache
from tritonop.controller.observe import APPLY_FAILING, failing_status
from tritonop.controller.policy import OperatorPolicy
from tritonop.controller.reconcile import (
    InvalidResource,
    Pinned,
    RetryLater,
    get_owner,
    now,
    previous_status,
    reconcile,
    refresh,
    rejected,
    status_dict,
)
from tritonop.controller.serial import PerObject, Rejections
from tritonop.render.kubernetes import Images, needs_resolve
from tritonop.resources import MODEL_REVISION_ANNOTATION, ResourceError, parse_resource
from tritonop.status import ResourceStatus

RESYNC_SECONDS = float(os.environ.get("TRITONOP_RESYNC_SECONDS", "30"))
# A resync still applies every child at least this often, whatever the watches showed.
FULL_RESYNC_SECONDS = float(os.environ.get("TRITONOP_FULL_RESYNC_SECONDS", "600"))
PLURALS = ("embeddingsearches", "llmservices")
MANAGED_BY = "app.kubernetes.io/managed-by=tritonop"
# The children kopf watches into the cache: (group, version, plural).
CHILD_KINDS = (("", "v1", "configmaps"), ("", "v1", "services"), ("", "v1", "serviceaccounts"),
               ("apps", "v1", "deployments"), ("policy", "v1", "poddisruptionbudgets"),
               ("autoscaling", "v2", "horizontalpodautoscalers"),
               ("networking.k8s.io", "v1", "networkpolicies"), ("batch", "v1", "jobs"))
MAX_RETRY_DELAY = 60.0
# Failed applies (5xx, timeouts) of one generation in a row before the status says so.
APPLY_FAILING_AFTER = 3
_apply_failures: dict[str, tuple[int, int]] = {}  # uid -> (generation, failed applies in a row)
# A generation the API server refused (4xx) is applied again after 30 s, 1 min, 2, 4, 8,
# then every 10 min: the cause may be outside the spec (RBAC, a webhook) and fixed later.
REJECTED_RETRY_SECONDS = float(os.environ.get("TRITONOP_REJECTED_RETRY_SECONDS", "30"))
REJECTED_RETRY_MAX_SECONDS = float(os.environ.get("TRITONOP_REJECTED_RETRY_MAX_SECONDS", "600"))
_state: dict[str, Any] = {}
_objects = PerObject()
_children = ChildCache(max_age=FULL_RESYNC_SECONDS)
_rejections = Rejections(REJECTED_RETRY_SECONDS, REJECTED_RETRY_MAX_SECONDS)


def _kube() -> kube_api.Kube:
    if "kube" not in _state:
        kube_api.load_configuration()
        _state["kube"] = kube_api.Kube()
    return _state["kube"]


def _images() -> Images:
    defaults = Images()
    return Images(triton=os.environ.get("TRITONOP_TRITON_IMAGE", defaults.triton),
                  operator=os.environ.get("TRITONOP_OPERATOR_IMAGE", defaults.operator))


# What resources may ask for (host paths, images, corpus size): the operator's own
# configuration, read once as it starts; a value it does not understand stops the start.
POLICY = OperatorPolicy.from_environment(os.environ, _images())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping in our own annotations, out of the status we publish."""
    # No handler needs a finalizer (children go by garbage collection); kopf removes
    # this one, which older versions added, from every resource it sees.
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    # Our own Events say what happened; kopf's per-log-line events would drown them.
    settings.posting.level = logging.WARNING
    # Watch CustomResourceDefinitions, so that CRDs installed after the operator started
    # are served. A namespaced install may not (its Role cannot grant cluster-scoped
    # reads; kopf would retry the 403s for minutes), so deploy/namespaced/ sets
    # TRITONOP_WATCH_CRDS=false: it serves the CRDs present at its start.
    settings.scanning.disabled = os.environ.get("TRITONOP_WATCH_CRDS", "true") != "true"
    settings.watching.server_timeout = 300
    # Only our children: filtered by the API server, not after listing them all.
    for group, _version, plural in CHILD_KINDS:
        settings.watching.label_selectors[group, plural] = MANAGED_BY


def announce(body: Mapping[str, Any], before: ResourceStatus, after: ResourceStatus) -> None:
    """An Event on the resource for every phase change, and for every new failure.

    A new ArtifactsReady failure (a resolve or prepare Job failed) gets its own Warning
    where the phase's Event does not say it already: a resource that keeps serving stays
    Ready, and its users would not learn otherwise that the new version will not come.
    """
    told = None
    if before.phase != after.phase or (after.phase == "Failed" and (
            before.observed_generation != after.observed_generation
            or before.message != after.message)):
        kind = "Warning" if after.phase in ("Degraded", "Failed") else "Normal"
        kopf.event(dict(body), type=kind, reason=after.phase, message=after.message)
        told = after.message
    failure = new_artifacts_failure(before, after)
    if failure is not None and failure != told:
        kopf.event(dict(body), type="Warning", reason=PREPARE_FAILED, message=failure)


PREPARE_FAILED = "PrepareFailed"


def new_artifacts_failure(before: ResourceStatus, after: ResourceStatus) -> str | None:
    """The message of an ArtifactsReady PrepareFailed that ``before`` did not report."""
    def failed(status: ResourceStatus) -> str | None:
        found = next((c for c in status.conditions if c.type == "ArtifactsReady"), None)
        return found.message if found is not None and found.reason == PREPARE_FAILED else None

    message = failed(after)
    return message if message is not None and message != failed(before) else None


def publish(kube: kube_api.Kube, body: Mapping[str, Any], before: ResourceStatus,
            after: ResourceStatus) -> None:
    """Write a changed status and announce its phase change, if no one else did first."""
    if after != before and kube.patch_status(dict(body), status_dict(after)):
        announce(body, before, after)


def _failed_apply(uid: str, generation: int) -> int:
    """Count one more failed apply of this generation; how many in a row, resyncs included
    (kopf counts a handler's retries and a timer's apart)."""
    counted, failures = _apply_failures.get(uid, (generation, 0))
    failures = failures + 1 if counted == generation else 1
    _apply_failures[uid] = (generation, failures)
    return failures


def report_failing(body: Mapping[str, Any], before: ResourceStatus, generation: int,
                   message: str) -> None:
    """Say that this generation's children keep failing to apply: a condition, and one
    Warning Event while the message stays the same (the retries go on, backing off)."""
    after = failing_status(message, generation, before, now())
    if after != before and _kube().patch_status(dict(body), status_dict(after)):
        kopf.event(dict(body), type="Warning", reason=APPLY_FAILING, message=message)


def retry_delay(retry: int, server_says: float | None = None) -> float:
    """Exponential backoff for requests the API server could not take (1 s, 2 s, ... 60 s)."""
    if server_says is not None:
        return min(max(server_says, 1.0), MAX_RETRY_DELAY)
    return min(2.0 ** min(retry, 16), MAX_RETRY_DELAY)


def _run(live_body: Mapping[str, Any], *, resync: bool, retry: int) -> None:
    """One reconcile of one resource, under its lock, from one reading of its body.

    Args:
        resync: from the timer: children unchanged since the last apply are skipped, and
            a generation the API server refused is applied again only when its backoff
            (:data:`_rejections`) has passed, then in full.
    """
    uid = live_body["metadata"]["uid"]
    with _objects.hold(uid):
        body = copy.deepcopy(dict(live_body))  # kopf updates a timer's body as events come
        generation = int(body["metadata"].get("generation") or 1)
        if body["metadata"].get("deletionTimestamp"):
            _objects.forget(uid)
            _rejections.forget(uid)
            _apply_failures.pop(uid, None)
            return  # the garbage collector removes the children
        before = previous_status(body)
        if _objects.stale(uid, generation):
            return
        retrying = resync and rejected(before, generation)
        if retrying and not _rejections.due(uid, generation):
            return
        try:
            _reconcile_and_publish(body, before, resync=resync, full=retrying)
        except RetryLater as err:
            _count_failure(body, before, generation, str(err))
            raise kopf.TemporaryError(str(err), delay=retry_delay(retry, err.delay)) from None
        except (ApiException, urllib3.exceptions.HTTPError) as err:
            # A read or a status write failed or timed out: nothing was refused, so try
            # again, backing off.
            message = f"API request failed: {kube_api.describe_error(err)}"
            _count_failure(body, before, generation, message)
            raise kopf.TemporaryError(message, delay=retry_delay(retry)) from None


def _count_failure(body: Mapping[str, Any], before: ResourceStatus, generation: int,
                   message: str) -> None:
    """Count a failed try; from the third in a row on, say so in the status (the status
    write may fail too: the next try says it then)."""
    if _failed_apply(body["metadata"]["uid"], generation) < APPLY_FAILING_AFTER:
        return
    try:
        report_failing(body, before, generation, f"{message}; retrying")
    except (ApiException, urllib3.exceptions.HTTPError):
        pass


def _reconcile_and_publish(body: Mapping[str, Any], before: ResourceStatus, *,
                           resync: bool, full: bool = False) -> None:
    """Reconcile and write the status; a refusal is published once, not per try.

    Args:
        full: read and apply every child, trusting no cache (a refused generation's retry).
    """
    kube = _kube()
    uid = body["metadata"]["uid"]
    generation = int(body["metadata"].get("generation") or 1)
    try:
        try:
            after = reconcile(kube, body, _images(), _children, resync=resync and not full,
                              policy=POLICY)
        except Pinned as pinned:
            # The model revision was just pinned: render the pinned version now, and write
            # the status onto the resource as the annotation left it.
            body, before = pinned.body, previous_status(pinned.body)
            after = reconcile(kube, body, _images(), _children, policy=POLICY)
    except InvalidResource as err:
        if rejected(err.status, generation):
            pause = _rejections.refused(uid, generation)
            logging.getLogger(__name__).info(
                "%s/%s generation %d refused by the API server; trying again in %.0f s",
                body["metadata"]["namespace"], body["metadata"]["name"], generation, pause)
        if after_failure(before, err.status):
            publish(kube, body, before, err.status)
        if not resync:
            raise kopf.PermanentError(str(err)) from None
        return
    _rejections.forget(uid)
    _apply_failures.pop(uid, None)
    _objects.record(uid, generation)
    publish(kube, body, before, after)


def after_failure(before: ResourceStatus, failed: ResourceStatus) -> bool:
    """Whether this failure is news: the same generation is reported Failed only once."""
    return (before.phase, before.observed_generation, before.message) != \
        (failed.phase, failed.observed_generation, failed.message)


for _plural in PLURALS:

    @kopf.on.create(API_GROUP, API_VERSION, _plural)
    @kopf.on.update(API_GROUP, API_VERSION, _plural)
    @kopf.on.resume(API_GROUP, API_VERSION, _plural)
    def reconcile_handler(body: kopf.Body, retry: int = 0, **_: Any) -> None:
        """Create, update and resume all run the same level-based reconcile."""
        _run(body, resync=False, retry=retry)

    @kopf.timer(API_GROUP, API_VERSION, _plural, interval=RESYNC_SECONDS,
                initial_delay=RESYNC_SECONDS)
    def resync(body: kopf.Body, retry: int = 0, **_: Any) -> None:
        """Put back children deleted or edited by hand; refresh the status."""
        _run(body, resync=True, retry=retry)

    @kopf.on.event(API_GROUP, API_VERSION, _plural)
    def revision_unpinned(body: kopf.Body, type: str | None, **_: Any) -> None:
        """The model-revision annotation was removed: resolve the source again now.

        kopf's change handlers do not see it (it ignores the annotations under the prefix
        its own bookkeeping uses), and the next resync could be minutes away.
        """
        if type == "MODIFIED" and unpinned(body):
            try:
                _run(body, resync=False, retry=0)
            except (kopf.TemporaryError, kopf.PermanentError):
                pass  # the status says so; the timer's next run tries again


def unpinned(body: Mapping[str, Any]) -> bool:
    """Whether the status shows a model revision that the resource no longer pins: someone
    removed the ``serving.tritonop.dev/model-revision`` annotation of a moving source."""
    meta = body.get("metadata") or {}
    if MODEL_REVISION_ANNOTATION in (meta.get("annotations") or {}) or not (
            body.get("status") or {}).get("model"):
        return False
    try:
        resource = parse_resource({k: body.get(k) for k in ("apiVersion", "kind", "metadata",
                                                             "spec")})
    except ResourceError:
        return False
    return needs_resolve(resource)


def _timers_without_finalizer(registry: kopf.OperatorRegistry) -> None:
    """kopf 1.45 blocks deletion with a finalizer for every object that has a timer.

    Nothing needs to happen before a resource goes: its children are owned through
    ownerReferences and the API server's garbage collector removes them. A finalizer
    only makes deletion wait for the operator, forever while it is down, and
    ``kubectl delete -k deploy/`` can then deadlock (the operator goes first, its
    resources never). kopf stops a timer when its object is gone anyway. There is no
    public switch for this; the handler records are kopf's (pinned, see pyproject.toml).
    """
    spawning = registry._spawning
    spawning._handlers[:] = [dataclasses.replace(handler, requires_finalizer=False)
                             for handler in spawning._handlers]


_timers_without_finalizer(kopf.get_default_registry())
discovery.install()  # CRDs installed later are served even when discovery lags behind


def _follow_children(group: str, version: str, plural: str) -> None:
    @kopf.on.event(group, version, plural, labels={"app.kubernetes.io/managed-by": "tritonop"})
    def child_seen(body: kopf.Body, type: str | None, **_: Any) -> None:
        """Keep the last-seen state of every child, so that a resync reads nothing."""
        _children.seen(type, body)
        if plural == "deployments":
            deployment_changed(body)
        elif plural == "jobs":
            job_changed(body)


def deployment_changed(body: Mapping[str, Any]) -> None:
    """A Triton Deployment changed (pods became ready, a rollout stalled): update its owner."""
    kube = _kube()
    owner = get_owner(kube, body)
    if owner is None:
        return
    with _objects.hold(owner["metadata"]["uid"]):
        after = refresh(kube, owner, dict(body), policy=POLICY)
        if after is not None:
            publish(kube, owner, previous_status(owner), after)


def job_changed(body: Mapping[str, Any]) -> None:
    """A prepare or resolve Job finished or failed: reconcile its owner now, not at the
    next resync.

    The owner's pods switch to the new artifacts version when the reconcile sees the Job
    complete, and a resolved revision is pinned then; waiting for the timer would add up to
    its period to every spec change.
    """
    conditions = (body.get("status") or {}).get("conditions") or []
    if not any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
               for c in conditions):
        return
    owner = get_owner(_kube(), body)
    if owner is not None:
        try:
            _run(owner, resync=False, retry=0)
        except kopf.TemporaryError:
            pass  # the timer's next run tries again


for _group, _version, _child_plural in CHILD_KINDS:
    _follow_children(_group, _version, _child_plural)
