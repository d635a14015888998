"""`kubectl delete -k deploy/` with resources still there: it finishes, and nothing is left.

Runs last in the tier (it removes the installation the other tests share).
"""

from __future__ import annotations

from tests.cluster.conftest import CRD_NAMES, NAMESPACE
from tests.cluster.helpers import children, example, wait_ready
from tests.support.cluster import ROOT, ControlPlane, wait_for


def wait_collector_watches_the_kind(cluster: ControlPlane) -> None:
    """Wait until the garbage collector follows EmbeddingSearches.

    It discovers new kinds every 30 s. A resource created and deleted, with its CRD, before
    that is never seen to go, and the kind no longer resolves: its children stay for good.
    In a cluster the CRDs are older than 30 s when one uninstalls; here they may not be.
    """
    probe = example("EmbeddingSearch", "gc-probe", NAMESPACE)
    cluster.apply(probe)
    owner = cluster.get_json("esearch", "gc-probe", "-n", NAMESPACE)["metadata"]
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "gc-probe-dependent", "namespace": NAMESPACE, "ownerReferences": [{
            "apiVersion": probe["apiVersion"], "kind": "EmbeddingSearch", "name": "gc-probe",
            "uid": owner["uid"]}]}})
    cluster.kubectl("delete", "esearch", "gc-probe", "-n", NAMESPACE)
    wait_for(lambda: cluster.kubectl("get", "configmap", "gc-probe-dependent", "-n", NAMESPACE,
                                     check=False).returncode != 0, 90,
             "the garbage collector to follow EmbeddingSearches")


def test_uninstall_with_resources_left_does_not_hang(cluster, live_operator):
    wait_collector_watches_the_kind(cluster)
    cluster.apply(example("EmbeddingSearch", "leftover", NAMESPACE))
    wait_ready(cluster, "EmbeddingSearch", "leftover", NAMESPACE)
    # The operator's Deployment goes first in kubectl's order, as it would in a cluster.
    live_operator.stop()
    cluster.kubectl("delete", "-k", str(ROOT / "deploy"), "--timeout=120s", timeout=180)
    for crd in CRD_NAMES:
        assert cluster.kubectl("get", "crd", crd, check=False).returncode != 0

    def left() -> dict[str, list[str]]:
        return {kind: [o["metadata"]["name"] for o in objects]
                for kind, objects in children(cluster, NAMESPACE, "leftover").items()}

    try:
        wait_for(lambda: not left(), 90, "the children garbage-collected")
    except TimeoutError:
        assert left() == {}
