"""The real tritonop operator (kopf) against the Kubernetes emulator.

The emulator runs no pods: a test plays the kubelet and the Deployment controller by
writing the Deployment's status, as a cluster would once Triton reports ready.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_emulator import (
    CONFIG_MAP,
    DEPLOYMENT,
    EMBEDDING_SEARCH,
    HORIZONTAL_POD_AUTOSCALER,
    LLM_SERVICE,
    POD_DISRUPTION_BUDGET,
    SERVICE,
    SERVICE_ACCOUNT,
    KubeEmulator,
    ResourceSpec,
    create_in,
    events_in,
    merge_patch,
    resource_path,
    running_operator,
    wait_for,
    wait_until_idle,
)

OPERATOR = "tritonop.controller.handlers"
NS = "ml"
CONFIG_HASH = "serving.tritonop.dev/config-hash"


pytestmark = pytest.mark.usefixtures("fast_resync")


def search_body(name: str = "news", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": EMBEDDING_SEARCH.api_version, "kind": "EmbeddingSearch",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"corpus": {"source": "corpus/debian-packages.jsonl"}, **spec}}


def llm_body(name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": LLM_SERVICE.api_version, "kind": "LLMService",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


async def create(kube: KubeEmulator, kind: ResourceSpec, body: dict[str, Any]) -> None:
    await create_in(kube, kind, NS, body)


def live(kube: KubeEmulator, kind: ResourceSpec, name: str) -> dict[str, Any] | None:
    return kube.live(kind, NS, name)


def status_where(kube, kind, name, **expected) -> dict[str, Any] | None:
    body = live(kube, kind, name)
    status = (body or {}).get("status") or {}
    return body if all(status.get(k) == v for k, v in expected.items()) else None


async def events_for(kube: KubeEmulator, name: str) -> list[dict[str, Any]]:
    return await events_in(kube, NS, name)


async def report_ready(kube: KubeEmulator, name: str, ready: int) -> None:
    """What the Deployment controller writes once ``ready`` pods pass Triton's readiness."""
    deployment = live(kube, DEPLOYMENT, name)
    replicas = deployment["spec"]["replicas"]
    status = {"observedGeneration": deployment["metadata"].get("generation", 1),
              "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": ready,
              "availableReplicas": ready}
    await merge_patch(kube, resource_path(DEPLOYMENT, NS, name, "status"), {"status": status})


@pytest.mark.asyncio
async def test_embedding_search_gets_owned_children_and_a_status(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body())
        body = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                   observedGeneration=1), what="status")
        children = {kind.kind: live(kube, kind, name) for kind, name in [
            (SERVICE_ACCOUNT, "news-triton"), (CONFIG_MAP, "news-triton"),
            (SERVICE, "news"), (DEPLOYMENT, "news-triton")]}

    uid = body["metadata"]["uid"]
    for kind, child in children.items():
        assert child is not None, f"no {kind}"
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["uid"], owner["kind"], owner["controller"]) == (uid, "EmbeddingSearch", True)
    status = body["status"]
    assert status["phase"] == "Pending"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "ConfigRendered": "True", "ArtifactsReady": "Unknown", "Available": "False"}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    # Only what answers from other pods: the gateway and metrics, not Triton's own ports.
    assert status["endpoints"] == {"openai": "http://news.ml.svc:8080/v1",
                                   "metrics": "http://news.ml.svc:8002/metrics"}
    assert "app.kubernetes.io/instance=news" in status["selector"]
    assert status["configHash"] == children["Deployment"]["spec"]["template"]["metadata"][
        "annotations"][CONFIG_HASH]
    assert "kopf" not in str(status)
    assert "news__config.pbtxt" in children["ConfigMap"]["data"]


