"""A moving model source (``hf://org/name``) resolved by a Job and pinned, on the emulator.

The emulator runs no controllers: the test plays the Job controller and the kubelet. It
creates the Job's pod (labelled and owned as the Job controller does), writes the pod's
status with the ``resolve`` container's termination message (what ``tritonop resolve``
leaves), then the Job's verdict. The real Job controller and garbage collector run in
tests/cluster/test_model_resolve.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.support.kube_emulator import (
    CONFIG_MAP,
    DEPLOYMENT,
    EMBEDDING_SEARCH,
    LLM_SERVICE,
    POD,
    TRITONOP_RESOURCES,
    KubeEmulator,
    ResourceSpec,
    create_in,
    events_in,
    merge_patch,
    resource_path,
    running_emulator,
    running_operator,
    wait_for,
)
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.render.kubernetes import FINGERPRINT_LABEL, resolve_job
from tritonop.resources import MODEL_REVISION_ANNOTATION, parse_resource

OPERATOR = "tritonop.controller.handlers"
NS = "ml"
SOURCE = "hf://acme/bert"
OLD, NEW = "1" * 40, "2" * 40
JOB = ResourceSpec("batch", "v1", "jobs", "Job", subresources=frozenset({"status"}))
CLAIM = ResourceSpec("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim",
                     subresources=frozenset({"status"}))
FAILURE = ("error: news: model source hf://acme/bert: the hub answered 401 Unauthorized "
           "for acme/bert (a private or missing repository: check spec.model.credentials)")

pytestmark = pytest.mark.usefixtures("fast_resync")


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """The emulator, serving Jobs and claims too (job mode)."""
    async with running_emulator((*TRITONOP_RESOURCES, JOB, CLAIM)) as emulator:
        yield emulator


def search_body(prepare: str = "job") -> dict[str, Any]:
    return {"apiVersion": EMBEDDING_SEARCH.api_version, "kind": "EmbeddingSearch",
            "metadata": {"name": "news", "namespace": NS},
            "spec": {"model": {"source": SOURCE},
                     "corpus": {"source": "corpus/debian-packages.jsonl"},
                     "artifacts": {"prepare": prepare}}}


def llm_body() -> dict[str, Any]:
    return {"apiVersion": LLM_SERVICE.api_version, "kind": "LLMService",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {"model": {"source": "hf://acme/gpt"}}}


def pinned(body: dict[str, Any], revision: str):
    """The resource as it reads once ``revision`` is pinned."""
    return dataclasses.replace(parse_resource(body), model_revision=revision)


async def create(kube: KubeEmulator, kind: ResourceSpec, body: dict[str, Any]) -> None:
    await create_in(kube, kind, NS, body)


async def events_for(kube: KubeEmulator, name: str) -> list[dict[str, Any]]:
    return await events_in(kube, NS, name)


def condition(body: dict[str, Any] | None, kind: str = "ArtifactsReady") -> dict[str, Any]:
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def with_reason(kube: KubeEmulator, kind: ResourceSpec, name: str, reason: str
                ) -> dict[str, Any] | None:
    body = kube.live(kind, NS, name)
    return body if condition(body).get("reason") == reason else None


def annotation(kube: KubeEmulator, kind: ResourceSpec, name: str) -> str | None:
    body = kube.live(kind, NS, name) or {}
    return ((body.get("metadata") or {}).get("annotations") or {}).get(MODEL_REVISION_ANNOTATION)


async def end_job(kube: KubeEmulator, job: dict[str, Any], container: str, message: str, *,
                  succeeded: bool) -> None:
    """What the Job controller and the kubelet write when the Job's only pod ends."""
    name = job["metadata"]["name"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{name}-7xk2p", "namespace": NS,
        "labels": {"batch.kubernetes.io/job-name": name, "job-name": name},
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                             "uid": job["metadata"]["uid"], "controller": True}]},
        "spec": job["spec"]["template"]["spec"]}
    await create(kube, POD, pod)
    terminated = {"exitCode": 0 if succeeded else 1,
                  "reason": "Completed" if succeeded else "Error", "message": message}
    await merge_patch(kube, resource_path(POD, NS, pod["metadata"]["name"], "status"), {
        "status": {"phase": "Succeeded" if succeeded else "Failed", "containerStatuses": [
            {"name": container, "ready": False, "restartCount": 0,
             "state": {"terminated": terminated}}]}})
    verdict = ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
               if succeeded else
               {"failed": 2, "conditions": [{"type": "Failed", "status": "True",
                                             "reason": "BackoffLimitExceeded",
                                             "message": "Job has reached the specified "
                                                        "backoff limit"}]})
    await merge_patch(kube, resource_path(JOB, NS, name, "status"), {"status": verdict})


