"""The README's "On Kubernetes" commands, verbatim, on a node whose pods really run.

A :class:`~tests.support.node_agent.NodeAgent` joins the session's control plane for this
module; the kwok nodes are cordoned meanwhile, so every new pod lands on it and runs under
the pod runner (images stood in for by this machine's programs). The operator runs as its own
pod, in-cluster (projected service-account token, ``KUBERNETES_SERVICE_HOST``), under
deploy/'s ServiceAccount; the example's pods prepare their artifacts, load Triton, pass
their probes and answer the seed's request by the pod IPs that the Service's EndpointSlices
list. The tests run in order, each on what the one before set up.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.agent import (
    SEED_REQUEST,
    SYSTEM,
    agent_node,
    assert_every_endpoint_answers,
    kubectl,
    news_pods,
    operator_pod,
    pods,
    post,
    ready,
    record_figure,
    reference_top5,
)
from tests.cluster.helpers import get, wait_status
from tests.cluster.service_load import Counts, ServiceLoad
from tests.support.cluster import ROOT, ControlPlane, Operator, wait_for
from tests.support.node_agent import NodeAgent
from tests.support.podrunner import can_run_pods
from tritonop.render.kubernetes import CONFIG_HASH_ANNOTATION

REASON = can_run_pods()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def node(cluster: ControlPlane, operator: Operator, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeAgent]:
    with agent_node(cluster, operator, tmp_path_factory.mktemp("node")) as agent:
        yield agent


def test_quickstart_operator_runs_as_its_own_pod(cluster, node):
    """`kubectl apply -k deploy/`: the operator's pod runs on the node, in-cluster, under
    its ServiceAccount, is Ready and live, and reconciles a resource."""
    kubectl(cluster, "kubectl apply -k deploy/")
    pod = wait_for(lambda: (p := operator_pod(cluster)) and ready(p) and p, 120,
                   "the operator's pod Ready")
    assert pod["spec"]["nodeName"] == node.name
    assert pod["status"]["podIP"] == node.pod(SYSTEM, pod["metadata"]["name"]).runner.ip
    worker = node.pod(SYSTEM, pod["metadata"]["name"])
    process = worker.runner.container("operator").process
    status = Path(f"/proc/{process.pid}/status").read_text()
    assert "\nUid:\t1000\t1000\t1000\t1000\n" in status, status
    # Its liveness probe's endpoint, from the node, at the pod's IP (Ready comes first: the
    # pod has no readiness probe, an operator serves no traffic).
    def healthy() -> bool:
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/healthz",
                                    timeout=10) as response:
            return response.status == 200

    try:
        wait_for(healthy, 90, "the operator's /healthz")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{worker.runner.log_tail('operator')}") from None
    # In-cluster: no kubeconfig, the projected token and the kubernetes Service's address.
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    assert b"KUBERNETES_SERVICE_HOST=" + node.service_ip.encode() in environ
    assert not [e for e in environ if e.startswith(b"KUBECONFIG=")]
    assert b"POD_NAMESPACE=" + SYSTEM.encode() in environ
    # Its memory limit (512Mi), through the container's cgroup.
    (memory,) = [line.split(":", 2)[2] for line in
                 Path(f"/proc/{process.pid}/cgroup").read_text().splitlines()
                 if line.split(":")[1] == "memory"]
    limit = Path("/sys/fs/cgroup/memory", memory.lstrip("/"), "memory.limit_in_bytes")
    assert memory.endswith("/operator") and limit.read_text().strip() == str(512 * 2**20)

    probe = yaml.safe_load((ROOT / "examples" / "news-search.yaml").read_text())
    probe["metadata"] = {"name": "quickstart-probe", "namespace": "tritonop-test"}
    # No pod and no prepare Job: only the operator's own work is looked at here.
    probe["spec"].update(replicas=0, artifacts={"prepare": "perPod"})
    cluster.apply(probe)
    done = wait_status(cluster, "EmbeddingSearch", "quickstart-probe", "tritonop-test",
                       lambda r: (r.get("status") or {}).get("phase") == "Pending"
                       and (r.get("status") or {}).get("observedGeneration") == 1,
                       "reconciled by the in-cluster operator", timeout=120)
    assert done["status"]["message"] == "scaled to zero replicas"
    for kind in ("configmap", "service", "deployment"):
        assert get(cluster, kind, "quickstart-probe-triton" if kind != "service"
                   else "quickstart-probe", "tritonop-test"), kind
    cluster.kubectl("delete", "esearch", "quickstart-probe", "-n", "tritonop-test",
                    "--timeout=60s")
    assert not node.errors, node.errors
    pod = operator_pod(cluster)
    assert pod is not None
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0


# A cold start embeds the 20K-text corpus in the prepare Job's pod: ~4 minutes on two quiet
# cores, over 15 on a loaded machine (CI once hit the suite's 900 s timeout there).
@pytest.mark.timeout(2400)
def test_quickstart_news_search_answers_through_its_service(cluster, node,
                                                            record_testsuite_property):
    """`kubectl apply -f examples/news-search.yaml`: the prepare Job's pod fills a claim, the
    Triton pod loads it, turns Ready and answers the seed's search at the pod IPs that its
    Service's EndpointSlices list."""
    started, load = time.monotonic(), os.getloadavg()[0]
    kubectl(cluster, "kubectl apply -f examples/news-search.yaml")
    resource = wait_status(cluster, "EmbeddingSearch", "news", "default",
                           lambda r: (r.get("status") or {}).get("phase") == "Ready",
                           "Ready", timeout=2100)
    ids = assert_every_endpoint_answers(cluster, 1)
    seconds = time.monotonic() - started
    record_figure(record_testsuite_property, "quickstart_news_first_answer", seconds, load)
    print(f"\nkubectl apply -f examples/news-search.yaml to the first answer: {seconds:.0f} s")
    assert resource["status"]["readyReplicas"] == 1
    (pod,) = news_pods(cluster)
    assert pod["spec"]["nodeName"] == node.name
    # The cluster has a default StorageClass (the node's provisioner): the artifacts were
    # prepared once, by the prepare Job's pod on this node, into a bound claim.
    claim = cluster.get_json("pvc", "news-artifacts", "-n", "default")
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["storageClassName"] == "tritonop-local"
    jobs = cluster.get_json("jobs", "-n", "default")["items"]
    assert [j["status"].get("succeeded") for j in jobs] == [1], jobs
    assert not pod["spec"].get("initContainers")
    assert {c["name"]: c["ready"] for c in pod["status"]["containerStatuses"]} == {
        "triton": True, "gateway": True}
    # Triton itself listens on the pod's loopback: reached as `kubectl port-forward` does.
    runner = node.pod("default", pod["metadata"]["name"]).runner
    triton = post(f"{runner.forward(8000)}/v2/models/news/generate", SEED_REQUEST)
    assert triton["ids"] == ids
    assert ids == reference_top5(node, pod["metadata"]["name"])
    listed = kubectl(cluster, "kubectl get esearch")
    assert listed.split("\n")[1].split()[:3] == ["news", "Ready", "1/1"], listed
    assert "Ready" in kubectl(cluster, "kubectl describe esearch news")
    assert not node.errors, node.errors


