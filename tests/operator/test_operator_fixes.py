"""Issue 10's operator bugs, shown on the emulator where it can show them.

The real control plane (tests/cluster) shows the rest: server-side apply releasing
fields, RBAC, garbage collection by the real collector. Here, requests are counted and
refusals injected, which a real API server does not let a test do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml

from tests.operator.test_operator import events_for, report_ready, search_body
from tests.support import kube_emulator
from tests.support.kube_emulator import (
    DEPLOYMENT,
    EMBEDDING_SEARCH,
    HORIZONTAL_POD_AUTOSCALER,
    TRITONOP_CUSTOM_RESOURCES,
    TRITONOP_RESOURCES,
    KubeEmulator,
    resource_path,
    running_emulator,
    running_operator,
    wait_for,
    write_kubeconfig,
)

OPERATOR = "tritonop.controller.handlers"
NS = "ml"
OLD_FINALIZER = "serving.tritonop.dev/finalizer"
CRD_FILE = Path(__file__).parents[2] / "crds" / "embeddingsearches.serving.tritonop.dev.yaml"


pytestmark = pytest.mark.usefixtures("fast_resync")


async def create(kube: KubeEmulator, body: dict[str, Any], path: str | None = None) -> None:
    response = await kube.post(path or resource_path(EMBEDDING_SEARCH, NS), json=body)
    assert response.status == 201, await response.text()


async def merge_patch(kube: KubeEmulator, patch: dict[str, Any], name: str = "news") -> None:
    response = await kube.patch(resource_path(EMBEDDING_SEARCH, NS, name), json=patch,
                                headers={"Content-Type": kube_emulator.MERGE_PATCH})
    assert response.status == 200, await response.text()


def search(kube: KubeEmulator, name: str = "news") -> dict[str, Any] | None:
    return kube.live(EMBEDDING_SEARCH, NS, name)


def status_where(kube: KubeEmulator, name: str = "news", **expected: Any
                 ) -> dict[str, Any] | None:
    body = search(kube, name)
    status = (body or {}).get("status") or {}
    return body if all(status.get(k) == v for k, v in expected.items()) else None


def statuses_seen(kube: KubeEmulator, field: str) -> set[Any]:
    """``status.<field>`` in every version the server has stored of the resource."""
    return {(v.get("status") or {}).get(field)
            for v in kube.versions(EMBEDDING_SEARCH, NS, "news")}


def is_apply(request: kmock.Request, plural: str, name: str) -> bool:
    return (request.method == kmock.method.PATCH and request.resource is not None
            and request.resource.plural == plural and request.name == name
            and "apply-patch" in str(request.headers.get("Content-Type", "")))


def applies(kube: KubeEmulator, plural: str, name: str) -> list[kmock.Request]:
    return [request for request in kube if is_apply(request, plural, name)]


def api_requests(kube: KubeEmulator) -> list[kmock.Request]:
    """Requests other than the long-running watches (and kopf's discovery)."""
    return [r for r in kube if r.params.get("watch") != "true" and r.resource is not None]


@pytest.fixture
def refuse(monkeypatch) -> Callable[[str, int, str, int], None]:
    """Make the emulator answer applies of one Deployment with an error, ``times`` times."""

    def install(name: str, status: int, message: str, times: int = 10**9) -> None:
        original = KubeEmulator._write
        left = [times]

        def refusing(self: KubeEmulator, request: kmock.Request, resource: Any) -> None:
            if is_apply(request, "deployments", name) and left[0] > 0:
                left[0] -= 1
                raise kube_emulator._error(status, "Refused", message)
            original(self, request, resource)

        monkeypatch.setattr(KubeEmulator, "_write", refusing)

    return install


# Deletion: no finalizer ------------------------------------------------------------------

@pytest.mark.asyncio
async def test_the_operator_adds_no_finalizer_and_removes_an_old_one(kube, kubeconfig):
    old = search_body("old")
    old["metadata"]["finalizers"] = [OLD_FINALIZER]  # as an older tritonop left it
    await create(kube, old)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: status_where(kube, observedGeneration=1), what="status")
        await wait_for(lambda: not search(kube, "old")["metadata"].get("finalizers"),
                       what="the old finalizer to be removed")
        await asyncio.sleep(1.5)  # a resync or more
    assert not any(v["metadata"].get("finalizers")
                   for v in kube.versions(EMBEDDING_SEARCH, NS, "news"))