def resolved(body: dict[str, Any], revision: str) -> str:
    return json.dumps({"name": body["metadata"]["name"], "source":
                       body["spec"]["model"]["source"], "revision": revision})


@pytest.mark.asyncio
async def test_a_moving_source_is_resolved_pinned_and_prepared_at_that_revision(kube,
                                                                                 kubeconfig):
    body = search_body()
    name = resolve_job(parse_resource(body))["metadata"]["name"]
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        job = await wait_for(lambda: kube.live(JOB, NS, name), what="the resolve Job")
        resolving = await wait_for(lambda: with_reason(kube, EMBEDDING_SEARCH, "news",
                                                       "Resolving"), what="Resolving")
        held = [kube.live(kind, NS, "news-triton") for kind in (DEPLOYMENT, CONFIG_MAP)]
        jobs_while_resolving = {key[2] for key in kube.objects if key[0] == JOB.resource}
        await end_job(kube, job, "resolve", resolved(body, OLD), succeeded=True)
        prepare = pinned(body, OLD)
        fingerprint = resource_fingerprint(prepare)
        prepare_name = f"news-prepare-{fingerprint}"
        prepare_job = await wait_for(lambda: kube.live(JOB, NS, prepare_name),
                                     what="the prepare Job of the pinned version")
        status = await wait_for(
            lambda: (live := kube.live(EMBEDDING_SEARCH, NS, "news")) and (
                live.get("status") or {}).get("model") and live, what="status.model")
        resolve_gone = kube.live(JOB, NS, name) is None
        pods_left = kube.live(POD, NS, f"{name}-7xk2p")

    assert job["spec"]["template"]["spec"]["containers"][0]["name"] == "resolve"
    message = condition(resolving)["message"]
    assert condition(resolving)["status"] == "False"
    assert SOURCE in message and name in message
    assert held == [None, None], "nothing serves or prepares the unpinned version"
    assert jobs_while_resolving == {name}, "no prepare Job before the revision is pinned"
    assert status["metadata"]["annotations"][MODEL_REVISION_ANNOTATION] == OLD
    assert status["status"]["model"] == {"source": SOURCE, "resolvedRevision": OLD}
    assert prepare_job["metadata"]["labels"][FINGERPRINT_LABEL] == fingerprint
    args = prepare_job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--expect-fingerprint") + 1] == fingerprint
    assert fingerprint != resource_fingerprint(parse_resource(body))
    assert resolve_gone and pods_left is None, "the resolve Job and its pod are deleted"


