"""The fixed emulator carries a real kopf operator through create, update and delete.

If these fail, operator tests built on the emulator cannot be trusted: see
``tests/support/kube_emulator.py`` for what the fix changes in kmock.
"""

from pathlib import Path
from typing import Any

import pytest

from tests.operator import toy_operator
from tests.support.kube_emulator import (
    CONFIG_MAP,
    EMBEDDING_SEARCH,
    MERGE_PATCH,
    KubeEmulator,
    resource_path,
    resource_specs_from_crd,
    running_operator,
    wait_for,
    wait_until_idle,
)

TOY_OPERATOR = Path(toy_operator.__file__)
NAMESPACE, NAME = "ml", "demo"
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


async def create_search(kube: KubeEmulator, replicas: int) -> None:
    """POST an EmbeddingSearch as a user (kubectl) would."""
    body = {"apiVersion": EMBEDDING_SEARCH.api_version, "kind": EMBEDDING_SEARCH.kind,
            "metadata": {"name": NAME}, "spec": {"replicas": replicas}}
    response = await kube.post(resource_path(EMBEDDING_SEARCH, NAMESPACE), json=body)
    assert response.status == 201, await response.text()


def search(kube: KubeEmulator) -> dict[str, Any] | None:
    return kube.live(EMBEDDING_SEARCH, NAMESPACE, NAME)


def handled(kube: KubeEmulator, generation: int) -> dict[str, Any] | None:
    """The EmbeddingSearch once the operator has reported ``generation`` as handled."""
    body = search(kube)
    observed = (body or {}).get("status", {}).get("observedGeneration")
    return body if observed == generation else None


def child(kube: KubeEmulator) -> dict[str, Any] | None:
    return kube.live(CONFIG_MAP, NAMESPACE, toy_operator.config_map_name(NAME))


def child_writes(kube: KubeEmulator) -> int:
    """How many times the handler applied the child: one PATCH per handler run."""
    name = toy_operator.config_map_name(NAME)
    return len([request for request in kube if request.method == "PATCH" and request.name == name])


@pytest.mark.asyncio
@pytest.mark.parametrize(("operator", "namespace"), [
    pytest.param(TOY_OPERATOR, None, id="file-cluster-wide"),
    pytest.param(toy_operator.__name__, NAMESPACE, id="module-namespaced"),
])
async def test_create_applies_an_owned_child_and_reports_status(
    kube: KubeEmulator, kubeconfig: Path, operator: Path | str, namespace: str | None
) -> None:
    async with running_operator(operator, kubeconfig=kubeconfig, namespace=namespace):
        await create_search(kube, replicas=2)
        body = await wait_for(lambda: handled(kube, 1), what="status.observedGeneration == 1")
        config_map = await wait_for(lambda: child(kube), what="the child ConfigMap")

    assert body["status"]["phase"] == "Ready"
    assert KOPF_FINALIZER in body["metadata"]["finalizers"]
    assert config_map["data"] == {"replicas": "2"}
    [owner] = config_map["metadata"]["ownerReferences"]
    assert owner["uid"] == body["metadata"]["uid"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("EmbeddingSearch", NAME, True)


@pytest.mark.asyncio
async def test_spec_update_runs_the_handler_exactly_once_more(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    async with running_operator(TOY_OPERATOR, kubeconfig=kubeconfig):
        await create_search(kube, replicas=2)
        await wait_for(lambda: handled(kube, 1), what="status.observedGeneration == 1")
        response = await kube.patch(resource_path(EMBEDDING_SEARCH, NAMESPACE, NAME),
                                    json={"spec": {"replicas": 3}},
                                    headers={"Content-Type": MERGE_PATCH})
        assert response.status == 200, await response.text()
        body = await wait_for(lambda: handled(kube, 2), what="status.observedGeneration == 2")
        await wait_until_idle(kube)

    assert body["metadata"]["generation"] == 2
    assert (child(kube) or {}).get("data") == {"replicas": "3"}
    assert child_writes(kube) == 2


@pytest.mark.asyncio
async def test_delete_runs_through_the_finalizer_and_removes_the_object(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    async with running_operator(TOY_OPERATOR, kubeconfig=kubeconfig):
        await create_search(kube, replicas=1)
        await wait_for(lambda: handled(kube, 1), what="status.observedGeneration == 1")
        response = await kube.delete(resource_path(EMBEDDING_SEARCH, NAMESPACE, NAME))
        assert response.status == 200, await response.text()
        await wait_for(lambda: search(kube) is None, what="the EmbeddingSearch to be gone")

    versions = kube.versions(EMBEDDING_SEARCH, NAMESPACE, NAME)
    deleting = [v for v in versions if v["metadata"].get("deletionTimestamp")]
    assert KOPF_FINALIZER in deleting[0]["metadata"]["finalizers"]
    assert deleting[-1]["status"]["phase"] == "Deleting"
    assert not deleting[-1]["metadata"].get("finalizers")
    response = await kube.get(resource_path(EMBEDDING_SEARCH, NAMESPACE, NAME))
    assert response.status == 404
    assert child(kube) is None  # garbage-collected through its ownerReference


def test_crd_manifests_register_as_the_built_in_specs() -> None:
    crd = {"spec": {
        "group": "serving.tritonop.dev", "scope": "Namespaced",
        "names": {"plural": "embeddingsearches", "kind": "EmbeddingSearch"},
        "versions": [{"name": "v1alpha1", "served": True, "subresources": {"status": {}}},
                     {"name": "v1alpha0", "served": False}],
    }}
    assert resource_specs_from_crd(crd) == [EMBEDDING_SEARCH]
