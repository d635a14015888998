"""The README's "On Kubernetes" commands with the namespaced install, on a node whose pods
really run (the node agent of tests/cluster/agent.py, as in test_quickstart.py).

The cluster-wide install the session ran until now is taken away as an admin moving to the
namespaced one would (its operator Deployment, ClusterRole and ClusterRoleBinding; the CRDs
and the namespace stay), then `kubectl apply -k deploy/namespaced/`: the operator runs as
its pod under the Role alone and watches only tritonop-system, where both examples are
applied. Such an operator may not read StorageClasses, so news-search is prepared in its
pod (the per-pod default, into an emptyDir); the module then serves the same example from
a claim the user filled, and streams a chat completion. The tests run in order. At the end
the session's cluster-wide install is put back for the modules after this one.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from tests.cluster.agent import (
    SYSTEM,
    agent_node,
    assert_every_endpoint_answers,
    kubectl,
    news_pods,
    operator_pod,
    ready,
    ready_endpoints,
    record_figure,
    reference_top5,
)
from tests.cluster.helpers import get, wait_status
from tests.support.cluster import ROOT, ControlPlane, Operator, wait_for
from tests.support.node_agent import NodeAgent
from tests.support.podrunner import can_run_pods

REASON = can_run_pods()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

ACCOUNT = f"system:serviceaccount:{SYSTEM}:tritonop"
ELSEWHERE = "tritonop-test"  # a namespace of the cluster tier the namespaced operator must not see


def restore_cluster_install(cluster: ControlPlane) -> None:
    """The session's install again (conftest's ``install``): deploy/ applied, its operator
    Deployment at 0 (the host-run operator acts with its ServiceAccount and ClusterRole)."""
    cluster.kubectl("delete", "rolebinding,role", "tritonop", "-n", SYSTEM, "--ignore-not-found")
    cluster.kubectl("apply", "-k", str(ROOT / "deploy"))
    cluster.kubectl("scale", "deployment/tritonop", "-n", SYSTEM, "--replicas=0")


@pytest.fixture(scope="module")
def node(cluster: ControlPlane, operator: Operator, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeAgent]:
    try:
        with agent_node(cluster, operator, tmp_path_factory.mktemp("node")) as agent:
            yield agent
    finally:
        restore_cluster_install(cluster)


def can(cluster: ControlPlane, *question: str) -> bool:
    """`kubectl auth can-i ... --as=<the operator's ServiceAccount>`: yes or no."""
    result = cluster.kubectl("auth", "can-i", *question, f"--as={ACCOUNT}", check=False)
    assert result.stdout.strip() in ("yes", "no"), result
    return result.stdout.strip() == "yes"


def test_quickstart_namespaced_operator_runs_under_its_role(cluster, node):
    """`kubectl apply -k deploy/namespaced/` after `kubectl apply -k crds/`: the operator's
    pod runs on the node with --namespace=tritonop-system, its ServiceAccount may act in
    that namespace and nowhere else, and it reconciles a resource there and not elsewhere."""
    # The cluster-wide install goes; `kubectl apply` never removes what the new install
    # leaves out, and the ClusterRoleBindings left to the same ServiceAccount (tritonop,
    # tritonop-crd-observer) would keep its rights in every namespace.
    kubectl(cluster, "kubectl delete deployment tritonop -n tritonop-system --ignore-not-found")
    kubectl(cluster, "kubectl delete clusterrolebinding,clusterrole "
                     "-l app.kubernetes.io/part-of=tritonop")
    kubectl(cluster, "kubectl apply -k crds/")  # the cluster admin, once
    kubectl(cluster, "kubectl apply -k deploy/namespaced/")
    pod = wait_for(lambda: (p := operator_pod(cluster)) and ready(p) and p, 120,
                   "the namespaced operator's pod Ready")
    assert pod["spec"]["nodeName"] == node.name
    process = node.pod(SYSTEM, pod["metadata"]["name"]).runner.container("operator").process
    argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert f"--namespace={SYSTEM}".encode() in argv and b"--all-namespaces" not in argv, argv
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    assert b"TRITONOP_WATCH_CRDS=false" in environ
    assert not [e for e in environ if e.startswith(b"KUBECONFIG=")]
    assert not [b for b in cluster.get_json("clusterrolebindings")["items"]
                if any(s.get("name") == "tritonop" and s.get("namespace") == SYSTEM
                       for s in b.get("subjects") or [])]

    esearch = "embeddingsearches.serving.tritonop.dev"
    assert can(cluster, "list", esearch, "-n", SYSTEM)
    assert can(cluster, "patch", "deployments.apps", "-n", SYSTEM)
    assert can(cluster, "create", "jobs.batch", "-n", SYSTEM)
    assert not can(cluster, "list", esearch, "-n", ELSEWHERE)
    assert not can(cluster, "list", esearch, "--all-namespaces")
    assert not can(cluster, "create", "deployments.apps", "-n", "default")
    assert not can(cluster, "list", "storageclasses.storage.k8s.io")
    assert not can(cluster, "list", "customresourcedefinitions.apiextensions.k8s.io")

    probe = yaml.safe_load((ROOT / "examples" / "news-search.yaml").read_text())
    # No pod: only the operator's own work is looked at here.
    probe["spec"].update(replicas=0)
    elsewhere = {**probe, "metadata": {"name": "namespaced-probe", "namespace": ELSEWHERE}}
    mine = {**probe, "metadata": {"name": "namespaced-probe", "namespace": SYSTEM}}
    cluster.apply(elsewhere)  # first: had it been watched, it would be reconciled first
    cluster.apply(mine)
    done = wait_status(cluster, "EmbeddingSearch", "namespaced-probe", SYSTEM,
                       lambda r: (r.get("status") or {}).get("phase") == "Pending"
                       and (r.get("status") or {}).get("observedGeneration") == 1,
                       "reconciled by the namespaced operator", timeout=120)
    assert done["status"]["message"] == "scaled to zero replicas"
    assert get(cluster, "deployment", "namespaced-probe-triton", SYSTEM)
    other = get(cluster, "EmbeddingSearch", "namespaced-probe", ELSEWHERE)
    assert other is not None and not other.get("status")
    assert not other["metadata"].get("finalizers")
    assert get(cluster, "deployment", "namespaced-probe-triton", ELSEWHERE) is None
    for namespace in (SYSTEM, ELSEWHERE):
        cluster.kubectl("delete", "esearch", "namespaced-probe", "-n", namespace,
                        "--timeout=60s")
    assert not node.errors, node.errors
    pod = operator_pod(cluster)
    assert pod is not None and pod["status"]["containerStatuses"][0]["restartCount"] == 0


# A cold start embeds the 20K-text corpus, here in the Triton pod's prepare init container:
# ~2-4 minutes on two quiet cores, over 15 on a loaded machine (as test_quickstart.py).
@pytest.mark.timeout(2400)
def test_quickstart_namespaced_news_search_answers_cold(cluster, node,
                                                        record_testsuite_property):
    """`kubectl apply -f examples/news-search.yaml -n tritonop-system`: with no StorageClass
    to read, the pod prepares its artifacts (an init container, into an emptyDir), turns
    Ready and answers the seed's search at the Service's ready endpoints."""
    started, load = time.monotonic(), os.getloadavg()[0]
    kubectl(cluster, "kubectl apply -f examples/news-search.yaml -n tritonop-system")
    resource = wait_status(cluster, "EmbeddingSearch", "news", SYSTEM,
                           lambda r: (r.get("status") or {}).get("phase") == "Ready",
                           "Ready", timeout=2100)
    ids = assert_every_endpoint_answers(cluster, 1, SYSTEM)
    seconds = time.monotonic() - started
    record_figure(record_testsuite_property, "quickstart_namespaced_news_first_answer",
                  seconds, load)
    print(f"\nnamespaced: kubectl apply -f examples/news-search.yaml to the first answer: "
          f"{seconds:.0f} s")
    assert resource["status"]["readyReplicas"] == 1
    (pod,) = news_pods(cluster, SYSTEM)
    assert pod["spec"]["nodeName"] == node.name
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["prepare"]
    (artifacts,) = [v for v in pod["spec"]["volumes"] if v["name"] == "artifacts"]
    assert "emptyDir" in artifacts
    assert not cluster.get_json("jobs", "-n", SYSTEM)["items"]
    assert not cluster.get_json("pvc", "-n", SYSTEM)["items"]
    assert {c["name"]: c["ready"] for c in pod["status"]["containerStatuses"]} == {
        "triton": True, "gateway": True}
    assert ids == reference_top5(node, pod["metadata"]["name"], SYSTEM)
    listed = kubectl(cluster, "kubectl get esearch -n tritonop-system")
    assert listed.split("\n")[1].split()[:3] == ["news", "Ready", "1/1"], listed
    assert not node.errors, node.errors


def test_quickstart_namespaced_news_search_with_prepared_artifacts(cluster, node,
                                                                   record_testsuite_property):
    """The same example from a claim the user filled (`artifacts.persistentVolumeClaim`,
    `prepare: job`): the prepare Job finds the version complete and builds nothing, and
    the pod, with no prepare step, answers as the cold one did."""
    (cold,) = news_pods(cluster, SYSTEM)
    cold_ids = assert_every_endpoint_answers(cluster, 1, SYSTEM)
    prepared = node.pod(SYSTEM, cold["metadata"]["name"]).runner.volumes["artifacts"] / "news"
    (version,) = [p for p in prepared.iterdir() if (p / "version.json").exists()]
    # The user's claim, filled with the cold pod's artifacts as `kubectl cp` (or `tritonop
    # prepare --artifacts-root` on a machine that mounts the volume) would, as uid 1000.
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "news-prepared", "namespace": SYSTEM},
                   "spec": {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "2Gi"}}}})
    claim = wait_for(lambda: (c := cluster.get_json("pvc", "news-prepared", "-n", SYSTEM))
                     ["status"].get("phase") == "Bound" and c, 60, "the claim bound")
    folder = Path(cluster.get_json("pv", claim["spec"]["volumeName"])
                  ["spec"]["hostPath"]["path"])
    shutil.copytree(version, folder / "news" / version.name, symlinks=True)
    for root, dirs, files in os.walk(folder / "news"):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, 1000, 1000, follow_symlinks=False)
    manifest = (folder / "news" / version.name / "version.json").stat().st_ino
    cluster.kubectl("delete", "esearch", "news", "-n", SYSTEM, "--timeout=180s")
    wait_for(lambda: not news_pods(cluster, SYSTEM), 180, "the cold pod gone")

    news = yaml.safe_load((ROOT / "examples" / "news-search.yaml").read_text())
    news["metadata"]["namespace"] = SYSTEM
    news["spec"]["artifacts"] = {"persistentVolumeClaim": {"claimName": "news-prepared"},
                              "prepare": "job"}
    started, load = time.monotonic(), os.getloadavg()[0]
    cluster.apply(news)
    wait_status(cluster, "EmbeddingSearch", "news", SYSTEM,
                lambda r: (r.get("status") or {}).get("phase") == "Ready", "Ready",
                timeout=600)
    ids = assert_every_endpoint_answers(cluster, 1, SYSTEM)
    seconds = time.monotonic() - started
    record_figure(record_testsuite_property,
                  "quickstart_namespaced_news_prepared_first_answer", seconds, load)
    print(f"\nnamespaced: apply with prepared artifacts to the first answer: {seconds:.0f} s")
    assert ids == cold_ids
    jobs = cluster.get_json("jobs", "-n", SYSTEM)["items"]
    assert [j["status"].get("succeeded") for j in jobs] == [1], jobs
    # Found complete, not built again: the version's manifest is the file copied in.
    assert (folder / "news" / version.name / "version.json").stat().st_ino == manifest
    assert sorted(p.name for p in (folder / "news").iterdir()
                  if not p.name.startswith(".")) == [version.name]
    (pod,) = news_pods(cluster, SYSTEM)
    assert not pod["spec"].get("initContainers")
    (artifacts,) = [v for v in pod["spec"]["volumes"] if v["name"] == "artifacts"]
    assert artifacts["persistentVolumeClaim"]["claimName"] == "news-prepared"
    assert not node.errors, node.errors


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.timeout(1200)
def test_quickstart_namespaced_chat_streams(cluster, node):
    """`kubectl apply -f examples/chat.yaml -n tritonop-system`: the pod converts the GGUF
    model, turns Ready, and a chat completion streamed with the openai client through the
    Service's ready endpoint arrives in several chunks, ends with a finish reason, and
    reads as the same request answered whole (greedy)."""
    # The news pod goes first: two cores run one model's start at a time well enough.
    cluster.kubectl("delete", "esearch", "news", "-n", SYSTEM, "--timeout=180s")
    cluster.kubectl("delete", "pvc", "news-prepared", "-n", SYSTEM, "--timeout=60s")
    kubectl(cluster, "kubectl apply -f examples/chat.yaml -n tritonop-system")
    wait_status(cluster, "LLMService", "chat", SYSTEM,
                lambda r: (r.get("status") or {}).get("phase") == "Ready", "Ready",
                timeout=1100)
    (address,), port = wait_for(
        lambda: (found := ready_endpoints(cluster, SYSTEM, "chat")) and len(found[0]) == 1
        and found, 60, "the chat Service's ready endpoint")
    assert port == 8080
    client = OpenAI(base_url=f"http://{address}:{port}/v1", api_key="none", max_retries=0,
                    timeout=300)
    body = dict(model="chat", messages=QUESTION, max_tokens=32, temperature=0)
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, chunks
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and not any(finals[:-1]), finals
    assert finals[-1] == whole.choices[0].finish_reason
    assert "".join(pieces) == whole.choices[0].message.content
    assert "Paris" in whole.choices[0].message.content
    assert not node.errors, node.errors
