"""The operator's decisions about a job-mode resource's artifacts (no API server)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.support.triton import API
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.controller.artifacts import HELD_WHILE_PREPARING, clean_up, job_state, plan
from tritonop.controller.kube import Kube
from tritonop.controller.reconcile import with_default_prepare
from tritonop.render.kubernetes import Images, prepare_mode
from tritonop.resources import parse_resource
from tritonop.status import ResourceStatus


def es(**spec: Any):
    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": "news", "namespace": "ml"},
                           "spec": {"corpus": {"source": "/artifacts/c.jsonl"},
                                    "artifacts": {"prepare": "job"}, **spec}})


class Server:
    """Applies record what was sent and answer with the Job status given."""

    def __init__(self, job_status: dict[str, Any] | None = None) -> None:
        self.applied: list[dict[str, Any]] = []
        self.job_status = job_status or {}

    def __call__(self, child: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(child)
        return {**child, "status": self.job_status} if child["kind"] == "Job" else child


def absent(child: dict[str, Any]) -> None:
    return None


def test_an_existing_job_is_read_not_applied_again():
    """Its pod template is immutable: a placement change must not make the apply fail."""
    server = Server()
    existing = {"metadata": {"name": "x"}, "status": {"active": 1}}
    running = plan(es(nodeSelector={"pool": "b"}), ResourceStatus(), server,
                   lambda child: existing if child["kind"] == "Job" else None, Images())
    assert [c["kind"] for c in server.applied] == ["PersistentVolumeClaim"]
    assert running.condition[1] == "Preparing"


def test_a_current_version_prepares_nothing():
    resource = es(replicas=5, stages={"encoder": {"maxBatchSize": 4}})
    server = Server()
    done = plan(resource, ResourceStatus(artifacts_version=resource_fingerprint(es())),
                server, absent, Images())
    assert server.applied == [] and done.hold == frozenset()
    assert done.condition[0] == "True" and done.version == resource_fingerprint(resource)


def test_a_new_version_holds_the_pods_while_its_job_runs():
    old = resource_fingerprint(es())
    server = Server({"active": 1})
    new = es(model={"pooling": "cls"})
    running = plan(new, ResourceStatus(artifacts_version=old), server, absent, Images())
    assert [c["kind"] for c in server.applied] == ["PersistentVolumeClaim", "Job"]
    assert running.hold == HELD_WHILE_PREPARING and running.version == old
    assert running.condition[:2] == ("False", "Preparing")
    assert resource_fingerprint(new) in running.condition[2] and old in running.condition[2]


def test_a_complete_job_switches_to_its_version():
    server = Server({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    done = plan(es(), ResourceStatus(), server, absent, Images())
    assert done.hold == frozenset() and done.version == resource_fingerprint(es())
    assert done.condition[:2] == ("True", "Prepared")


def test_a_failed_job_says_why_and_keeps_the_old_pods():
    server = Server({"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]})
    failed = plan(es(), ResourceStatus(artifacts_version="0" * 16), server, absent,
                  Images())
    assert failed.condition[:2] == ("False", "PrepareFailed")
    assert "BackoffLimitExceeded" in failed.condition[2] and failed.version == "0" * 16
    assert job_state({"status": {"active": 1}})[0] == "Running"


def test_per_pod_and_llm_resources_have_no_plan():
    assert plan(es(artifacts={"prepare": "perPod"}), ResourceStatus(), Server(), absent,
                Images()) is None


def test_clean_up_runs_once_after_the_rollout():
    resource = es(replicas=2)
    version = resource_fingerprint(resource)
    rolling = {"metadata": {"generation": 2}, "spec": {"replicas": 2},
               "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2,
                          "readyReplicas": 2}}
    server = Server()
    assert clean_up(resource, ResourceStatus(), version, lambda: rolling, server,
                    Images()) is None
    done = {**rolling, "status": {**rolling["status"], "replicas": 2}}
    assert clean_up(resource, ResourceStatus(), version, lambda: done, server,
                    Images()) == version
    [job] = server.applied
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--keep-only"
    assert clean_up(resource, ResourceStatus(artifacts_cleaned=version), version,
                    lambda: done, server, Images()) == version
    assert len(server.applied) == 1


class Classes(Kube):
    """A Kube that answers the StorageClass list, and counts how often it was asked."""

    def __init__(self, items: list[dict[str, Any]] | None, status: int = 200) -> None:
        super().__init__(api=object())  # type: ignore[arg-type]
        self.items, self.status, self.asked = items, status, 0

    def _call(self, method: str, url: str, body: Any = None, query: Any = None,
              content_type: str = "application/json") -> dict[str, Any]:
        assert (method, url) == ("GET", "/apis/storage.k8s.io/v1/storageclasses")
        self.asked += 1
        if self.status != 200:
            raise ApiException(status=self.status)
        return {"items": self.items}


DEFAULT = {"metadata": {"name": "local-path", "annotations": {
    "storageclass.kubernetes.io/is-default-class": "true"}}}
OTHER = {"metadata": {"name": "slow"}}


def unset(**spec: Any):
    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": "news", "namespace": "ml"},
                           "spec": {"corpus": {"source": "c.jsonl"}, **spec}})


def test_a_default_storage_class_makes_job_the_default():
    kube = Classes([OTHER, DEFAULT])
    assert prepare_mode(with_default_prepare(kube, unset())) == "job"
    assert prepare_mode(with_default_prepare(kube, unset(replicas=3))) == "job"
    assert kube.asked == 1  # cached: a resync costs no request


@pytest.mark.parametrize(("items", "status"), [([OTHER], 200), (None, 403)])
def test_without_a_default_class_pods_prepare_their_own(items, status):
    assert prepare_mode(with_default_prepare(Classes(items, status), unset())) == "perPod"


@pytest.mark.parametrize("artifacts", [
    {"prepare": "perPod"}, {"emptyDir": {}}, {"hostPath": {"path": "/data"}},
    {"persistentVolumeClaim": {"claimName": "mine"}}])
def test_a_spec_that_chose_is_left_as_it_is(artifacts):
    resource = unset(artifacts=artifacts)
    assert with_default_prepare(Classes([DEFAULT]), resource) is resource