@pytest.mark.asyncio
async def test_a_failed_resolve_says_why_once_and_runs_no_new_job(kube, kubeconfig):
    body = search_body()
    name = resolve_job(parse_resource(body))["metadata"]["name"]
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        job = await wait_for(lambda: kube.live(JOB, NS, name), what="the resolve Job")
        await end_job(kube, job, "resolve", FAILURE, succeeded=False)
        failed = await wait_for(lambda: with_reason(kube, EMBEDDING_SEARCH, "news",
                                                    "PrepareFailed"), what="PrepareFailed")
        await asyncio.sleep(3.5)  # three resyncs and more
        versions = kube.versions(JOB, NS, name)
        events = await events_for(kube, "news")
        annotated = annotation(kube, EMBEDDING_SEARCH, "news")
        prepare_jobs = [key for key in kube.objects
                        if key[0] == JOB.resource and "-prepare-" in key[2]]

    assert condition(failed)["message"] == (
        f"resolving model source {SOURCE} failed: {FAILURE}; fix the spec or credentials, "
        f"or delete Job {name} to try again")
    assert failed["status"]["phase"] == "Degraded"
    assert {v["metadata"]["uid"] for v in versions} == {job["metadata"]["uid"]}
    assert all(v["metadata"].get("deletionTimestamp") is None for v in versions), \
        "the failed Job is neither deleted nor created again"
    said = [e for e in events if FAILURE in e.get("message", "")]
    assert len(said) == 1 and said[0]["type"] == "Warning", said
    assert annotated is None and prepare_jobs == []


@pytest.mark.asyncio
async def test_a_serving_resource_keeps_serving_while_it_resolves_again(kube, kubeconfig):
    """Per-pod prepare: the annotation removed, the Deployment stays as it was until the
    new revision is pinned, then rolls to it."""
    body = search_body(prepare="perPod")
    name = resolve_job(parse_resource(body))["metadata"]["name"]
    body["metadata"]["annotations"] = {MODEL_REVISION_ANNOTATION: OLD}
    path = resource_path(EMBEDDING_SEARCH, NS, "news")
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        serving = await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"),
                                 what="the Deployment of the pinned revision")
        await wait_for(lambda: (kube.live(EMBEDDING_SEARCH, NS, "news").get("status") or {})
                       .get("model"), what="status.model")
        # kubectl annotate embeddingsearch news serving.tritonop.dev/model-revision-
        await merge_patch(kube, path, {"metadata": {"annotations": {
            MODEL_REVISION_ANNOTATION: None}}})
        job = await wait_for(lambda: kube.live(JOB, NS, name), what="a fresh resolve Job")
        resolving = await wait_for(lambda: with_reason(kube, EMBEDDING_SEARCH, "news",
                                                       "Resolving"), what="Resolving")
        during = kube.live(DEPLOYMENT, NS, "news-triton")
        await end_job(kube, job, "resolve", resolved(body, NEW), succeeded=True)
        rolled = await wait_for(
            lambda: (d := kube.live(DEPLOYMENT, NS, "news-triton")) and d["metadata"][
                "resourceVersion"] != serving["metadata"]["resourceVersion"] and d,
            what="the Deployment of the new revision")
        status = await wait_for(
            lambda: (live := kube.live(EMBEDDING_SEARCH, NS, "news")) and (
                (live.get("status") or {}).get("model") or {}).get("resolvedRevision") == NEW
            and live, what="the new revision in the status")
        config = kube.live(CONFIG_MAP, NS, "news-triton")

    assert during == serving, "the serving Deployment is held while resolving"
    assert "model" not in resolving["status"], "no revision is pinned while resolving"
    assert status["metadata"]["annotations"][MODEL_REVISION_ANNOTATION] == NEW
    init = rolled["spec"]["template"]["spec"]["initContainers"]
    args = next(c for c in init if c["name"] == "prepare")["args"]
    assert args[args.index("--expect-fingerprint") + 1] == resource_fingerprint(
        pinned(body, NEW))
    assert f"{MODEL_REVISION_ANNOTATION}: '{NEW}'" in config["data"]["resource.yaml"]


