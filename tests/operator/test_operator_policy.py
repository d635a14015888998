"""The real operator refuses what its configuration does not allow, and is not held up by it.

The emulator does no schema validation, so a resource the CRD would refuse (a corpus path
with ``..``) reaches the operator here, as it would where the CRD is older or bypassed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator.test_operator import (
    OPERATOR,
    create,
    events_for,
    live,
    llm_body,
    report_ready,
    search_body,
    status_where,
)
from tests.support.kube_emulator import (
    CONFIG_MAP,
    DEPLOYMENT,
    EMBEDDING_SEARCH,
    LLM_SERVICE,
    SERVICE_ACCOUNT,
    KubeEmulator,
    ResourceSpec,
    running_operator,
    wait_for,
    wait_until_idle,
)

ROOT = Path(__file__).resolve().parents[2]
CORPUS = "corpus/debian-packages.jsonl"

pytestmark = pytest.mark.usefixtures("fast_resync")


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The operator image's examples folder, two levels below / as /opt/tritonop/examples is
    three: ``../../dev/zero`` from here is /dev/zero itself."""
    folder = Path(tempfile.mkdtemp(prefix="tritonop-examples-", dir="/tmp"))
    try:
        (folder / "corpus").mkdir()
        shutil.copy(ROOT / "examples" / CORPUS, folder / CORPUS)
        (folder / "corpus" / "zero.jsonl").symlink_to("/dev/zero")
        monkeypatch.setenv("TRITONOP_EXAMPLES_DIR", str(folder))
        assert (folder / "../../dev/zero").resolve() == Path("/dev/zero")
        yield folder
    finally:
        shutil.rmtree(folder)


def failed(kube: KubeEmulator, kind: ResourceSpec, name: str) -> dict[str, Any] | None:
    return status_where(kube, kind, name, phase="Failed")


async def failed_within(kube: KubeEmulator, name: str, seconds: float) -> dict[str, Any]:
    """The resource ``name`` just created, once Failed, which must take under ``seconds``."""
    started = asyncio.get_running_loop().time()
    body = await wait_for(lambda: failed(kube, EMBEDDING_SEARCH, name), timeout=seconds + 5,
                          what=f"{name} Failed")
    took = asyncio.get_running_loop().time() - started
    assert took < seconds, f"{name} took {took:.2f} s to fail"
    return body


@pytest.mark.asyncio
async def test_a_corpus_path_out_of_the_examples_fails_at_once_and_others_are_served(
        kube, kubeconfig, examples):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        # The first handler run imports the Kubernetes client: not part of what is timed.
        await create(kube, EMBEDDING_SEARCH, search_body("warm", corpus={"source": CORPUS}))
        await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "warm",
                                            observedGeneration=1), what="warm's status")
        await create(kube, EMBEDDING_SEARCH, search_body(
            "escape", corpus={"source": "../../dev/zero"}))
        escape = await failed_within(kube, "escape", 1.0)
        await create(kube, EMBEDDING_SEARCH, search_body(
            "zero", corpus={"source": "corpus/zero.jsonl"}))
        zero = await failed_within(kube, "zero", 1.0)
        # The operator is not stuck: one created right after is served to Ready.
        await create(kube, EMBEDDING_SEARCH, search_body("after", corpus={"source": CORPUS}))
        await wait_for(lambda: live(kube, DEPLOYMENT, "after-triton"), what="after's Deployment")
        await report_ready(kube, "after-triton", ready=1)
        await wait_for(lambda: status_where(kube, EMBEDDING_SEARCH, "after", phase="Ready"),
                       what="after Ready")

    assert escape["status"]["message"].endswith(
        "spec.corpus.source: must not contain '..' path segments: a relative path names a "
        "file inside the folder it resolves against")
    assert zero["status"]["message"].startswith(
        "spec.corpus.source: 'corpus/zero.jsonl' leads outside the folder relative paths "
        f"resolve against ({examples})")
    for name in ("escape", "zero"):
        assert live(kube, DEPLOYMENT, f"{name}-triton") is None
        assert live(kube, CONFIG_MAP, f"{name}-triton") is None


HOST_PATH = {"artifacts": {"hostPath": {"path": "/"}, "prepare": "perPod"}}
IMAGE = "registry.local/triton:custom"


@pytest.mark.asyncio
async def test_a_host_path_or_another_image_is_refused_by_default(kube, kubeconfig):
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body("host", **HOST_PATH))
        await create(kube, LLM_SERVICE, llm_body("image", image=IMAGE))
        host = await wait_for(lambda: failed(kube, EMBEDDING_SEARCH, "host"), what="host Failed")
        image = await wait_for(lambda: failed(kube, LLM_SERVICE, "image"), what="image Failed")
        await wait_until_idle(kube, quiet_for=2.5)  # more than two resync periods
        events = {name: await events_for(kube, name) for name in ("host", "image")}

    says = {"host": "spec.artifacts.hostPath: this operator does not allow host paths (a pod "
                    "that mounts the node's filesystem); its administrator can, with "
                    "TRITONOP_ALLOW_HOST_PATH=true",
            "image": f"spec.image: {IMAGE!r} is not an image this operator runs; its "
                     "administrator can allow it in TRITONOP_ALLOWED_IMAGES"}
    for name, body in (("host", host), ("image", image)):
        status = body["status"]
        assert says[name] in status["message"]
        rendered = {c["type"]: c for c in status["conditions"]}["ConfigRendered"]
        assert (rendered["status"], rendered["reason"]) == ("False", "NotAllowed")
        [warning] = [e for e in events[name] if e["type"] == "Warning"]
        assert (warning["reason"], warning["message"]) == ("Failed", status["message"])
        for kind in (DEPLOYMENT, CONFIG_MAP, SERVICE_ACCOUNT):
            assert live(kube, kind, f"{name}-triton") is None, f"{name}: a {kind.kind}"


@pytest.mark.asyncio
async def test_the_operators_configuration_allows_them(kube, kubeconfig, monkeypatch):
    monkeypatch.setenv("TRITONOP_ALLOW_HOST_PATH", "true")
    monkeypatch.setenv("TRITONOP_ALLOWED_IMAGES", "registry.local/")
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        await create(kube, EMBEDDING_SEARCH, search_body("host", **HOST_PATH))
        await create(kube, LLM_SERVICE, llm_body("image", image=IMAGE))
        host = await wait_for(lambda: live(kube, DEPLOYMENT, "host-triton"), what="host's pods")
        image = await wait_for(lambda: live(kube, DEPLOYMENT, "image-triton"),
                               what="image's pods")
    volumes = {v["name"]: v for v in host["spec"]["template"]["spec"]["volumes"]}
    assert volumes["artifacts"]["hostPath"]["path"] == "/"
    assert image["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert (live(kube, EMBEDDING_SEARCH, "host").get("status") or {}).get("phase") != "Failed"
