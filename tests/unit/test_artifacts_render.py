"""Job mode rendered: one prepare Job per artifacts version, Triton pods that only read."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.support.triton import API
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.render.kubernetes import (
    ARTIFACTS_LABEL,
    RESOURCE_FILE,
    artifacts_children,
    prepare_job,
    render_children,
)
from tritonop.resources import parse_resource

CORPUS = "/artifacts/corpus/news.jsonl"


def es(name: str = "news", **spec: Any):
    spec = {"corpus": {"source": CORPUS}, "artifacts": {"prepare": "job"}, **spec}
    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": name, "namespace": "ml"}, "spec": spec})


def kinds(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests}


def pod(resource) -> dict[str, Any]:
    return kinds(render_children(resource))["Deployment"]["spec"]["template"]["spec"]


def search_parameters(resource) -> dict[str, str]:
    config = kinds(render_children(resource))["ConfigMap"]["data"]
    text = config[f"{resource.name}_search__config.pbtxt"]
    lines = text.split("parameters")[1:]
    found = {}
    for block in lines:
        key = block.split('key: "')[1].split('"')[0]
        found[key] = block.split('string_value: "')[1].split('"')[0]
    return found


VARIANTS = {
    "operator-claim": es(),
    "claim-rwx": es(artifacts={"prepare": "job", "claim": {
        "accessMode": "ReadWriteMany", "storageClassName": "nfs", "size": "20Gi"}}),
    "user-claim": es(artifacts={"prepare": "job", "persistentVolumeClaim": {"claimName": "m"},
                                "subPath": "prod"}),
    "host-path": es(artifacts={"prepare": "job", "hostPath": {"path": "/data"}}),
}


@pytest.mark.parametrize("version", ["1.30", str(latest_version())])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_job_mode_manifests_pass_strict_validation(name, version):
    resource = VARIANTS[name]
    for manifest in [*artifacts_children(resource), *render_children(resource),
                     prepare_job(resource, cleanup=True)]:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_triton_pods_only_read_the_version_the_job_builds(name):
    resource = VARIANTS[name]
    spec = pod(resource)
    assert "initContainers" not in spec
    [triton] = [c for c in spec["containers"] if c["name"] == "triton"]
    [mount] = [m for m in triton["volumeMounts"] if m["name"] == "artifacts"]
    assert mount["readOnly"] is True
    job = kinds(artifacts_children(resource))["Job"]
    fingerprint = resource_fingerprint(resource)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--expect-fingerprint") + 1] == fingerprint
    parameters = search_parameters(resource)
    assert parameters["artifacts_fingerprint"] == fingerprint
    assert parameters["index_dir"] == f"/artifacts/news/{fingerprint}/index"
    job_volume = job["spec"]["template"]["spec"]["volumes"][0]
    assert job_volume == next(v for v in spec["volumes"] if v["name"] == "artifacts")


def test_the_job_is_restricted_bounded_and_collected():
    job = prepare_job(es())
    body = job["spec"]
    assert body["backoffLimit"] >= 1 and body["activeDeadlineSeconds"] > 0
    assert body["ttlSecondsAfterFinished"] > 0
    template = body["template"]["spec"]
    assert template["restartPolicy"] == "Never"
    assert template["automountServiceAccountToken"] is False
    assert template["securityContext"]["runAsNonRoot"] is True
    assert template["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = template["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    # The pod carries none of the Service's selector labels: it is no serving replica.
    assert "app.kubernetes.io/name" not in body["template"]["metadata"]["labels"]


def test_the_job_carries_the_resource_without_the_configmap():
    """The ConfigMap keeps describing what running pods serve until the version is done."""
    job = prepare_job(es(model={"pooling": "cls"}))
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    document = yaml.safe_load(env["TRITONOP_RESOURCE"])
    assert document["spec"]["model"]["pooling"] == "cls"
    assert all(v.get("configMap") is None for v in job["spec"]["template"]["spec"]["volumes"])
    config = kinds(render_children(es(model={"pooling": "cls"})))["ConfigMap"]
    assert yaml.safe_load(config["data"][RESOURCE_FILE]) == document


def test_one_job_per_version_whatever_the_replicas_or_batching():
    names = {prepare_job(r)["metadata"]["name"] for r in (
        es(), es(replicas=3), es(stages={"encoder": {"maxBatchSize": 8}}),
        es(cache={"enabled": True}))}
    assert len(names) == 1
    other = prepare_job(es(model={"pooling": "max"}))["metadata"]["name"]
    assert other not in names
    assert all(len(n) <= 63 for n in (*names, other))
    longest = es("n" * 47)
    assert len(prepare_job(longest)["metadata"]["name"]) <= 63


def test_a_read_write_once_claim_keeps_the_pods_on_one_node():
    resource = es(replicas=3)
    [claim] = [m for m in artifacts_children(resource) if m["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["name"] == "news-artifacts"
    job_pod = prepare_job(resource)["spec"]["template"]
    for spec, labels in ((pod(resource), kinds(render_children(resource))["Deployment"]
                          ["spec"]["template"]["metadata"]["labels"]),
                         (job_pod["spec"], job_pod["metadata"]["labels"])):
        [term] = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    rwx = VARIANTS["claim-rwx"]
    assert "affinity" not in pod(rwx)
    [claim] = [m for m in artifacts_children(rwx) if m["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] == "nfs"
    assert ARTIFACTS_LABEL not in kinds(render_children(rwx))["Deployment"]["spec"]["template"][
        "metadata"]["labels"]


def test_a_named_volume_gets_no_claim_of_the_operators():
    for name in ("user-claim", "host-path"):
        assert [m["kind"] for m in artifacts_children(VARIANTS[name])] == ["Job"]


def test_per_pod_mode_keeps_the_init_container_and_renders_no_job():
    resource = es(artifacts={"prepare": "perPod"})
    [init] = pod(resource)["initContainers"]
    assert init["args"][init["args"].index("--expect-fingerprint") + 1] == \
        resource_fingerprint(resource)
    assert artifacts_children(resource) == []


def test_cleanup_runs_the_same_command_keeping_only_its_version():
    cleanup = prepare_job(es(), cleanup=True)
    [container] = cleanup["spec"]["template"]["spec"]["containers"]
    assert container["args"][-1] == "--keep-only"
    assert cleanup["metadata"]["name"] != prepare_job(es())["metadata"]["name"]
