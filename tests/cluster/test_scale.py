"""Many resources at once: all reach Ready, and what a resync costs the API server.

The figures are printed and recorded as properties of the junit XML suite, not asserted: speed
targets live in bench/. The operator runs with the deployment's own resync period here.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster.helpers import example
from tests.support.cluster import Operator, operator_container, request_count, wait_for

COUNT = 200
NAMESPACE = "tritonop-scale"
ES = "EmbeddingSearch"


def deploy_resync_seconds(cluster) -> float:
    container = operator_container(kubectl=cluster.binary("kubectl"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    return float(env["TRITONOP_RESYNC_SECONDS"])


def ready_count(cluster) -> int:
    items = cluster.get_json("esearch", "-n", NAMESPACE)["items"]
    return sum(1 for r in items if (r.get("status") or {}).get("phase") == "Ready" and
               r["status"].get("observedGeneration") == r["metadata"]["generation"])


def requests_per_second(cluster, seconds: float) -> float:
    before = request_count(cluster.raw("/metrics"))
    time.sleep(seconds)
    return (request_count(cluster.raw("/metrics")) - before) / seconds


@pytest.mark.timeout(900)
def test_many_resources_reconcile_to_ready(cluster, live_operator, record_testsuite_property):
    resync = deploy_resync_seconds(cluster)
    live_operator.stop()
    cluster.create_namespace(NAMESPACE)
    # What the control plane costs by itself (kwok's node leases, controllers' resyncs).
    idle = requests_per_second(cluster, 10)
    scaled = Operator(cluster, resync_seconds=resync)
    try:
        scaled.start()
        started = time.monotonic()
        resources = [example(ES, f"s{index:03d}", NAMESPACE) for index in range(COUNT)]
        cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": resources}), timeout=300)
        wait_for(lambda: ready_count(cluster) == COUNT, 600,
                 f"{COUNT} EmbeddingSearches Ready", interval=2)
        elapsed = time.monotonic() - started
        # Steady state: every resource resynced at least once in the window.
        time.sleep(5)
        steady = requests_per_second(cluster, resync + 5)
    finally:
        scaled.stop()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false")
        live_operator.start()
    figures = {"resources": COUNT, "seconds_to_ready": round(elapsed, 1),
               "resync_seconds": resync, "idle_requests_per_second": round(idle, 1),
               "steady_requests_per_second": round(steady, 1),
               "operator_requests_per_second": round(steady - idle, 1),
               "operator_requests_per_resource_resync": round((steady - idle) * resync / COUNT,
                                                              2)}
    for key, value in figures.items():
        record_testsuite_property(f"scale_{key}", value)
    print(f"\nscale: {json.dumps(figures)}")
