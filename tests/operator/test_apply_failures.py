"""Children that keep failing to apply: said in the status, one Event per distinct failure.

Before, a Deployment the API server kept answering with a 500 (``cpu: fast``, before the CRD
checked quantities) was retried forever with no condition and no event, while the ConfigMap
and Service applied before it stayed. Faults are injected into the emulator's writes.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from tests.operator.test_operator import events_for, report_ready, search_body
from tests.operator.test_operator_fixes import (
    NS,
    OPERATOR,
    applies,
    create,
    is_apply,
    search,
    status_where,
    statuses_seen,
)
from tests.support import kube_emulator
from tests.support.kube_emulator import DEPLOYMENT, KubeEmulator, running_operator, wait_for

pytestmark = pytest.mark.usefixtures("fast_resync")

FIRST = ("quantities must match the regular expression "
         "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
SECOND = "etcdserver: request timed out"


@pytest.fixture
def fault(monkeypatch) -> dict[str, Any]:
    """Applies of the Deployment answered with ``status`` and ``message`` while it is set."""
    now = {"status": 500, "message": None}
    original = KubeEmulator._write

    def refusing(self: KubeEmulator, request: kmock.Request, resource: Any) -> None:
        if is_apply(request, "deployments", "news-triton") and now["message"] is not None:
            raise kube_emulator._error(now["status"], "InternalError", now["message"])
        original(self, request, resource)

    monkeypatch.setattr(KubeEmulator, "_write", refusing)
    return now


def rendered(body: dict[str, Any]) -> dict[str, Any]:
    return {c["type"]: c for c in body["status"]["conditions"]}["ConfigRendered"]


def failing_with(kube: KubeEmulator, text: str) -> dict[str, Any] | None:
    body = search(kube)
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return body if any(c["type"] == "ConfigRendered" and c["reason"] == "ApplyFailing"
                       and text in c["message"] for c in conditions) else None


async def more_applies(kube: KubeEmulator, count: int) -> None:
    """Wait for ``count`` more tries at the Deployment (each one refused while the fault is)."""
    seen = len(applies(kube, "deployments", "news-triton"))
    await wait_for(lambda: len(applies(kube, "deployments", "news-triton")) >= seen + count,
                   what=f"{count} more applies of the Deployment", timeout=60)


@pytest.mark.asyncio
async def test_a_failing_child_gets_a_condition_and_one_event_per_distinct_failure(
        kube, kubeconfig, fault, monkeypatch):
    from tritonop.controller import handlers

    fault["message"] = FIRST
    async with running_operator(OPERATOR, kubeconfig=kubeconfig):
        monkeypatch.setattr(handlers, "MAX_RETRY_DELAY", 1.0)  # after kopf (re)loaded it
        await create(kube, search_body())
        first = await wait_for(lambda: failing_with(kube, FIRST), what="the first failure",
                               timeout=30)
        await more_applies(kube, 4)
        fault.update(status=503, message=SECOND)
        second = await wait_for(lambda: failing_with(kube, SECOND), what="the second failure",
                                timeout=30)
        await more_applies(kube, 4)
        fault["message"] = None
        await wait_for(lambda: kube.live(DEPLOYMENT, NS, "news-triton"),
                       what="the Deployment, once the server takes it", timeout=30)
        await report_ready(kube, "news-triton", ready=1)
        ready = await wait_for(lambda: status_where(kube, phase="Ready"), what="Ready")
        events = await events_for(kube, "news")

    condition = rendered(first)
    assert (condition["status"], condition["reason"]) == ("False", "ApplyFailing")
    assert first["status"]["phase"] == "Pending"  # a phase, never none
    assert condition["message"] == (
        f"the API server refused Deployment 'news-triton' (500): {FIRST} (applied before it, "
        "and kept: ServiceAccount 'news-triton', ConfigMap 'news-triton', Service 'news'); "
        "retrying")
    assert first["status"]["message"] == condition["message"]
    assert "(503)" in rendered(second)["message"]
    warnings = [e["message"] for e in events if (e["type"], e["reason"]) == ("Warning",
                                                                            "ApplyFailing")]
    assert [sum(FIRST in m for m in warnings), sum(SECOND in m for m in warnings)] == [1, 1], \
        warnings
    assert rendered(ready)["reason"] == "Rendered"
    assert "Failed" not in statuses_seen(kube, "phase")
