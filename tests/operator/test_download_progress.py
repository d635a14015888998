"""How much of the model a prepare step has downloaded, in ArtifactsReady's message while it
runs, read from the pod's log (issue 21), on the emulator.

The test plays the Job controller and the kubelet: it creates the prepare pod, writes its
status (the container running) and its log (what ``tritonop prepare`` prints without a
terminal), as tests/operator/test_model_resolve.py does for the resolve Job. Neither the
Job nor the pod changes while the download goes on: the resync timer's reconciles read the
log again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.operator.test_model_resolve import (
    CLAIM,
    JOB,
    NS,
    OLD,
    condition,
    create,
    merge_patch,
    pinned,
    search_body,
)
from tests.support.kube_emulator import (
    EMBEDDING_SEARCH,
    POD,
    TRITONOP_RESOURCES,
    KubeEmulator,
    resource_path,
    running_emulator,
    running_operator,
    wait_for,
)
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.render.kubernetes import selector_labels
from tritonop.resources import MODEL_REVISION_ANNOTATION

OPERATOR = "tritonop.controller.handlers"
MB = 1_000_000

pytestmark = pytest.mark.usefixtures("fast_resync")


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """The emulator, serving Jobs and claims too (job mode)."""
    async with running_emulator((*TRITONOP_RESOURCES, JOB, CLAIM)) as emulator:
        yield emulator


def pinned_body(prepare: str) -> dict[str, Any]:
    body = search_body(prepare)
    body["metadata"]["annotations"] = {MODEL_REVISION_ANNOTATION: OLD}
    return body


def line(done: int, total: int = 500 * MB) -> str:
    return f"progress: news hf://acme/bert {done}/{total} bytes\n"


def message_with(kube: KubeEmulator, text: str) -> dict[str, Any] | None:
    body = kube.live(EMBEDDING_SEARCH, NS, "news")
    return body if text in condition(body).get("message", "") else None


async def start_pod(kube: KubeEmulator, name: str, labels: dict[str, str],
                    statuses: str) -> None:
    """A pod whose ``prepare`` container (``statuses``: of the init containers or not) runs."""
    await create(kube, POD, {"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": name, "namespace": NS, "labels": labels},
                             "spec": {"containers": [{"name": "prepare", "image": "x"}]}})
    await merge_patch(kube, resource_path(POD, NS, name, "status"), {"status": {
        "phase": "Pending" if statuses == "initContainerStatuses" else "Running",
        statuses: [{"name": "prepare", "ready": False, "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}})


@pytest.mark.asyncio
async def test_a_running_prepare_job_says_how_much_is_downloaded(kube, kubeconfig):
    body = pinned_body("job")
    fingerprint = resource_fingerprint(pinned(search_body(), OLD))
    name = f"news-prepare-{fingerprint}"
    pod = f"{name}-7xk2p"
    plain = (f"Job {name} is preparing artifacts version {fingerprint} (1 pod(s) active, "
             f"0 failed); no version to serve yet: the Deployment waits for it")
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        await wait_for(lambda: kube.live(JOB, NS, name), what="the prepare Job")
        await start_pod(kube, pod, {"batch.kubernetes.io/job-name": name, "job-name": name},
                        "containerStatuses")
        await merge_patch(kube, resource_path(JOB, NS, name, "status"),
                          {"status": {"active": 1}})
        started = await wait_for(lambda: message_with(kube, plain), what="the Job running")
        kube.write_log(NS, pod, "prepare", "INFO tritonop.artifacts.resolve: news: fetching\n"
                       + line(0) + line(120 * MB))
        early = await wait_for(lambda: message_with(kube, "downloaded 120 MB"),
                               what="the bytes downloaded")
        job_then = kube.live(JOB, NS, name)
        kube.write_log(NS, pod, "prepare", line(500 * MB) + "INFO exporting the encoder\n")
        done = await wait_for(lambda: message_with(kube, "downloaded 500 MB"),
                              what="the download's end")
        job_unchanged = kube.live(JOB, NS, name) == job_then
        kube.refuse_logs = 403  # an install whose RBAC grants no pods/log
        refused = await wait_for(lambda: message_with(kube, plain), what="the plain message")

    assert condition(started)["reason"] == "Preparing"
    assert condition(early)["message"] == (
        f"Job {name} is preparing artifacts version {fingerprint} (1 pod(s) active, 0 failed; "
        f"downloaded 120 MB of 500 MB (24%)); no version to serve yet: the Deployment waits "
        f"for it")
    assert (condition(early)["status"], condition(early)["reason"]) == ("False", "Preparing")
    assert early["status"]["phase"] == "Pending"
    assert early["status"]["message"] == condition(early)["message"]
    assert "(1 pod(s) active, 0 failed; downloaded 500 MB of 500 MB (100%))" in \
        condition(done)["message"]
    assert job_unchanged, "no event brought the new figure: the periodic reconcile did"
    assert condition(refused)["message"] == plain


@pytest.mark.asyncio
async def test_a_prepare_init_container_says_how_much_it_downloaded(kube, kubeconfig):
    body = pinned_body("perPod")
    labels = selector_labels(pinned(body, OLD))
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, body)
        await start_pod(kube, "news-triton-5d8f9-abcde", labels, "initContainerStatuses")
        kube.write_log(NS, "news-triton-5d8f9-abcde", "prepare", line(0) + line(250 * MB))
        preparing = await wait_for(lambda: message_with(kube, "downloaded"),
                                   what="the bytes downloaded")

    assert condition(preparing)["message"] == (
        "waiting for a pod to prepare or mount the artifacts: a prepare init container has "
        "downloaded 250 MB of 500 MB (50%)")
    assert (condition(preparing)["status"], condition(preparing)["reason"]) == (
        "Unknown", "Preparing")
