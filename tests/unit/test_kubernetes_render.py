"""Kubernetes manifests rendered for a resource: valid, secure, and what the spec asks."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from tests.support.pod_security import baseline_violations, pod_spec_of, restricted_violations
from tests.support.triton import API
from tritonop.gateway.server import DRAIN_SECONDS, GRACEFUL_SHUTDOWN_SECONDS
from tritonop.render.kubernetes import (
    CONFIG_HASH_ANNOTATION,
    GATEWAY_GONE_SCRIPT,
    endpoints,
    prepare_job,
    render_children,
)
from tritonop.render.yamltext import dump_all
from tritonop.resources import load_resources, parse_resource
from tritonop.spec import EmbeddingSearchSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def resource(kind: str = "EmbeddingSearch", **spec: Any):
    if kind == "EmbeddingSearch":
        spec = {"corpus": {"source": "c.jsonl"}, **spec}
    return parse_resource({"apiVersion": API, "kind": kind,
                           "metadata": {"name": "r", "namespace": "ml"}, "spec": spec})


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in children}


SPREAD = {
    "defaults": resource(),
    "replicas-and-affinity": resource(
        replicas=3, nodeSelector={"pool": "cpu"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml",
                      "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        resources={"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "6Gi"}}),
    "autoscaling-queue-time": resource(autoscaling={"minReplicas": 2, "maxReplicas": 8,
                                                    "targetQueueTimeMicroseconds": 20000}),
    "network-policy": resource(networkPolicy={"from": [
        {"namespaceSelector": {"matchLabels": {"team": "search"}}}], "metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"name": "prometheus"}}}]}),
    "triton-exposed": resource(api={"triton": {"expose": True, "adminSecretName": "adm"}}),
    "triton-only": resource("LLMService", api={
        "openai": {"enabled": False}, "triton": {"expose": True, "adminSecretName": "adm"}}),
    "pvc-no-prepare": resource(artifacts={"persistentVolumeClaim": {"claimName": "models"},
                                          "subPath": "prod", "prepare": False}),
    "host-path": resource(artifacts={"hostPath": {"path": "/artifacts"}}),
    "cache-gpu": resource(cache={"enabled": True, "size": "1Gi"}, model={"device": "gpu"}),
    "llm-gpu": resource("LLMService", gpus=2, model={"dtype": "bfloat16"},
                        image="registry.local/triton:custom"),
    "llm-cpu": resource("LLMService"),
}


@pytest.mark.parametrize("version", ["1.30", str(latest_version())])
@pytest.mark.parametrize("name", sorted(SPREAD))
def test_every_manifest_passes_strict_validation(name, version):
    for manifest in render_children(SPREAD[name]):
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_match_their_golden_manifests(example):
    """tests/golden/ is what `make render` writes; review the diff and regenerate."""
    rendered = dump_all(m for r in load_resources(example) for m in render_children(r))
    golden = ROOT / "tests" / "golden" / f"{example.stem}.yaml"
    assert rendered == golden.read_text(), f"run `make render` and review {golden}"
    for manifest in render_children(load_resources(example)[0]):
        kubernetes_validate.validate(manifest, "1.30", strict=True)


def rendered_pods(resource) -> dict[str, dict[str, Any]]:
    """Every pod spec the operator may create for ``resource``, by what creates it.

    The Deployment's (with the prepare init container where artifacts are prepared per
    pod) and, for an EmbeddingSearch, those of ``prepare: job`` as the operator renders it
    where the cluster has a default StorageClass: the prepare and clean-up Jobs' and the
    Deployment's then.
    """
    pods = {"Deployment": by_kind(render_children(resource))["Deployment"]}
    if isinstance(resource.spec, EmbeddingSearchSpec):
        job = replace(resource, spec=resource.spec.model_copy(update={
            "artifacts": resource.spec.artifacts.model_copy(update={"prepare": "job"})}))
        pods.update({"Deployment (prepare: job)": by_kind(render_children(job))["Deployment"],
                     "prepare Job": prepare_job(job),
                     "clean-up Job": prepare_job(job, cleanup=True)})
    return {what: pod_spec_of(manifest) for what, manifest in pods.items()}


EXAMPLE_RESOURCES = {r.name: r for path in EXAMPLES for r in load_resources(path)}
NOT_HOST_PATH = {**EXAMPLE_RESOURCES, **{k: v for k, v in SPREAD.items() if k != "host-path"}}


@pytest.mark.parametrize("name", sorted(NOT_HOST_PATH))
def test_every_pod_meets_the_restricted_pod_security_standard(name):
    """No exemption: the examples and every spread case but a host path, every pod."""
    pods = rendered_pods(NOT_HOST_PATH[name])
    assert {what: restricted_violations(pod) for what, pod in pods.items()} == {
        what: [] for what in pods}
    assert all(pod["automountServiceAccountToken"] is False for pod in pods.values())


def test_per_pod_preparation_runs_in_a_restricted_init_container():
    pod = rendered_pods(EXAMPLE_RESOURCES["news"])["Deployment"]
    assert [c["name"] for c in pod["initContainers"]] == ["prepare"]


def test_host_path_pods_do_not_meet_even_baseline():
    """Allowed by the operator's configuration, such pods need a privileged namespace."""
    pods = rendered_pods(SPREAD["host-path"])
    assert len(pods) == 4
    for what, pod in pods.items():
        assert any("hostPath" in problem for problem in baseline_violations(pod)), what


