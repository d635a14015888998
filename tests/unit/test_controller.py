"""The operator's pure parts: error mapping, replicas handover, cache, serialisation, timeout."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tritonop.controller import handlers
from tritonop.controller.cache import ChildCache
from tritonop.controller.kube import Kube, Obj, is_permanent, retry_after, server_message
from tritonop.controller.reconcile import (
    HANDOVER_MANAGER,
    handover_manifest,
    needs_handover,
    owns_replicas,
    parse,
    refresh,
    rejected,
)
from tritonop.controller.serial import PerObject, Rejections
from tritonop.status import Condition, ResourceStatus


def body(generation: int = 1, status: dict | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "EmbeddingSearch",
            "metadata": {"name": "news", "namespace": "ml", "uid": "u1", "generation": generation,
                         "resourceVersion": "5"},
            "spec": {"corpus": {"source": "corpus/debian-packages.jsonl"}, **spec},
            "status": status or {}}


# Errors from the API server --------------------------------------------------------------

def api_error(status: int, message: str = "", headers: dict | None = None) -> ApiException:
    error = ApiException(status=status, reason="Reason",
                         body=json.dumps({"kind": "Status", "message": message}))
    error.headers = headers
    return error


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_a_refusal_is_permanent(status):
    assert is_permanent(api_error(status))


@pytest.mark.parametrize("status", [401, 408, 409, 429, 500, 503, 504])
def test_conflicts_throttling_and_server_errors_are_retried(status):
    assert not is_permanent(api_error(status))


def test_a_server_that_cannot_map_a_new_crd_yet_is_retried():
    """OwnerReferencesPermissionEnforcement, in the 30 s after a CRD is installed."""
    assert not is_permanent(api_error(403, 'serviceaccounts "x" is forbidden: cannot set '
                                      "blockOwnerDeletion in this case because cannot find "
                                      "RESTMapping for APIVersion serving.tritonop.dev/v1alpha1"))
    assert is_permanent(api_error(403, 'serviceaccounts "x" is forbidden: User "y" cannot patch'))


def test_a_refused_generation_is_tried_again_after_a_doubling_pause():
    now = [0.0]
    rejections = Rejections(first=30, most=600, clock=lambda: now[0])
    assert [rejections.pause(n) for n in range(1, 8)] == [30, 60, 120, 240, 480, 600, 600]
    assert rejections.refused("u1", 3) == 30
    now[0] = 29.9
    assert not rejections.due("u1", 3)
    now[0] = 30.0
    assert rejections.due("u1", 3)
    assert rejections.refused("u1", 3) == 60  # refused again: the pause doubles
    now[0] = 89.0
    assert not rejections.due("u1", 3)
    assert rejections.refused("u1", 4) == 30  # a new generation starts over
    rejections.forget("u1")
    assert not rejections.due("u1", 4)  # a refusal seen only in the status waits a pause
    now[0] += 30
    assert rejections.due("u1", 4)


def test_the_servers_own_message_is_kept():
    assert server_message(api_error(422, 'Deployment.apps "x" is invalid')) == \
        'Deployment.apps "x" is invalid'
    assert server_message(ApiException(status=502, reason="Bad Gateway", body=b"<html>")) == \
        "Bad Gateway"


def test_retry_after_is_honoured_within_bounds():
    assert retry_after(api_error(429, headers={"Retry-After": "7"})) == 7.0
    assert handlers.retry_delay(0, 7.0) == 7.0
    assert handlers.retry_delay(0, 3600.0) == handlers.MAX_RETRY_DELAY
    assert [handlers.retry_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_a_failed_status_for_a_refused_apply_stops_the_resync_for_that_generation():
    condition = Condition(type="ConfigRendered", status="False", reason="ApplyRejected",
                          message="refused", last_transition_time="T")
    failed = ResourceStatus(phase="Failed", observed_generation=3, conditions=[condition])
    assert rejected(failed, 3)
    assert not rejected(failed, 4)  # a new spec is tried
    name_taken = failed.model_copy(update={"conditions": [condition.model_copy(
        update={"reason": "NameConflict"})]})
    assert not rejected(name_taken, 3)  # served at a resync once the name is free


# Replicas handed to the HPA --------------------------------------------------------------

def managed(manager: str, operation: str = "Apply", replicas: bool = True) -> dict:
    spec = {"f:replicas": {}, "f:template": {}} if replicas else {"f:template": {}}
    return {"manager": manager, "operation": operation, "apiVersion": "apps/v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": spec}}


def deployment(replicas: int, *fields: dict) -> dict:
    return {"metadata": {"name": "news-triton", "namespace": "ml", "managedFields": list(fields)},
            "spec": {"replicas": replicas}}


def test_who_owns_replicas_is_read_from_managed_fields():
    assert owns_replicas(deployment(3, managed("tritonop")))
    assert not owns_replicas(deployment(3, managed("tritonop", replicas=False),
                                        managed("kube-controller-manager", "Update")))
    assert not owns_replicas(deployment(3, managed("tritonop", "Update")))


def test_a_handover_is_needed_only_while_the_operator_owns_replicas_under_an_hpa():
    scaled = parse(body(autoscaling={"minReplicas": 2, "maxReplicas": 5}))
    fixed = parse(body(replicas=3))
    assert needs_handover(scaled, deployment(3, managed("tritonop")))
    assert needs_handover(scaled, None)
    assert not needs_handover(scaled, deployment(4, managed("tritonop", replicas=False),
                                                 managed("kube-controller-manager", "Update")))
    assert not needs_handover(fixed, deployment(3, managed("tritonop")))


def test_the_handover_keeps_the_live_count_and_starts_new_ones_within_bounds():
    scaled = parse(body(replicas=1, autoscaling={"minReplicas": 2, "maxReplicas": 5}))
    assert handover_manifest(scaled, deployment(4)) == {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "news-triton", "namespace": "ml"}, "spec": {"replicas": 4}}
    assert handover_manifest(scaled, None)["spec"] == {"replicas": 2}
    assert HANDOVER_MANAGER != "tritonop"


# The Deployment-event path ---------------------------------------------------------------

class NoCalls(Kube):
    """A Kube that must not be asked anything."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def _call(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Obj:
        self.calls.append((method, url))
        return {"items": []}