@pytest.mark.asyncio
async def test_llm_service_gets_a_gpu_deployment(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, LLM_SERVICE, llm_body(gpus=1, model={"dtype": "bfloat16"}))
        await wait_for(lambda: status_where(kube, LLM_SERVICE, "chat", observedGeneration=1),
                       what="status")
        deployment = live(kube, DEPLOYMENT, "chat-triton")
        config = live(kube, CONFIG_MAP, "chat-triton")

    triton = deployment["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "decoupled: true" in config["data"]["chat__config.pbtxt"]
    assert 'string_value: "bfloat16"' in config["data"]["chat__config.pbtxt"]


@pytest.mark.asyncio
async def test_spec_change_reaches_children_and_rolls_the_pods(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body())
        first = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                    observedGeneration=1), what="status")
        await merge_patch(kube, resource_path(EMBEDDING_SEARCH, NS, "news"), {"spec": {
            "replicas": 3, "stages": {"encoder": {"maxBatchSize": 8}}}})
        second = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                     observedGeneration=2), what="generation 2")
        budget = await wait_for(lambda: live(kube, POD_DISRUPTION_BUDGET, "news-triton"),
                                what="a PodDisruptionBudget for 3 replicas")
        deployment = live(kube, DEPLOYMENT, "news-triton")
        config = live(kube, CONFIG_MAP, "news-triton")

    assert deployment["spec"]["replicas"] == 3
    assert "max_batch_size: 8" in config["data"]["news_encoder__config.pbtxt"]
    assert second["status"]["configHash"] != first["status"]["configHash"]
    assert deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH] == \
        second["status"]["configHash"]
    assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.asyncio
async def test_autoscaling_adds_an_hpa_and_removing_it_deletes_it(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body(autoscaling={"maxReplicas": 4}))
        hpa = await wait_for(lambda: live(kube, HORIZONTAL_POD_AUTOSCALER, "news-triton"),
                             what="an HPA")
        await merge_patch(kube, resource_path(EMBEDDING_SEARCH, NS, "news"),
                          {"spec": {"autoscaling": None}})
        await wait_for(lambda: live(kube, HORIZONTAL_POD_AUTOSCALER, "news-triton") is None,
                       what="the HPA to be deleted")
    assert hpa["spec"]["maxReplicas"] == 4
    assert hpa["spec"]["scaleTargetRef"]["name"] == "news-triton"


@pytest.mark.asyncio
async def test_children_deleted_or_edited_by_hand_are_put_back(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body())
        original = await wait_for(lambda: live(kube, SERVICE, "news"), what="the Service")
        response = await kube.delete(resource_path(SERVICE, NS, "news"))
        assert response.status == 200
        await merge_patch(kube, resource_path(DEPLOYMENT, NS, "news-triton"),
                          {"spec": {"replicas": 7}})
        restored = await wait_for(lambda: live(kube, SERVICE, "news"),
                                  what="the Service to come back", timeout=10)
        await wait_for(lambda: live(kube, DEPLOYMENT, "news-triton")["spec"]["replicas"] == 1,
                       what="the replica count to be put back", timeout=10)
    assert restored["metadata"]["uid"] != original["metadata"]["uid"]
    assert restored["spec"]["ports"] == original["spec"]["ports"]


@pytest.mark.asyncio
async def test_ready_pods_make_the_resource_ready_and_losing_them_degrades_it(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body(replicas=2))
        await wait_for(lambda: live(kube, DEPLOYMENT, "news-triton"), what="the Deployment")
        await report_ready(kube, "news-triton", ready=2)
        ready = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                    phase="Ready"), what="phase Ready")
        await report_ready(kube, "news-triton", ready=1)
        degraded = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                       phase="Degraded"), what="phase Degraded")
        for _ in range(100):  # kopf posts events from a queue: give it a moment
            events = await events_for(kube, "news")
            if any(e["reason"] == "Degraded" for e in events):
                break
            await asyncio.sleep(0.05)

    assert ready["status"]["ready"] == "2/2" and ready["status"]["readyReplicas"] == 2
    available = {c["type"]: c for c in ready["status"]["conditions"]}["Available"]
    assert (available["status"], available["reason"]) == ("True", "AllReplicasReady")
    assert degraded["status"]["message"] == "only 1/2 Triton pods report ready"
    reasons = [(e["type"], e["reason"]) for e in events]
    assert reasons.count(("Normal", "Ready")) == 1
    assert reasons.count(("Warning", "Degraded")) == 1