@pytest.mark.asyncio
async def test_an_llm_service_is_resolved_before_its_pods_are_made(kube, kubeconfig):
    body = llm_body()
    name = resolve_job(parse_resource(body))["metadata"]["name"]
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, LLM_SERVICE, body)
        job = await wait_for(lambda: kube.live(JOB, NS, name), what="the resolve Job")
        await wait_for(lambda: with_reason(kube, LLM_SERVICE, "chat", "Resolving"),
                       what="Resolving")
        before = kube.live(DEPLOYMENT, NS, "chat-triton")
        await end_job(kube, job, "resolve", resolved(body, OLD), succeeded=True)
        deployment = await wait_for(lambda: kube.live(DEPLOYMENT, NS, "chat-triton"),
                                    what="the Deployment")
        config = kube.live(CONFIG_MAP, NS, "chat-triton")
        status = await wait_for(lambda: (kube.live(LLM_SERVICE, NS, "chat").get("status")
                                         or {}).get("model"), what="status.model")

    assert before is None
    assert deployment is not None
    assert f"{MODEL_REVISION_ANNOTATION}: '{OLD}'" in config["data"]["resource.yaml"]
    assert status == {"source": "hf://acme/gpt", "resolvedRevision": OLD}


@pytest.mark.asyncio
async def test_a_failed_prepare_job_says_what_its_pod_said(kube, kubeconfig):
    body = search_body()
    body["metadata"]["annotations"] = {MODEL_REVISION_ANNOTATION: OLD}
    fingerprint = resource_fingerprint(pinned(search_body(), OLD))
    name = f"news-prepare-{fingerprint}"
    said = ("Downloading acme/bert at 1111111\n"
            "error: news: model source hf://acme/bert: revision 1111111111111111111111111111"
            "111111111111 not found on the hub")
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        job = await wait_for(lambda: kube.live(JOB, NS, name), what="the prepare Job")
        await end_job(kube, job, "prepare", said, succeeded=False)
        failed = await wait_for(lambda: with_reason(kube, EMBEDDING_SEARCH, "news",
                                                    "PrepareFailed"), what="PrepareFailed")

    message = condition(failed)["message"]
    assert message.startswith(f"Job {name} failed to prepare artifacts version {fingerprint}: "
                              "BackoffLimitExceeded: Job has reached the specified backoff "
                              "limit; error: news: model source hf://acme/bert: revision ")
    assert "Downloading" not in message
    assert message.endswith("fix the spec or delete the Job to try again")


@pytest.mark.asyncio
async def test_a_claim_of_someone_else_with_the_artifacts_name_is_never_adopted(kube,
                                                                               kubeconfig):
    """A user's claim named as the operator's would be (``<name>-artifacts``): the resource
    fails with NameConflict and the claim stays the user's (adopted, it would be deleted
    with the resource); once it is gone, the operator makes its own."""
    theirs = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
              "metadata": {"name": "news-artifacts", "namespace": NS},
              "spec": {"accessModes": ["ReadWriteOnce"],
                       "resources": {"requests": {"storage": "1Gi"}}}}
    await create(kube, CLAIM, theirs)
    body = search_body()
    body["metadata"]["annotations"] = {MODEL_REVISION_ANNOTATION: OLD}  # pinned: no resolve
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        failed = await wait_for(lambda: (live := kube.live(EMBEDDING_SEARCH, NS, "news"))
                                and (live.get("status") or {}).get("phase") == "Failed"
                                and live, what="phase Failed")
        await asyncio.sleep(2.5)  # resyncs come and go: still left alone
        kept = kube.live(CLAIM, NS, "news-artifacts")
        jobs = [key for key in kube.objects if key[0] == JOB.resource]
        response = await kube.delete(resource_path(CLAIM, NS, "news-artifacts"))
        assert response.status == 200
        ours = await wait_for(lambda: (claim := kube.live(CLAIM, NS, "news-artifacts"))
                              and claim["metadata"].get("ownerReferences") and claim,
                              what="the operator's own claim")
    message = failed["status"]["message"]
    assert "PersistentVolumeClaim 'news-artifacts' already exists in namespace 'ml'" in message
    assert "not owned by this EmbeddingSearch" in message
    assert not kept["metadata"].get("ownerReferences")
    assert jobs == [], "no prepare Job for a claim the operator could not make"
    [owner] = ours["metadata"]["ownerReferences"]
    assert owner["uid"] == failed["metadata"]["uid"]