READY = {"metadata": {"generation": 1},
         "spec": {"replicas": 1, "template": {"metadata": {"annotations": {}}}},
         "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1,
                    "updatedReplicas": 1}}


def test_a_deployment_event_refreshes_the_generation_that_was_applied():
    status = {"phase": "Pending", "observedGeneration": 2}
    refreshed = refresh(NoCalls(), body(2, status), READY)
    assert refreshed is not None
    assert refreshed.phase == "Ready" and refreshed.observed_generation == 2


@pytest.mark.parametrize("status", [
    {"phase": "Ready", "observedGeneration": 1},  # generation 2 not applied yet
    {},  # nothing applied yet
    {"phase": "Failed", "observedGeneration": 2},  # a failure stands until a reconcile
])
def test_a_deployment_event_leaves_a_status_it_cannot_vouch_for(status):
    assert refresh(NoCalls(), body(2, status), READY) is None


# Cache of children -----------------------------------------------------------------------

def child(generation: int | None = 1, version: str = "10", uid: str = "c1") -> dict:
    meta = {"name": "news-triton", "namespace": "ml", "uid": uid, "resourceVersion": version}
    if generation is not None:
        meta["generation"] = generation
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"template": {}}}


def test_a_child_as_applied_is_unchanged_until_someone_changes_it():
    now = [0.0]
    cache = ChildCache(max_age=600, clock=lambda: now[0])
    manifest = {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "news-triton", "namespace": "ml"}, "spec": {"x": 1}}
    assert not cache.unchanged(manifest)  # never applied
    cache.applied(manifest, child(1, "10"))
    assert cache.unchanged(manifest)
    cache.seen("MODIFIED", child(1, "11"))  # its status moved: same generation
    assert cache.unchanged(manifest)
    cache.seen("MODIFIED", child(2, "12"))  # its spec was edited
    assert not cache.unchanged(manifest)
    cache.applied(manifest, child(3, "13"))
    assert not cache.unchanged({**manifest, "spec": {"x": 2}})  # the desired spec changed
    cache.seen("DELETED", child(3, "14"))
    assert not cache.unchanged(manifest)
    cache.applied(manifest, child(1, "20", uid="c2"))
    now[0] = 601.0
    assert not cache.unchanged(manifest), "applied again now and then, whatever was watched"


def test_kinds_without_a_generation_compare_their_resource_version():
    cache = ChildCache()
    manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "news-triton", "namespace": "ml"}, "data": {}}
    stored = {**child(None, "10"), "apiVersion": "v1", "kind": "ConfigMap"}
    cache.applied(manifest, stored)
    assert cache.unchanged(manifest)
    cache.seen("MODIFIED", {**stored, "metadata": {**stored["metadata"], "resourceVersion": "11"}})
    assert not cache.unchanged(manifest)


# One reconcile at a time per resource, never an older spec ----------------------------------