def test_a_host_path_the_pods_write_to_is_given_to_their_user_first():
    """The kubelet makes a DirectoryOrCreate folder as root 0755 and applies no fsGroup to
    it: one init container, root with CHOWN only, hands it to uid 1000 before prepare."""
    pods = rendered_pods(SPREAD["host-path"])
    writers = {what: pod for what, pod in pods.items()
               if any(m["name"] == "artifacts" and not m.get("readOnly")
                      for c in [*pod.get("initContainers", []), *pod["containers"]]
                      if c["name"] != "artifacts-owner" for m in c["volumeMounts"])}
    assert writers, "a host path that prepare writes to"
    for what, pod in writers.items():
        owner = pod["initContainers"][0]
        assert owner["name"] == "artifacts-owner", what
        assert owner["command"] == ["chown", "1000:1000", "/artifacts"]
        assert owner["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert owner["securityContext"]["allowPrivilegeEscalation"] is False
    for name, resource in NOT_HOST_PATH.items():
        for what, pod in rendered_pods(resource).items():
            assert all(c["name"] != "artifacts-owner" for c in pod.get("initContainers", [])), \
                (name, what)


def test_triton_container_probes_ports_and_scrape_annotations():
    deployment = by_kind(render_children(SPREAD["defaults"]))["Deployment"]
    template = deployment["spec"]["template"]
    triton, _gateway = template["spec"]["containers"]
    # HTTP and gRPC listen on loopback only: the kubelet (at the pod IP) probes metrics,
    # which Triton serves only once its models have loaded.
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    shm = {v["name"]: v for v in template["spec"]["volumes"]}["shm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    mounts = {m["mountPath"] for m in triton["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/models", "/artifacts"} <= mounts


def triton_pod(name: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(children by kind, containers by name) of a SPREAD case."""
    children = by_kind(render_children(SPREAD[name]))
    containers = children["Deployment"]["spec"]["template"]["spec"]["containers"]
    return children, {c["name"]: c for c in containers}


def ports(service: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["port"] for p in service["spec"]["ports"]}


def test_by_default_triton_listens_on_the_pods_loopback_and_the_service_has_no_triton_port():
    children, containers = triton_pod("defaults")
    args = containers["triton"]["args"]
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
            "--metrics-address=0.0.0.0"} <= set(args)
    assert not [a for a in args if "restricted" in a]
    assert {"--triton", "127.0.0.1:8001", "--triton-http", "127.0.0.1:8000"} <= set(
        containers["gateway"]["args"])
    assert "TRITONOP_TRITON_ADMIN_KEY" not in str(containers["triton"]["env"])
    assert ports(children["Service"]) == {"metrics": 8002, "openai": 8080}
    assert endpoints(SPREAD["defaults"]) == {"openai": "http://r.ml.svc:8080/v1",
                                             "metrics": "http://r.ml.svc:8002/metrics"}


def test_triton_stops_after_the_gateway_within_the_grace_period():
    """Triton's preStop waits for the gateway's port (the gateway has none: it drains on
    SIGTERM); the gateway's drain and its graceful shutdown fit in that wait; a pod with
    no gateway keeps no hook."""
    _, containers = triton_pod("defaults")
    pod = by_kind(render_children(SPREAD["defaults"]))["Deployment"]["spec"]["template"]["spec"]
    command = containers["triton"]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:3] == ["python3", "-c", GATEWAY_GONE_SCRIPT] and command[3] == "8080"
    wait = float(command[4])
    assert DRAIN_SECONDS + GRACEFUL_SHUTDOWN_SECONDS < wait
    assert wait + 10 <= pod["terminationGracePeriodSeconds"]  # time left for Triton's stop
    assert "lifecycle" not in containers["gateway"]
    _, alone = triton_pod("triton-only")
    assert "lifecycle" not in alone["triton"]


def _wait_for_port(port: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", GATEWAY_GONE_SCRIPT, str(port),
                             str(seconds)])


def test_the_pre_stop_script_waits_while_the_port_listens_or_holds_a_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    waiting = _wait_for_port(port, 600)
    try:
        listener.close()  # no longer accepting, but a request is still being answered
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(1)
        accepted.close()  # the gateway gone: its side of the connection is closed
        assert waiting.wait(30) == 0
    finally:
        waiting.kill()
        client.close()
    # It is bounded: a port that never frees is given up on after the given seconds.
    with socket.create_server(("127.0.0.1", 0)) as busy:
        assert _wait_for_port(busy.getsockname()[1], 0.5).wait(30) == 0


RESTRICTED = ("model-repository,model-config,shared-memory,statistics,trace,logging:"
              "triton-admin-key=$(TRITONOP_TRITON_ADMIN_KEY)")


@pytest.mark.parametrize("name", ["triton-exposed", "triton-only"])
def test_exposed_triton_restricts_its_control_apis_with_the_key_from_the_secret(name):
    children, containers = triton_pod(name)
    triton = containers["triton"]
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0",
            f"--http-restricted-api={RESTRICTED}",
            f"--grpc-restricted-protocol={RESTRICTED}"} <= set(triton["args"])
    # The kubelet expands $(TRITONOP_TRITON_ADMIN_KEY) from the Secret: no key in the spec.
    assert {"name": "TRITONOP_TRITON_ADMIN_KEY", "valueFrom": {"secretKeyRef": {
        "name": "adm", "key": "admin-key"}}} in triton["env"]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    gateway = {"openai": 8080} if name == "triton-exposed" else {}
    assert ports(children["Service"]) == {"http": 8000, "grpc": 8001, "metrics": 8002,
                                          **gateway}
    assert set(containers) == {"triton", *(["gateway"] if gateway else [])}
    assert set(endpoints(SPREAD[name])) == {"http", "grpc", "metrics",
                                            *(["openai"] if gateway else [])}
    assert endpoints(SPREAD[name])["grpc"] == "r.ml.svc:8001"


MONITORING = [{"namespaceSelector": {"matchLabels": {"serving.tritonop.dev/monitoring": "true"}}}]


@pytest.mark.parametrize(("name", "peers", "serving", "metrics_peers"), [
    ("defaults", [{"podSelector": {}}], [8080], MONITORING),
    ("triton-exposed", [{"podSelector": {}}], [8000, 8001, 8080], MONITORING),
    ("triton-only", [{"podSelector": {}}], [8000, 8001], MONITORING),
    ("network-policy", [{"namespaceSelector": {"matchLabels": {"team": "search"}}}], [8080],
     [{"namespaceSelector": {"matchLabels": {"name": "prometheus"}}}]),
])
def test_network_policy_admits_serving_ports_from_peers_and_metrics_from_monitoring(
        name, peers, serving, metrics_peers):
    policy = by_kind(render_children(SPREAD[name]))["NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [
        {"from": peers, "ports": [{"protocol": "TCP", "port": port} for port in serving]},
        {"from": metrics_peers, "ports": [{"protocol": "TCP", "port": 8002}]}]


def test_an_empty_metrics_from_admits_no_one_to_metrics_rather_than_everyone():
    policy = by_kind(render_children(resource(networkPolicy={"metricsFrom": []})))[
        "NetworkPolicy"]
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}]


def test_gpu_llm_requests_gpus_and_uses_the_image_given():
    children = by_kind(render_children(SPREAD["llm-gpu"]))
    triton = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert triton["image"] == "registry.local/triton:custom"
    assert "KIND_GPU" in children["ConfigMap"]["data"]["r__config.pbtxt"]
    cpu = by_kind(render_children(SPREAD["llm-cpu"]))["Deployment"]
    assert "nvidia.com/gpu" not in str(cpu)


def test_scheduling_fields_and_resources_pass_through():
    pod = by_kind(render_children(SPREAD["replicas-and-affinity"]))["Deployment"]["spec"][
        "template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "6Gi"}}


def test_optional_children_appear_only_when_asked_for():
    assert set(by_kind(render_children(SPREAD["defaults"]))) == {
        "ServiceAccount", "ConfigMap", "Service", "Deployment", "NetworkPolicy"}
    assert "NetworkPolicy" not in by_kind(render_children(resource(
        networkPolicy={"enabled": False})))
    assert "PodDisruptionBudget" in by_kind(render_children(SPREAD["replicas-and-affinity"]))
    scaled = by_kind(render_children(SPREAD["autoscaling-queue-time"]))
    assert "replicas" not in scaled["Deployment"]["spec"], "the HPA owns the replica count"
    assert "PodDisruptionBudget" in scaled  # minReplicas 2
    metrics = scaled["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "tritonop_queue_time_microseconds"


def test_artifact_volumes():
    def pod(name: str) -> dict[str, Any]:
        return by_kind(render_children(SPREAD[name]))["Deployment"]["spec"]["template"]["spec"]

    volumes = {v["name"]: v for v in pod("pvc-no-prepare")["volumes"]}
    assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "models"}
    assert "initContainers" not in pod("pvc-no-prepare")
    mount = {m["name"]: m for m in pod("pvc-no-prepare")["containers"][0]["volumeMounts"]}
    assert mount["artifacts"]["subPath"] == "prod" and mount["artifacts"]["readOnly"]
    assert {v["name"]: v for v in pod("host-path")["volumes"]}["artifacts"]["hostPath"][
        "path"] == "/artifacts"
    [prepare] = pod("defaults")["initContainers"]
    assert prepare["command"] == ["tritonop"] and prepare["args"][0] == "prepare"


def test_config_hash_follows_the_model_repository_not_the_replica_count():
    def config_hash(r) -> str:
        deployment = by_kind(render_children(r))["Deployment"]
        return deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]

    base = config_hash(resource())
    assert config_hash(resource()) == base
    assert config_hash(resource(replicas=4)) == base
    assert config_hash(resource(stages={"encoder": {"maxBatchSize": 4}})) != base
    assert config_hash(resource(search={"maxTopK": 50})) != base


def test_cache_size_reaches_the_server_flags():
    triton = by_kind(render_children(SPREAD["cache-gpu"]))["Deployment"]["spec"]["template"][
        "spec"]["containers"][0]
    assert f"--cache-config=local,size={1 << 30}" in triton["args"]


def test_prepare_container_reads_back_the_resource_from_the_config_map():
    import yaml

    original = load_resources(ROOT / "examples" / "news-search.yaml")[0]
    config = by_kind(render_children(original))["ConfigMap"]
    again = parse_resource(yaml.safe_load(config["data"]["resource.yaml"]))
    assert (again.kind, again.name) == (original.kind, original.name)
    assert again.spec.model == original.spec.model and again.spec.corpus == original.spec.corpus