def test_quickstart_scale_to_three_and_a_deleted_pod_is_replaced(cluster, node):
    """`kubectl scale esearch news --replicas=3`: three Ready pods behind the Service, on
    the prepared claim; a deleted pod is stopped and replaced by a new one that serves."""
    started = time.monotonic()
    kubectl(cluster, "kubectl scale esearch news --replicas=3")
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("readyReplicas") == 3
                and r["status"].get("phase") == "Ready", "3 ready replicas", timeout=900)
    print(f"\nkubectl scale esearch news --replicas=3 to 3 Ready: "
          f"{time.monotonic() - started:.0f} s")
    assert_every_endpoint_answers(cluster, 3)
    victim = news_pods(cluster)[0]["metadata"]
    runner = node.pod("default", victim["name"]).runner
    cluster.kubectl("delete", "pod", victim["name"], "-n", "default", "--wait=false")
    wait_for(lambda: cluster.kubectl("get", "pod", victim["name"], "-n", "default",
                                     check=False).returncode != 0, 120,
             "the deleted pod stopped and removed")
    # Removed only once its containers were gone, and its network namespace with them.
    assert all(c.process is None or c.process.poll() is not None for c in runner.containers)
    assert not Path(f"/run/netns/{runner.netns}").exists()

    def replaced() -> bool:
        running = news_pods(cluster)
        return len(running) == 3 and all(ready(p) for p in running) \
            and victim["uid"] not in {p["metadata"]["uid"] for p in running}

    wait_for(replaced, 600, "3 Ready pods again, the deleted one replaced")
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("readyReplicas") == 3, "3 ready again",
                timeout=120)
    assert_every_endpoint_answers(cluster, 3)
    assert not node.errors, node.errors


