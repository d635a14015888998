"""The gateway in a cluster: a second container of the Triton pod, a named Service port,
let through by the NetworkPolicy, configured from the ConfigMap; off with
``spec.api.openai.enabled: false``."""

from __future__ import annotations

from typing import Any

from tests.support.pod_security import restricted_violations
from tests.support.triton import API
from tritonop.gateway.config import GatewayConfig
from tritonop.render.kubernetes import render_children
from tritonop.resources import parse_resource


def children(kind: str = "LLMService", **spec: Any) -> dict[str, dict[str, Any]]:
    body = {"apiVersion": API, "kind": kind, "metadata": {"name": "r", "namespace": "ns"},
            "spec": {"networkPolicy": {"enabled": True}, **spec}}
    if kind == "EmbeddingSearch":
        body["spec"]["corpus"] = {"source": "corpus.jsonl"}
    return {m["kind"]: m for m in render_children(parse_resource(body))}


def test_gateway_runs_beside_triton_with_its_own_probes_and_port():
    rendered = children(api={"maxInFlight": 3, "maxWaiting": 5})
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    triton, gateway = pod["containers"]
    assert gateway["name"] == "gateway" and triton["name"] == "triton"
    assert gateway["ports"] == [{"name": "openai", "containerPort": 8080, "protocol": "TCP"}]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "openai"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "openai"}
    assert gateway["args"][:3] == ["gateway", "--config", "/config/gateway.json"]
    # Triton's loopback by address: "localhost" may resolve to ::1, where it does not listen.
    assert {"127.0.0.1:8001", "127.0.0.1:8000"} <= set(gateway["args"])
    assert restricted_violations(pod) == []
    config = GatewayConfig.from_json(rendered["ConfigMap"]["data"]["gateway.json"])
    assert config.models["r"].admission.max_in_flight == 3
    assert config.models["r"].admission.max_waiting == 5
    volume = {v["name"]: v for v in pod["volumes"]}["model-repository"]
    assert {"key": "gateway.json", "path": "gateway.json"} in volume["configMap"]["items"]
    service_ports = {p["name"]: p["port"] for p in rendered["Service"]["spec"]["ports"]}
    assert service_ports["openai"] == 8080
    policy_ports = {p["port"] for p in rendered["NetworkPolicy"]["spec"]["ingress"][0]["ports"]}
    assert 8080 in policy_ports


def test_openai_disabled_renders_no_gateway():
    """Only with Triton exposed (nothing else would reach the models); its probes are then
    Triton's own health endpoints."""
    rendered = children("EmbeddingSearch", api={
        "openai": {"enabled": False}, "triton": {"expose": True, "adminSecretName": "adm"}})
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["triton"]
    assert pod["containers"][0]["readinessProbe"]["httpGet"] == {
        "path": "/v2/health/ready", "port": "http"}
    assert "gateway.json" not in rendered["ConfigMap"]["data"]
    assert "openai" not in {p["name"] for p in rendered["Service"]["spec"]["ports"]}
    policy_ports = {p["port"] for p in rendered["NetworkPolicy"]["spec"]["ingress"][0]["ports"]}
    assert 8080 not in policy_ports


def test_hpa_scales_on_gateway_requests_in_flight_or_leaves_scaling_to_keda():
    scaling = {"minReplicas": 2, "maxReplicas": 6, "targetRequestsInFlight": 12}
    rendered = children(autoscaling=scaling)
    metrics = rendered["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert {"type": "Pods", "pods": {
        "metric": {"name": "tritonop_gateway_requests_in_flight"},
        "target": {"type": "AverageValue", "averageValue": "12"}}} in metrics
    external = children(autoscaling={**scaling, "external": True})
    assert "HorizontalPodAutoscaler" not in external
    assert "replicas" not in external["Deployment"]["spec"]
    assert "PodDisruptionBudget" in external