class Applying(Kube):
    """Records applies; everything asked for is absent, every status write wins."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, Any]] = []
        self.statuses: list[dict] = []

    def _call(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Obj:
        if method == "GET":
            if query:
                return {"items": []}
            raise ApiException(status=404, reason="NotFound", body=b"{}")
        if content_type == "application/apply-patch+yaml":
            self.applied.append((body["kind"], copy.deepcopy(body.get("spec"))))
            return {**body, "metadata": {**body["metadata"], "uid": "c", "generation": 1}}
        self.statuses.append(body)
        return {}


@pytest.fixture
def fake_kube(monkeypatch) -> Applying:
    kube = Applying()
    monkeypatch.setitem(handlers._state, "kube", kube)
    monkeypatch.setattr(handlers, "_objects", PerObject())
    monkeypatch.setattr(handlers, "_children", ChildCache())
    monkeypatch.setattr(handlers, "announce", lambda *args: None)  # kopf's event queue
    return kube


def deployment_replicas(kube: Applying) -> list[int]:
    return [spec.get("replicas") for kind, spec in kube.applied if kind == "Deployment"]


def test_an_older_generation_is_not_applied_over_a_newer_one(fake_kube):
    handlers._run(body(2, replicas=3), resync=False, retry=0)
    handlers._run(body(1, replicas=1), resync=True, retry=0)  # a timer's stale body
    assert deployment_replicas(fake_kube) == [3]


def test_the_body_is_read_once_even_when_kopf_updates_it_meanwhile(fake_kube, monkeypatch):
    live = body(1, replicas=1)
    original = fake_kube._call

    def racing(method: str, url: str, *args: Any, **kwargs: Any) -> Obj:
        live["spec"]["replicas"] = 5  # kopf updates a timer's body as events arrive
        live["metadata"]["generation"] = 2
        return original(method, url, *args, **kwargs)

    monkeypatch.setattr(fake_kube, "_call", racing)
    handlers._run(live, resync=False, retry=0)
    assert deployment_replicas(fake_kube) == [1]
    [status] = fake_kube.statuses
    assert status["status"]["observedGeneration"] == 1


def test_handlers_of_one_resource_take_turns(fake_kube, monkeypatch):
    inside, release = threading.Event(), threading.Event()
    original = handlers.reconcile
    order: list[str] = []

    def slow(kube: Kube, resource_body: dict, *args: Any, **kwargs: Any) -> Any:
        order.append(f"start {resource_body['metadata']['generation']}")
        if resource_body["metadata"]["generation"] == 1:
            inside.set()
            release.wait(5)
        result = original(kube, resource_body, *args, **kwargs)
        order.append(f"end {resource_body['metadata']['generation']}")
        return result

    monkeypatch.setattr(handlers, "reconcile", slow)
    first = threading.Thread(target=handlers._run, args=(body(1),),
                             kwargs={"resync": True, "retry": 0})
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=handlers._run, args=(body(2),),
                              kwargs={"resync": False, "retry": 0})
    second.start()
    time.sleep(0.2)
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["start 1", "end 1", "start 2", "end 2"]


# A request timeout -----------------------------------------------------------------------

def test_an_api_server_that_never_answers_times_out():
    """Without a timeout the read waits forever, and the handler thread with it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts the connection, never answers
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.getsockname()[1]}")
    configuration.retries = False
    kube = Kube(client.ApiClient(configuration), timeout=(1.0, 0.5))
    errors: list[BaseException] = []

    def read() -> None:
        try:
            kube.get("v1", "ConfigMap", "ml", "x")
        except Exception as err:
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    server.close()
    assert not reader.is_alive(), "the request never timed out"
    assert len(errors) == 1 and isinstance(errors[0], urllib3.exceptions.HTTPError), errors


class StatusAnswering(Applying):
    """Applies work; the status write answers ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    def _call(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Obj:
        if url.endswith("/status"):
            raise ApiException(status=self.status, reason="Reason", body=b"{}")
        return super()._call(method, url, body, query, content_type)


def test_a_status_write_to_a_resource_gone_meanwhile_is_no_error():
    assert StatusAnswering(404).patch_status(body(), {"phase": "Ready"}) is False


def test_a_status_write_the_server_cannot_take_is_retried_with_backoff(fake_kube, monkeypatch):
    monkeypatch.setitem(handlers._state, "kube", StatusAnswering(503))
    with pytest.raises(handlers.kopf.TemporaryError) as raised:
        handlers._run(body(1), resync=False, retry=3)
    assert raised.value.delay == 8


def test_a_resync_puts_nothing_back_for_a_resource_deleted_since_its_body_was_read(fake_kube):
    handlers._run(body(1), resync=True, retry=0)  # every GET answers 404: the owner too
    assert fake_kube.applied == []
    handlers._run(body(1), resync=False, retry=0)  # kopf's fresh body of a change
    assert deployment_replicas(fake_kube) == [1]