@pytest.mark.asyncio
async def test_deleting_while_the_operator_is_down_completes(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"), what="the Deployment")
    response = await kube.delete(resource_path(EMBEDDING_SEARCH, NS, "news"))
    assert response.status == 200, await response.text()
    assert search(kube) is None, "deletion waits for a finalizer of a stopped operator"
    assert kube.live(DEPLOYMENT, NS, "news-triton") is None  # garbage-collected


# CRDs installed after the operator started ------------------------------------------------

@pytest_asyncio.fixture
async def kube_without_crds() -> AsyncIterator[KubeEmulator]:
    """An emulator whose API has no tritonop kinds yet."""
    specs = [s for s in TRITONOP_RESOURCES if s not in TRITONOP_CUSTOM_RESOURCES]
    async with running_emulator(specs) as emulator:
        yield emulator


@pytest.mark.asyncio
async def test_a_crd_installed_after_the_operator_started_is_served(kube_without_crds, tmp_path):
    kube = kube_without_crds
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kube.url))
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await asyncio.sleep(1.0)  # the operator has scanned the API and found no CRDs
        kube.register(EMBEDDING_SEARCH)
        crd = yaml.safe_load(CRD_FILE.read_text())
        await create(kube, crd, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        await create(kube, search_body())
        body = await wait_for(lambda: status_where(kube, observedGeneration=1),
                              what="the resource to be served")
    assert body["status"]["phase"] == "Pending"
    assert kube.live(DEPLOYMENT, NS, "news-triton") is not None


@pytest.mark.asyncio
async def test_a_crd_that_discovery_lists_only_after_its_events_is_served(kube_without_crds,
                                                                         tmp_path):
    """kube-apiserver lists a new CRD's resource in discovery after the CRD is Established.

    kopf 1.45 rescans discovery only on the CRD's events; when all of them come first, it
    never serves the resource (tests/cluster saw it 3 times in 4). Here every event of the
    CRD comes a second before discovery lists it.
    """
    kube = kube_without_crds
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kube.url))
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await asyncio.sleep(1.0)  # the operator has scanned the API and found no CRDs
        crd = yaml.safe_load(CRD_FILE.read_text())
        crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        await create(kube, crd, crds)
        # As the API server's CRD controllers: names accepted, established.
        response = await kube.patch(
            f"{crds}/{crd['metadata']['name']}/status",
            json={"status": {"conditions": [{"type": "NamesAccepted", "status": "True"},
                                            {"type": "Established", "status": "True"}]}},
            headers={"Content-Type": kube_emulator.MERGE_PATCH})
        assert response.status == 200, await response.text()
        await asyncio.sleep(1.0)  # kopf has rescanned on the CRD's event: nothing listed yet
        kube.register(EMBEDDING_SEARCH)
        await create(kube, search_body())
        body = await wait_for(lambda: status_where(kube, observedGeneration=1),
                              what="the resource to be served")
    assert body["status"]["phase"] == "Pending"
    assert kube.live(DEPLOYMENT, NS, "news-triton") is not None


# Errors on apply ----------------------------------------------------------------------------

REFUSAL = ('Deployment.apps "news-triton" is invalid: spec.template.spec.affinity.nodeAffinity'
           '.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms: Required value')


@pytest.mark.asyncio
async def test_a_child_the_server_refuses_fails_once_with_its_message(kube, kubeconfig, refuse):
    refuse("news-triton", 422, REFUSAL)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        failed = await wait_for(lambda: status_where(kube, phase="Failed"), what="Failed")
        await asyncio.sleep(3.5)  # three resyncs and more than kopf's first retry
        attempts = len(applies(kube, "deployments", "news-triton"))
        events = await events_for(kube, "news")
    status = failed["status"]
    assert REFUSAL in status["message"] and "(422)" in status["message"]
    rendered = {c["type"]: c for c in status["conditions"]}["ConfigRendered"]
    assert (rendered["status"], rendered["reason"]) == ("False", "ApplyRejected")
    assert REFUSAL in rendered["message"]
    assert status["observedGeneration"] == 1
    assert attempts == 1, "a refused apply is not retried for the same generation"
    warnings = [e for e in events if (e["type"], e["reason"]) == ("Warning", "Failed")]
    assert len(warnings) == 1 and REFUSAL in warnings[0]["message"]


