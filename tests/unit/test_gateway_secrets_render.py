"""API keys and TLS as the operator renders them: Secrets mounted into the gateway
container only, read-only and group-readable, the gateway's arguments and probes pointing
at them, and the ConfigMap carrying paths and limits but no key."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.support.pod_security import pod_spec_of, restricted_violations
from tests.support.triton import API
from tritonop.gateway.config import GatewayConfig
from tritonop.render.kubernetes import render_children
from tritonop.resources import parse_resource

AUTH = {"secretName": "chat-keys", "protectMetrics": True,
        "limits": {"requestsPerMinute": 600, "maxInFlightShare": 0.5},
        "keys": {"batch": {"tokensPerMinute": 200000}}}
TLS = {"secretName": "chat-tls"}


def resource(kind: str = "LLMService", **api: Any):
    spec: dict[str, Any] = {"api": api}
    if kind == "EmbeddingSearch":
        spec["corpus"] = {"source": "c.jsonl"}
    return parse_resource({"apiVersion": API, "kind": kind,
                           "metadata": {"name": "chat", "namespace": "ml"}, "spec": spec})


def children(r) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in render_children(r)}


def pod(r) -> dict[str, Any]:
    return pod_spec_of(children(r)["Deployment"])


def container(r, name: str) -> dict[str, Any]:
    return next(c for c in pod(r)["containers"] if c["name"] == name)


def mounts(r, name: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(r, name)["volumeMounts"]}


def option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("kind", ["LLMService", "EmbeddingSearch"])
def test_the_keys_secret_is_mounted_read_only_into_the_gateway_alone(kind):
    r = resource(kind, auth=AUTH)
    volumes = {v["name"]: v for v in pod(r)["volumes"]}
    assert volumes["api-keys"] == {"name": "api-keys", "secret": {
        "secretName": "chat-keys", "defaultMode": 0o440}}
    mount = mounts(r, "gateway")["api-keys"]
    assert mount == {"name": "api-keys", "mountPath": "/etc/tritonop/api-keys",
                     "readOnly": True}
    assert option(container(r, "gateway")["args"], "--api-keys") == mount["mountPath"]
    assert "api-keys" not in mounts(r, "triton")
    # The gateway runs as 1000 and reads the 0440 files through the pod's fsGroup.
    security = pod(r)["securityContext"]
    assert security["runAsUser"] == security["fsGroup"] == 1000


def test_the_config_map_names_the_keys_folder_and_limits_but_holds_no_key():
    r = resource(auth=AUTH)
    data = children(r)["ConfigMap"]["data"]
    config = GatewayConfig.from_json(data["gateway.json"])
    assert config.api_keys == "/etc/tritonop/api-keys" and config.protect_metrics
    entry = config.models["chat"]
    assert entry.client_limits.requests_per_minute == 600
    assert entry.client_limits.max_in_flight_share == 0.5
    assert entry.named_limits["batch"].tokens_per_minute == 200000
    # The keys reach the gateway as files only: never through the environment.
    assert all("secretKeyRef" not in str(c.get("env")) for c in pod(r)["containers"])


def test_tls_serves_https_from_the_tls_secret_and_probes_over_https():
    r = resource(tls=TLS)
    gateway = container(r, "gateway")
    assert mounts(r, "gateway")["tls"] == {"name": "tls", "mountPath": "/etc/tritonop/tls",
                                           "readOnly": True}
    assert {v["name"]: v for v in pod(r)["volumes"]}["tls"]["secret"] == {
        "secretName": "chat-tls", "defaultMode": 0o440}
    assert option(gateway["args"], "--tls-cert") == "/etc/tritonop/tls/tls.crt"
    assert option(gateway["args"], "--tls-key") == "/etc/tritonop/tls/tls.key"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["scheme"] == "HTTPS", probe


def test_without_auth_or_tls_nothing_changes_for_the_gateway():
    r = resource()
    gateway = container(r, "gateway")
    assert not {"--api-keys", "--tls-cert", "--tls-key"} & set(gateway["args"])
    assert "scheme" not in gateway["readinessProbe"]["httpGet"]
    assert not any("secret" in v for v in pod(r)["volumes"])
    assert GatewayConfig.from_json(children(r)["ConfigMap"]["data"]["gateway.json"]
                                   ).api_keys is None


def test_without_the_gateway_no_secret_is_mounted():
    r = resource(auth=AUTH, tls=TLS, openai={"enabled": False},
                 triton={"expose": True, "adminSecretName": "admin"})
    names = [c["name"] for c in pod(r)["containers"]]
    assert names == ["triton"]
    assert not {"api-keys", "tls"} & {v["name"] for v in pod(r)["volumes"]}


@pytest.mark.parametrize("kind", ["LLMService", "EmbeddingSearch"])
def test_with_keys_and_tls_the_manifests_stay_valid_and_restricted(kind):
    r = resource(kind, auth=AUTH, tls=TLS)
    for manifest in render_children(r):
        kubernetes_validate.validate(manifest, "1.30", strict=True)
    assert restricted_violations(pod(r)) == []
