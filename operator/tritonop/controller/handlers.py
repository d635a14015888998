"""kopf handlers: thin decorators, one call down into :mod:`tritonop.controller.reconcile`.

Run with ``kopf run -m tritonop.controller.handlers --all-namespaces`` (or ``-n NS`` for
a namespaced install); the operator image does that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from tritonop import API_GROUP, API_VERSION
from tritonop.controller import kube as kube_api
from tritonop.controller.reconcile import (
    InvalidResource,
    get_owner,
    previous_status,
    reconcile,
    refresh,
    status_dict,
)
from tritonop.render.kubernetes import Images
from tritonop.status import ResourceStatus

RESYNC_SECONDS = float(os.environ.get("TRITONOP_RESYNC_SECONDS", "30"))
PLURALS = ("embeddingsearches", "llmservices")
MANAGED_BY = "app.kubernetes.io/managed-by=tritonop"
_state: dict[str, Any] = {}


def _kube() -> kube_api.Kube:
    if "kube" not in _state:
        kube_api.load_configuration()
        _state["kube"] = kube_api.Kube()
    return _state["kube"]


def _images() -> Images:
    defaults = Images()
    return Images(triton=os.environ.get("TRITONOP_TRITON_IMAGE", defaults.triton),
                  operator=os.environ.get("TRITONOP_OPERATOR_IMAGE", defaults.operator))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping in our own annotations, out of the status we publish."""
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    # Our own Events say what happened; kopf's per-log-line events would drown them.
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = os.environ.get("TRITONOP_SCAN_NAMESPACES", "") != "true"
    settings.watching.server_timeout = 300
    # Only our Deployments: filtered by the API server, not after listing them all.
    settings.watching.label_selectors["apps", "deployments"] = MANAGED_BY


def announce(body: Mapping[str, Any], before: ResourceStatus, after: ResourceStatus) -> None:
    """An Event on the resource for every phase change."""
    if before.phase != after.phase or (after.phase == "Failed" and
                                       before.observed_generation != after.observed_generation):
        kind = "Warning" if after.phase in ("Degraded", "Failed") else "Normal"
        kopf.event(dict(body), type=kind, reason=after.phase, message=after.message)


def publish(kube: kube_api.Kube, body: Mapping[str, Any], before: ResourceStatus,
            after: ResourceStatus) -> None:
    """Write a changed status and announce its phase change, if no one else did first."""
    if after != before and kube.patch_status(dict(body), status_dict(after)):
        announce(body, before, after)


def _run(body: kopf.Body, *, retry_invalid: bool) -> None:
    kube = _kube()
    before = previous_status(body)
    try:
        after = reconcile(kube, body, _images())
    except InvalidResource as err:
        if after_failure(before, err.status):
            publish(kube, body, before, err.status)
        if retry_invalid:
            raise kopf.PermanentError(str(err)) from None
        return
    publish(kube, body, before, after)


def after_failure(before: ResourceStatus, failed: ResourceStatus) -> bool:
    """Whether this failure is news: the same generation is reported Failed only once."""
    return (before.phase, before.observed_generation, before.message) != \
        (failed.phase, failed.observed_generation, failed.message)


for _plural in PLURALS:

    @kopf.on.create(API_GROUP, API_VERSION, _plural)
    @kopf.on.update(API_GROUP, API_VERSION, _plural)
    @kopf.on.resume(API_GROUP, API_VERSION, _plural)
    def reconcile_handler(body: kopf.Body, **_: Any) -> None:
        """Create, update and resume all run the same level-based reconcile."""
        _run(body, retry_invalid=True)

    @kopf.timer(API_GROUP, API_VERSION, _plural, interval=RESYNC_SECONDS,
                initial_delay=RESYNC_SECONDS)
    def resync(body: kopf.Body, **_: Any) -> None:
        """Put back children deleted or edited by hand; refresh the status."""
        _run(body, retry_invalid=False)


@kopf.on.event("apps", "v1", "deployments",
               labels={"app.kubernetes.io/managed-by": "tritonop"})  # MANAGED_BY
def deployment_changed(body: kopf.Body, **_: Any) -> None:
    """A Triton Deployment changed (pods became ready, a rollout stalled): update its owner."""
    kube = _kube()
    owner = get_owner(kube, body)
    if owner is None:
        return
    after = refresh(kube, owner)
    if after is not None:
        publish(kube, owner, previous_status(owner), after)
