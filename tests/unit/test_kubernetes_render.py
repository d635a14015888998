"""Kubernetes manifests rendered for a resource: valid, secure, and what the spec asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from tests.support.triton import API
from tritonop.render.kubernetes import CONFIG_HASH_ANNOTATION, render_children
from tritonop.render.yamltext import dump_all
from tritonop.resources import load_resources, parse_resource

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
    "network-policy": resource(networkPolicy={"enabled": True, "from": [
        {"namespaceSelector": {"matchLabels": {"team": "search"}}}]}),
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


def restricted_problems(pod_spec: dict[str, Any]) -> list[str]:
    """Fields the Pod Security Standard "restricted" requires, that are missing."""
    problems = []
    pod_security = pod_spec.get("securityContext", {})
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        security = container.get("securityContext", {})
        name = container["name"]
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities are not dropped")
        if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            problems.append(f"{name}: may run as root")
        if not security.get("readOnlyRootFilesystem"):
            problems.append(f"{name}: root filesystem is writable")
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for volume in volumes.values():
        if "hostPath" in volume and volume["name"] != "artifacts":
            problems.append(f"unexpected hostPath volume {volume['name']}")
    return problems


@pytest.mark.parametrize("name", sorted(SPREAD))
def test_pods_meet_the_restricted_pod_security_standard(name):
    deployment = by_kind(render_children(SPREAD[name]))["Deployment"]
    assert restricted_problems(deployment["spec"]["template"]["spec"]) == []
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_triton_container_probes_ports_and_scrape_annotations():
    deployment = by_kind(render_children(SPREAD["defaults"]))["Deployment"]
    template = deployment["spec"]["template"]
    triton, _gateway = template["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    shm = {v["name"]: v for v in template["spec"]["volumes"]}["shm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    mounts = {m["mountPath"] for m in triton["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/models", "/artifacts"} <= mounts


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
        "ServiceAccount", "ConfigMap", "Service", "Deployment"}
    assert "PodDisruptionBudget" in by_kind(render_children(SPREAD["replicas-and-affinity"]))
    scaled = by_kind(render_children(SPREAD["autoscaling-queue-time"]))
    assert "replicas" not in scaled["Deployment"]["spec"], "the HPA owns the replica count"
    assert "PodDisruptionBudget" in scaled  # minReplicas 2
    metrics = scaled["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "tritonop_queue_time_microseconds"
    policy = by_kind(render_children(SPREAD["network-policy"]))["NetworkPolicy"]
    assert policy["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "search"}}}]


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