@pytest.mark.asyncio
async def test_a_refused_generation_is_tried_again_after_a_spec_change(kube, kubeconfig, refuse):
    refuse("news-triton", 403, "deployments.apps is forbidden", times=1)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: status_where(kube, phase="Failed"), what="Failed")
        await merge_patch(kube, {"spec": {"replicas": 2}})
        served = await wait_for(lambda: status_where(kube, observedGeneration=2, phase="Pending"),
                                what="generation 2 served")
    assert kube.live(DEPLOYMENT, NS, "news-triton")["spec"]["replicas"] == 2
    assert {c["type"]: c["reason"] for c in served["status"]["conditions"]}[
        "ConfigRendered"] == "Rendered"


RESTMAPPING = ('serviceaccounts "news-triton" is forbidden: cannot set blockOwnerDeletion in this '
               'case because cannot find RESTMapping for APIVersion serving.tritonop.dev/v1alpha1 '
               'Kind EmbeddingSearch: no matches for kind "EmbeddingSearch" in version '
               '"serving.tritonop.dev/v1alpha1"')


@pytest.mark.asyncio
async def test_a_server_that_cannot_map_a_new_crd_yet_is_retried_soon(kube, kubeconfig, refuse):
    """OwnerReferencesPermissionEnforcement refuses owners of a new CRD for up to 30 s (403)."""
    refuse("news-triton", 403, RESTMAPPING, times=1)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"), what="the Deployment",
                       timeout=20)
        await report_ready(kube, "news-triton", ready=1)
        ready = await wait_for(lambda: status_where(kube, phase="Ready"), what="Ready")
    assert ready["metadata"]["generation"] == 1, "served without a spec change"
    assert len(applies(kube, "deployments", "news-triton")) >= 2
    assert "Failed" not in statuses_seen(kube, "phase")


@pytest.mark.asyncio
async def test_a_refusal_fixed_outside_the_spec_is_served_after_a_backoff(kube, kubeconfig,
                                                                          refuse, monkeypatch):
    """RBAC granted later (a 403 once): Failed with the message, then Ready, same spec."""
    monkeypatch.setenv("TRITONOP_REJECTED_RETRY_SECONDS", "2")
    refuse("news-triton", 403, "deployments.apps is forbidden", times=1)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        failed = await wait_for(lambda: status_where(kube, phase="Failed"), what="Failed")
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"),
                       what="the Deployment, applied again", timeout=20)
        await report_ready(kube, "news-triton", ready=1)
        ready = await wait_for(lambda: status_where(kube, phase="Ready"), what="Ready")
        events = await events_for(kube, "news")
    assert "deployments.apps is forbidden" in failed["status"]["message"]
    assert ready["metadata"]["generation"] == 1
    assert {c["type"]: c["reason"] for c in ready["status"]["conditions"]}[
        "ConfigRendered"] == "Rendered"
    warnings = [e for e in events if (e["type"], e["reason"]) == ("Warning", "Failed")]
    assert len(warnings) == 1


@pytest.mark.asyncio
async def test_a_refused_generation_is_retried_no_more_often_than_its_backoff(kube, kubeconfig,
                                                                             refuse, monkeypatch):
    """A persistent 422: tried again after 2 s, then every 4 s, one Warning Event in all."""
    monkeypatch.setenv("TRITONOP_REJECTED_RETRY_SECONDS", "2")
    monkeypatch.setenv("TRITONOP_REJECTED_RETRY_MAX_SECONDS", "4")
    refuse("news-triton", 422, REFUSAL)
    loop = asyncio.get_running_loop()
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: status_where(kube, phase="Failed"), what="Failed")
        failed_at = loop.time()
        await asyncio.sleep(11.0)  # eleven resyncs (1 s), during 2 + 4 + 4 s of backoff
        attempts = len(applies(kube, "deployments", "news-triton"))
        elapsed = loop.time() - failed_at
        events = await events_for(kube, "news")
    # The first try, then one after 2 s and one per 4 s at most.
    most = 1 + 1 + int((elapsed - 2.0) // 4.0)
    assert 3 <= attempts <= most, (attempts, most)
    status = search(kube)["status"]
    assert (status["phase"], status["observedGeneration"]) == ("Failed", 1)
    warnings = [e for e in events if (e["type"], e["reason"]) == ("Warning", "Failed")]
    assert len(warnings) == 1 and REFUSAL in warnings[0]["message"]


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [409, 429, 500, 503])
async def test_a_server_that_cannot_take_an_apply_now_is_retried(kube, kubeconfig, refuse,
                                                                 status):
    refuse("news-triton", status, "try again later", times=2)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"), what="the Deployment",
                       timeout=20)
        await wait_for(lambda: status_where(kube, observedGeneration=1), what="status")
    assert len(applies(kube, "deployments", "news-triton")) >= 3
    assert "Failed" not in statuses_seen(kube, "phase")