# --- nothing dropped -----------------------------------------------------------------------
# A steady load through the Service (tests/cluster/service_load.py) while pods stop: a pod
# deleted, a rolling update, a scale-down. A stopping pod's gateway fails its readiness at
# once and serves new requests for its drain (--drain-seconds) while the EndpointSlice
# controller and the load client (kube-proxy's part) take it out; then it finishes what it
# has, and only then does Triton's preStop hook let Triton stop.

MIN_ANSWERED = 100
ROUTING_LAG = 2.0
"""Seconds the load client routes by an out-of-date view of the endpoints: kube-proxy's
(at most one sync a second, and the rules' update) on a busy node. So requests do reach a
pod after it was told to stop, which only its drain answers."""


def news_with_three_ready_replicas(cluster: ControlPlane) -> None:
    """Where the scale test leaves the quickstart; from a fresh module (``-k test_no_drop``)
    the operator is installed, the example applied and scaled to three first."""
    pod = operator_pod(cluster)
    if pod is None or not ready(pod):
        kubectl(cluster, "kubectl apply -k deploy/")
        wait_for(lambda: (p := operator_pod(cluster)) and ready(p), 180, "the operator Ready")
    news = get(cluster, "esearch", "news", "default")
    if news is None:
        kubectl(cluster, "kubectl apply -f examples/news-search.yaml")
    if news is None or news["spec"].get("replicas") != 3:
        kubectl(cluster, "kubectl scale esearch news --replicas=3")
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("readyReplicas") == 3
                and r["status"].get("phase") == "Ready", "3 ready replicas", timeout=2100)
    wait_for(lambda: len(all_news_pods(cluster)) == 3, 180, "no news pod terminating")
    assert_every_endpoint_answers(cluster, 3)


def all_news_pods(cluster: ControlPlane) -> list[dict[str, Any]]:
    """The news pods, terminating ones included."""
    return pods(cluster, "default", "app.kubernetes.io/instance=news")


def service_load(cluster: ControlPlane) -> ServiceLoad:
    """The seed's search through the news Service, as in the README, from three clients."""
    return ServiceLoad(cluster, {"model": "news", **SEED_REQUEST}, threads=3, pause=0.05,
                       lag=ROUTING_LAG)


def record_counts(record_testsuite_property: Any, case: str, counts: Counts) -> None:
    record_testsuite_property(f"no_drop_{case}_sent", counts.sent)
    record_testsuite_property(f"no_drop_{case}_answered", counts.answered)
    record_testsuite_property(f"no_drop_{case}_failed", counts.failed)
    record_testsuite_property(f"no_drop_{case}_to_stopping", counts.to_stopping)
    print(f"\nno drop, {case}: {counts.sent} sent, {counts.answered} answered, "
          f"{counts.failed} failed, {counts.to_stopping} sent to a stopping pod; answered by "
          f"endpoint: {dict(counts.by_endpoint)}")


def wait_answered_by_three(load: ServiceLoad) -> None:
    """Until the load's view lists three endpoints (the new pods among them) and each has
    answered since."""
    wait_for(lambda: len(load.endpoints) == 3, 60, "three endpoints, the new pods among them")
    answered = load.counts.by_endpoint.copy()
    wait_for(lambda: all(load.counts.by_endpoint[a] > answered[a] for a, _ in load.endpoints),
             60, "answers from every endpoint")


def assert_nothing_dropped(counts: Counts, node: NodeAgent) -> None:
    assert counts.failed == 0, counts.failures[:20]
    assert counts.answered == counts.sent
    assert counts.answered >= MIN_ANSWERED, counts
    # Requests did reach a pod told to stop (routed ROUTING_LAG late): its drain answered.
    assert counts.to_stopping > 0, counts
    assert not node.errors, node.errors