@pytest.mark.asyncio
async def test_invalid_resource_fails_with_a_message_and_no_children(kube, kubeconfig):
    body = search_body("broken", search={"defaultTopK": 50, "maxTopK": 10})
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        failed = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "broken",
                                                     phase="Failed"), what="phase Failed")
        await wait_until_idle(kube, quiet_for=2.5)  # more than two resync periods
        events = await events_for(kube, "broken")
    assert "spec.search: defaultTopK must be <= maxTopK" in failed["status"]["message"]
    rendered = {c["type"]: c for c in failed["status"]["conditions"]}["ConfigRendered"]
    assert (rendered["status"], rendered["reason"]) == ("False", "InvalidSpec")
    assert live(kube, DEPLOYMENT, "broken-triton") is None
    assert live(kube, CONFIG_MAP, "broken-triton") is None
    warnings = [e for e in events if e["type"] == "Warning" and e["reason"] == "Failed"]
    assert len(warnings) == 1, "an invalid spec is reported once, not in a loop"


@pytest.mark.asyncio
async def test_a_name_taken_by_someone_else_is_reported_and_left_alone(kube, kubeconfig):
    """Server-side apply with force would take the object over; the operator must not."""
    theirs = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "news-triton", "namespace": NS}, "data": {"owner": "them"}}
    await create(kube, CONFIG_MAP, theirs)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body())
        failed = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                     phase="Failed"), what="phase Failed")
        await asyncio.sleep(2.5)  # resyncs (every second here) come and go: still left alone
        assert live(kube, CONFIG_MAP, "news-triton")["data"] == {"owner": "them"}
        assert live(kube, DEPLOYMENT, "news-triton") is None
        # Once they delete theirs, the next resync serves the resource.
        response = await kube.delete(resource_path(CONFIG_MAP, NS, "news-triton"))
        assert response.status == 200
        served = await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                                     phase="Pending"), what="phase Pending")
        ours = live(kube, CONFIG_MAP, "news-triton")
    message = failed["status"]["message"]
    assert "ConfigMap 'news-triton' already exists in namespace 'ml'" in message
    assert "not owned by this EmbeddingSearch" in message
    rendered = {c["type"]: c for c in failed["status"]["conditions"]}["ConfigRendered"]
    assert (rendered["status"], rendered["reason"]) == ("False", "NameConflict")
    [owner] = ours["metadata"]["ownerReferences"]
    assert owner["uid"] == served["metadata"]["uid"]
    assert "news__config.pbtxt" in ours["data"]


@pytest.mark.asyncio
async def test_deleting_the_resource_leaves_no_finalizer(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body())
        # Once kopf is done with the create handler: a handler that kopf runs again on a
        # body read before the deletion applies orphans, which a real garbage collector
        # removes (owner uid gone) and the emulator's does not.
        await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "news",
                                            observedGeneration=1), what="status")
        await wait_until_idle(kube, quiet_for=0.5)
        response = await kube.delete(resource_path(EMBEDDING_SEARCH, NS, "news"))
        assert response.status == 200
        await wait_for(lambda: live(kube, EMBEDDING_SEARCH, "news") is None,
                       what="the resource to be gone")
    last = kube.versions(EMBEDDING_SEARCH, NS, "news")[-1]
    assert not last["metadata"].get("finalizers")
    assert live(kube, DEPLOYMENT, "news-triton") is None  # garbage-collected


def test_operator_module_is_not_shadowed_by_stdlib():
    import operator

    assert os.path.dirname(operator.__file__) != str(Path(__file__).parents[2] / "operator")
