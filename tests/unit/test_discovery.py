"""The rescan that serves a CRD discovery lists late: which CRD events it waits for."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from kopf._cogs.structs.references import Resource

from tritonop.controller import discovery

CRD = yaml.safe_load((Path(__file__).parents[2] / "crds" /
                      "llmservices.serving.tritonop.dev.yaml").read_text())
ESTABLISHED = {"conditions": [{"type": "Established", "status": "True"}]}


def crd(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(CRD)
    body["status"] = ESTABLISHED
    body.update(changes)
    return body


def test_only_our_established_served_crds_are_waited_for():
    assert discovery.awaited_plural(crd()) == "llmservices"
    assert discovery.awaited_plural(crd(status={})) is None  # not Established yet
    other = crd()
    other["spec"]["group"] = "example.com"
    assert discovery.awaited_plural(other) is None
    deleting = crd()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert discovery.awaited_plural(deleting) is None
    unserved = crd()
    for version in unserved["spec"]["versions"]:
        version["served"] = False
    assert discovery.awaited_plural(unserved) is None


def resource(plural: str) -> Resource:
    return Resource(group=discovery.API_GROUP, version=discovery.API_VERSION, plural=plural)


def test_kopf_rescans_until_discovery_lists_the_plural_and_no_longer():
    insights = SimpleNamespace(watched_resources=set())
    scans = []

    async def kopf_rescan(*, raw_event: Any, insights: Any, **_: Any) -> None:
        scans.append(raw_event["type"])
        if len(scans) == 3:  # discovery lists it from the third scan on
            insights.watched_resources.add(resource("llmservices"))

    process = discovery.waiting_for_discovery(kopf_rescan, wait_seconds=10)
    event = {"type": "MODIFIED", "object": crd()}
    asyncio.run(process(raw_event=event, insights=insights, settings=None))
    assert len(scans) == 3
    asyncio.run(process(raw_event=event, insights=insights, settings=None))
    assert len(scans) == 4  # served: kopf's own rescan only


def test_the_wait_is_bounded():
    insights = SimpleNamespace(watched_resources=set())
    scans = []

    async def kopf_rescan(**_: Any) -> None:
        scans.append(1)

    process = discovery.waiting_for_discovery(kopf_rescan, wait_seconds=0.5)
    asyncio.run(process(raw_event={"type": "ADDED", "object": crd()}, insights=insights))
    assert 2 <= len(scans) <= 4