@pytest.mark.timeout(2400)
def test_no_drop_when_a_pod_is_deleted(cluster, node, record_testsuite_property):
    """`kubectl delete pod` under load: the pod drains and stops, a new one replaces it, and
    every request sent meanwhile is answered."""
    news_with_three_ready_replicas(cluster)
    victim = news_pods(cluster)[0]["metadata"]
    with service_load(cluster) as load:
        cluster.kubectl("delete", "pod", victim["name"], "-n", "default", "--wait=false")
        wait_for(lambda: victim["uid"] not in {p["metadata"]["uid"]
                                               for p in all_news_pods(cluster)},
                 180, "the deleted pod stopped and removed")

        def replaced() -> bool:
            running = news_pods(cluster)
            return len(running) == 3 and all(ready(p) for p in running)

        wait_for(replaced, 600, "3 Ready pods again")
        wait_answered_by_three(load)
    counts = load.counts
    record_counts(record_testsuite_property, "pod_deleted", counts)
    assert_nothing_dropped(counts, node)


@pytest.mark.timeout(2400)
def test_no_drop_during_a_rolling_update(cluster, node, record_testsuite_property):
    """A spec change that rolls the pods (search.defaultTopK: a new config hash, the same
    artifacts, so no prepare Job) under load: one new pod at a time (maxSurge 1 and
    maxUnavailable 0 of 3), each old one drained; nothing dropped."""
    news_with_three_ready_replicas(cluster)
    before = {p["metadata"]["uid"] for p in all_news_pods(cluster)}
    deployment = cluster.get_json("deployment", "news-triton", "-n", "default")
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert (strategy["maxSurge"], strategy["maxUnavailable"]) == ("25%", "25%")  # 1 and 0 of 3
    config_hash = deployment["spec"]["template"]["metadata"]["annotations"][
        CONFIG_HASH_ANNOTATION]
    def prepare_jobs() -> set[str]:
        return {j["metadata"]["name"] for j in cluster.get_json("jobs", "-n", "default")["items"]
                if "-prepare-" in j["metadata"]["name"]}

    jobs = prepare_jobs()
    top_k = get(cluster, "esearch", "news", "default")["spec"]["search"]["defaultTopK"]
    with service_load(cluster) as load:
        cluster.kubectl("patch", "esearch", "news", "-n", "default", "--type=merge", "-p",
                        json.dumps({"spec": {"search": {"defaultTopK": top_k + 1}}}))

        def rolled() -> bool:
            running = all_news_pods(cluster)
            return len(running) == 3 and all(ready(p) for p in running) \
                and not before & {p["metadata"]["uid"] for p in running}

        wait_for(rolled, 1200, "3 new Ready pods, the old ones gone")
        wait_answered_by_three(load)
    counts = load.counts
    record_counts(record_testsuite_property, "rolling_update", counts)
    assert_nothing_dropped(counts, node)
    rolled_to = cluster.get_json("deployment", "news-triton", "-n", "default")
    assert rolled_to["spec"]["template"]["metadata"]["annotations"][
        CONFIG_HASH_ANNOTATION] != config_hash
    assert prepare_jobs() == jobs  # the same artifacts: nothing prepared again
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("readyReplicas") == 3
                and r["status"].get("phase") == "Ready", "Ready after the update", timeout=120)


@pytest.mark.timeout(2400)
def test_no_drop_when_scaled_down_from_three_to_one(cluster, node, record_testsuite_property):
    """`kubectl scale esearch news --replicas=1` under load: two pods drain and stop at
    once; nothing dropped. The resource stays, at one replica, for the module's teardown."""
    news_with_three_ready_replicas(cluster)
    with service_load(cluster) as load:
        kubectl(cluster, "kubectl scale esearch news --replicas=1")
        wait_for(lambda: len(all_news_pods(cluster)) == 1, 300,
                 "two pods stopped and removed")
        wait_for(lambda: len(load.endpoints) == 1, 60, "one endpoint left")
        answered = load.counts.answered
        wait_for(lambda: load.counts.answered > answered, 60, "answers from the last pod")
    counts = load.counts
    record_counts(record_testsuite_property, "scale_down", counts)
    assert_nothing_dropped(counts, node)
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("readyReplicas") == 1
                and r["status"].get("phase") == "Ready", "1 ready replica", timeout=120)