QUANTITY_FAULT = ("quantities must match the regular expression "
                  "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")


@pytest.mark.asyncio
async def test_children_that_keep_failing_to_apply_are_said_in_a_condition_and_one_event(
        kube, kubeconfig, refuse):
    """A 500 on every try (what kube-apiserver answered for ``cpu: fast`` before the CRD
    checked quantities): still retried, but the status and one Warning Event say so."""
    refuse("news-triton", 500, QUANTITY_FAULT, times=3)
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        failing = await wait_for(
            lambda: (body := search(kube)) and QUANTITY_FAULT in (body.get("status") or {}).get(
                "message", "") and body, what="the failing applies in the status", timeout=20)
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"),
                       what="the Deployment, once the server takes it", timeout=30)
        await report_ready(kube, "news-triton", ready=1)
        ready = await wait_for(lambda: status_where(kube, phase="Ready"), what="Ready")
        events = await events_for(kube, "news")
    rendered = {c["type"]: c for c in failing["status"]["conditions"]}["ConfigRendered"]
    assert (rendered["status"], rendered["reason"]) == ("False", "ApplyFailing")
    assert "(500)" in rendered["message"] and rendered["message"].endswith("retrying")
    warnings = [e for e in events if (e["type"], e["reason"]) == ("Warning", "ApplyFailing")]
    assert len(warnings) == 1 and QUANTITY_FAULT in warnings[0]["message"]
    assert {c["type"]: c["reason"] for c in ready["status"]["conditions"]}[
        "ConfigRendered"] == "Rendered"
    assert "Failed" not in statuses_seen(kube, "phase")


# observedGeneration from the Deployment-event path -----------------------------------------

@pytest.mark.asyncio
async def test_a_deployment_event_never_reports_a_generation_not_applied(kube, kubeconfig,
                                                                         refuse):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: status_where(kube, observedGeneration=1), what="status")
        refuse("news-triton", 500, "etcd is slow")  # generation 2 cannot be applied yet
        await merge_patch(kube, {"spec": {"replicas": 2}})
        await asyncio.sleep(0.5)
        await report_ready(kube, "news-triton", ready=1)  # the old pods are ready
        await asyncio.sleep(1.5)
    assert 2 not in statuses_seen(kube, "observedGeneration")


# Autoscaling: replicas handed over --------------------------------------------------------

@pytest.mark.asyncio
async def test_turning_autoscaling_on_hands_the_live_replicas_to_a_second_manager(kube,
                                                                                 kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body(replicas=3))
        await wait_for(lambda: status_where(kube, observedGeneration=1), what="status")
        await merge_patch(kube, {"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}})
        await wait_for(lambda: kube.live(HORIZONTAL_POD_AUTOSCALER, NS, "news-triton"),
                       what="the HPA")
        await wait_for(lambda: status_where(kube, observedGeneration=2), what="generation 2")
    calls = applies(kube, "deployments", "news-triton")
    managers = [c.params.get("fieldManager") for c in calls]
    handover = managers.index("tritonop-handover-to-hpa")
    assert yaml.safe_load(calls[handover].text)["spec"] == {"replicas": 3}
    after = yaml.safe_load(calls[handover + 1].text)
    assert managers[handover + 1] == "tritonop" and "replicas" not in after["spec"]
    assert kube.live(DEPLOYMENT, NS, "news-triton")["spec"]["replicas"] == 3


# Resync cost ------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_resync_of_a_settled_resource_sends_no_request(kube, kubeconfig):
    """Before issue 10: 7 GETs, 4 applies and a pod list per resource per resync."""
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, search_body())
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"), what="the Deployment")
        await report_ready(kube, "news-triton", ready=1)
        await wait_for(lambda: status_where(kube, phase="Ready"), what="Ready")
        await asyncio.sleep(0.5)  # the Ready status write and its event settle
        before = len(api_requests(kube))
        await asyncio.sleep(4.0)  # four resyncs
        during = api_requests(kube)[before:]
        # Deleted by hand: the next resync (not a create handler) puts it back.
        response = await kube.delete(resource_path(kube_emulator.SERVICE, NS, "news"))
        assert response.status == 200
        await wait_for(lambda: kube.live(kube_emulator.SERVICE, NS, "news"),
                       what="the Service to come back", timeout=10)
    assert [(r.method, r.resource.plural, r.name) for r in during] == []
