"""The API-server behaviour the emulator fix adds, checked over HTTP without an operator.

Operator tests lean on these: if one breaks, a kopf test may stall or pass for
the wrong reason, so they are pinned here one by one, each in milliseconds.
"""

import asyncio
import json
from typing import Any

import pytest

from tests.support.kube_emulator import (
    APPLY_PATCH,
    CONFIG_MAP,
    EMBEDDING_SEARCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    KubeEmulator,
    resource_path,
)

pytestmark = pytest.mark.asyncio

NAMESPACE = "ml"
JSON_PATCH = "application/json-patch+json"
SEARCH_PATH = resource_path(EMBEDDING_SEARCH, NAMESPACE, "demo")


async def post(kube: KubeEmulator, spec: Any = EMBEDDING_SEARCH, **metadata: Any) -> Any:
    body = {"metadata": {"name": "demo", **metadata}, "spec": {"replicas": 1}}
    response = await kube.post(resource_path(spec, NAMESPACE), json=body)
    assert response.status == 201, await response.text()  # Created, as the API server
    return await response.json()


async def patch(kube: KubeEmulator, body: Any, content_type: str = MERGE_PATCH,
                path: str = SEARCH_PATH) -> tuple[int, Any]:
    response = await kube.patch(path, json=body, headers={"Content-Type": content_type})
    return response.status, await response.json()


async def test_writes_carry_server_metadata_and_versions(kube: KubeEmulator) -> None:
    created = await post(kube)
    _, status_patched = await patch(kube, {"status": {"phase": "Ready"}},
                                    path=f"{SEARCH_PATH}/status")
    _, spec_patched = await patch(kube, {"spec": {"replicas": 2}})
    _, unchanged = await patch(kube, {"spec": {"replicas": 2}})

    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["namespace"] == NAMESPACE
    assert (created["apiVersion"], created["kind"]) == ("serving.tritonop.dev/v1alpha1",
                                                        "EmbeddingSearch")
    versions = [int(body["metadata"]["resourceVersion"])
                for body in (created, status_patched, spec_patched, unchanged)]
    assert versions[0] < versions[1] < versions[2] == versions[3]
    assert [body["metadata"]["generation"] for body in (created, status_patched, spec_patched)] \
        == [1, 1, 2]


@pytest.mark.parametrize(("body", "content_type", "status"), [
    ([{"op": "test", "path": "/metadata/resourceVersion", "value": "99"}], JSON_PATCH, 422),
    ({"metadata": {"resourceVersion": "99"}, "spec": {"replicas": 5}}, MERGE_PATCH, 409),
    ({"spec": {"replicas": 5}}, STRATEGIC_MERGE_PATCH, 415),
], ids=["failed-json-patch-test", "stale-merge-patch", "strategic-merge-on-custom-resource"])
async def test_refused_patches_get_the_api_servers_status_codes(
    kube: KubeEmulator, body: Any, content_type: str, status: int
) -> None:
    await post(kube)
    assert (await patch(kube, body, content_type))[0] == status
    assert (kube.live(EMBEDDING_SEARCH, NAMESPACE, "demo") or {})["spec"] == {"replicas": 1}


async def test_duplicates_and_missing_objects_are_refused(kube: KubeEmulator) -> None:
    await post(kube)
    duplicate = await kube.post(resource_path(EMBEDDING_SEARCH, NAMESPACE),
                                json={"metadata": {"name": "demo"}})
    missing, _ = await patch(kube, {"spec": {}}, path=resource_path(EMBEDDING_SEARCH,
                                                                     NAMESPACE, "other"))
    assert (duplicate.status, missing) == (409, 404)


async def test_status_subresource_isolates_status_from_the_object(kube: KubeEmulator) -> None:
    await post(kube)
    await patch(kube, {"status": {"phase": "Ready"}, "spec": {"replicas": 9}},
                path=f"{SEARCH_PATH}/status")
    await patch(kube, {"status": {"phase": "Lost"}, "spec": {"replicas": 2}})

    body = kube.live(EMBEDDING_SEARCH, NAMESPACE, "demo") or {}
    assert (body["spec"], body["status"]) == ({"replicas": 2}, {"phase": "Ready"})


async def test_server_side_apply_creates_then_merges(kube: KubeEmulator) -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "cfg", "labels": {"app": "x"}}, "data": {"a": "1"}}
    path = resource_path(CONFIG_MAP, NAMESPACE, "cfg")
    created_status, _ = await patch(kube, config_map, APPLY_PATCH, path)
    updated_status, updated = await patch(kube, config_map | {"data": {"a": "2"}},
                                          APPLY_PATCH, path)

    assert (created_status, updated_status) == (200, 200)
    assert updated["data"] == {"a": "2"} and updated["metadata"]["labels"] == {"app": "x"}


async def test_generate_name_and_label_selectors(kube: KubeEmulator) -> None:
    first = await post(kube, CONFIG_MAP, name=None, generateName="cfg-", labels={"app": "x"})
    await post(kube, CONFIG_MAP, name="other", labels={"app": "y"})

    response = await kube.get(resource_path(CONFIG_MAP, NAMESPACE),
                              params={"labelSelector": "app=x"})
    names = [item["metadata"]["name"] for item in (await response.json())["items"]]
    assert first["metadata"]["name"].startswith("cfg-") and names == [first["metadata"]["name"]]


async def watch(kube: KubeEmulator, count: int, **params: str) -> list[tuple[str, str]]:
    """The first ``count`` events of a watch, as (type, resourceVersion)."""
    query = {"watch": "true", **params}
    async with asyncio.timeout(5), kube.get(resource_path(EMBEDDING_SEARCH), params=query) as rsp:
        lines = [json.loads(await rsp.content.readline()) for _ in range(count)]
    return [(line["type"], line["object"]["metadata"]["resourceVersion"]) for line in lines]


async def test_watch_resumes_after_its_version_without_loss_or_repeats(
    kube: KubeEmulator,
) -> None:
    await post(kube)
    listed = await (await kube.get(resource_path(EMBEDDING_SEARCH))).json()
    since = listed["metadata"]["resourceVersion"]
    await patch(kube, {"spec": {"replicas": 2}})
    await patch(kube, {"spec": {"replicas": 3}})
    resumed = asyncio.create_task(watch(kube, 3, resourceVersion=since))
    fresh = await watch(kube, 1)
    await kube.delete(SEARCH_PATH)

    first = int(since)
    assert fresh == [("ADDED", str(first + 2))]  # no version: the current state, once
    assert await resumed == [("MODIFIED", str(first + 1)), ("MODIFIED", str(first + 2)),
                             ("DELETED", str(first + 3))]