def plain_pod(name: str, command: str, **spec: Any) -> dict[str, Any]:
    """A pod of the Triton image (its stand-in) running a shell command, with an emptyDir."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "main", "image": "ghcr.io/tritonop/triton:0.1.0",
                                     "command": ["sh", "-c", command],
                                     "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
                     "volumes": [{"name": "work", "emptyDir": {}}], **spec}}


def test_quickstart_operator_upgrade_restarts_no_serving_pod(cluster, node):
    """A new operator pod that renders the same children (`kubectl rollout restart`, as an
    upgrade of the operator alone replaces its pod) leaves the serving pods alone: the same
    pods, not restarted, the same pod template; and it serves the resource (a scale)."""
    if get(cluster, "esearch", "news", "default") is None:  # run alone
        news_with_three_ready_replicas(cluster)
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("phase") == "Ready", "Ready", timeout=600)
    serving = {p["metadata"]["uid"]: [c["restartCount"] for c in p["status"]["containerStatuses"]]
               for p in news_pods(cluster)}
    template = cluster.get_json("deployment", "news-triton", "-n", "default")["spec"]["template"]
    old = operator_pod(cluster)
    assert old is not None
    kubectl(cluster, "kubectl rollout restart deployment/tritonop -n tritonop-system")
    wait_for(lambda: (p := operator_pod(cluster)) and ready(p)
             and p["metadata"]["uid"] != old["metadata"]["uid"], 180,
             "the new operator pod Ready, the old one gone")
    kubectl(cluster, f"kubectl scale esearch news --replicas={len(serving) + 1}")
    wait_status(cluster, "EmbeddingSearch", "news", "default",
                lambda r: (r.get("status") or {}).get("readyReplicas") == len(serving) + 1,
                f"{len(serving) + 1} ready replicas", timeout=600)
    after = {p["metadata"]["uid"]: [c["restartCount"] for c in p["status"]["containerStatuses"]]
             for p in news_pods(cluster)}
    assert {uid: after.get(uid) for uid in serving} == serving
    assert len(after) == len(serving) + 1
    deployment = cluster.get_json("deployment", "news-triton", "-n", "default")
    assert deployment["spec"]["template"] == template
    assert not node.errors, node.errors


def test_quickstart_node_runs_pre_stop_then_kills_after_the_grace_period(cluster, node):
    """A deleted pod: its preStop hook runs, then SIGTERM, and SIGKILL once the grace period
    is over for a process that ignores SIGTERM; then the pod object goes."""
    pod = plain_pod("stubborn", "trap '' TERM; touch /work/started; while true; do sleep 1; done",
                    terminationGracePeriodSeconds=3)
    pod["spec"]["containers"][0]["lifecycle"] = {
        "preStop": {"exec": {"command": ["sh", "-c", "echo hook > /work/pre-stop"]}}}
    cluster.apply(pod)
    wait_for(lambda: ready(cluster.get_json("pod", "stubborn", "-n", "default")), 60,
             "the pod Ready")
    runner = node.pod("default", "stubborn").runner
    wait_for(lambda: (runner.volumes["work"] / "started").exists(), 30, "the command running")
    process = runner.container("main").process
    cluster.kubectl("delete", "pod", "stubborn", "-n", "default", "--timeout=60s")
    assert (runner.volumes["work"] / "pre-stop").read_text() == "hook\n"
    assert process.returncode == -9  # it ignored SIGTERM: killed at the end of the grace


def test_quickstart_node_fails_a_pod_it_cannot_honour_with_a_message(cluster, node):
    cluster.apply(plain_pod("host-network", "sleep 60", hostNetwork=True))
    pod = wait_for(lambda: (p := cluster.get_json("pod", "host-network", "-n", "default"))
                   ["status"].get("phase") == "Failed" and p, 60, "the pod Failed")
    assert "hostNetwork" in pod["status"]["message"]
    assert "not supported by the node agent" in pod["status"]["message"]
    cluster.kubectl("delete", "pod", "host-network", "-n", "default", "--timeout=60s")
