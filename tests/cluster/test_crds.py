"""The CRDs on a real API server: accepted, defaulted, validated (CEL too), shown, scaled."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import NAMESPACE
from tests.cluster.helpers import EXAMPLES, PLURAL, get
from tests.support.cluster import ROOT, ControlPlane
from tests.unit.test_crds import INVALID

CRDS = {doc["spec"]["names"]["kind"]: doc for path in sorted((ROOT / "crds").glob("*.yaml"))
        if path.name != "kustomization.yaml" for doc in [yaml.safe_load(path.read_text())]}

# What kube-apiserver answers for each invalid resource of tests/unit/test_crds.py (keyed by
# the field the model names): OpenAPI checks, strict field validation, CEL rules.
SERVER_SAYS = {
    "spec.model.format": 'spec.model.format: Unsupported value: "tf": supported values: '
                         '"torchscript", "onnx"',
    "spec.corpus: Field required": "spec.corpus: Required value",
    "spec.replicas": "spec.replicas: Invalid value: -1: spec.replicas in body should be "
                     "greater than or equal to 0",
    "spec.stages.encoder.maxBatchSize": "spec.stages.encoder.maxBatchSize in body should be "
                                        "greater than or equal to 1",
    "spec.cache.size": 'spec.cache.size: Invalid value: "lots": spec.cache.size in body '
                       "should match",
    "spec.shards: unknown field": 'unknown field "spec.shards"',
    "spec.search: defaultTopK must be <= maxTopK":
        "spec.search: Invalid value: defaultTopK must be <= maxTopK",
    "spec.autoscaling: minReplicas must be <= maxReplicas":
        "spec.autoscaling: Invalid value: minReplicas must be <= maxReplicas",
    "spec.artifacts: set at most one of":
        "spec.artifacts: Invalid value: set at most one of persistentVolumeClaim, "
        "hostPath, emptyDir",
    "spec.artifacts: an emptyDir is per pod":
        "spec.artifacts: Invalid value: an emptyDir is per pod: it needs prepare: perPod",
    "spec.artifacts: prepare: none needs":
        "spec.artifacts: Invalid value: prepare: none needs a prepared persistentVolumeClaim "
        "or hostPath",
    "spec: an LLMService's artifacts are prepared per pod":
        "spec: Invalid value: an LLMService's artifacts are prepared per pod",
    "spec.artifacts.hostPath.path": 'spec.artifacts.hostPath.path: Invalid value: "relative": '
                                    "spec.artifacts.hostPath.path in body should match '^/'",
    "spec.corpus.source: must not contain '..'":
        'spec.corpus.source: Invalid value: "corpus/../../../dev/zero": spec.corpus.source in '
        "body should match '^([^/]?|",
    "spec.model.dtype": 'spec.model.dtype: Unsupported value: "int4"',
    "spec.generation.defaults.topP": "spec.generation.defaults.topP in body should be greater "
                                     "than 0",
    "spec.generation: defaults.maxTokens must be <= limits.maxTokens":
        "spec.generation: Invalid value: defaults.maxTokens must be <= "
        "limits.maxTokens",
    "spec: generation.defaults.maxTokens must be < model.maxContextLength":
        "spec: Invalid value: generation.defaults.maxTokens must be < "
        "model.maxContextLength",
    "spec.gpus": "spec.gpus: Invalid value: 17: spec.gpus in body should be less than or "
                 "equal to 16",
    "spec.resources.requests.cpu": 'spec.resources.requests.cpu: Invalid value: "fast": '
                                   "spec.resources.requests.cpu in body should match",
    "spec.resources.limits.memory": 'spec.resources.limits.memory: Invalid value: "4 GB": '
                                    "spec.resources.limits.memory in body should match",
    "spec: model.device: cuda needs gpus >= 1":
        "spec: Invalid value: model.device: cuda needs gpus >= 1",
    "spec: model.device: cuda needs gpus >= 1 (a pod":
        "spec: Invalid value: model.device: cuda needs gpus >= 1 (a pod",
    "spec.resources: nvidia.com/gpu is set by the operator":
        "spec.resources: Invalid value: nvidia.com/gpu is set by the operator",
    "spec.resources.requests.cpu: '-1' is not a Kubernetes quantity":
        'spec.resources.requests.cpu: Invalid value: "-1": spec.resources.requests.cpu in '
        "body should match",
    "spec.resources: limits: a resource name is":
        "spec.resources: Invalid value: limits: a resource name is cpu, memory",
    "spec.model: sha256 is required with an https:// source":
        "spec.model: Invalid value: sha256 is required with an https:// source",
    "spec.model: sha256 is required":
        "spec.model: Invalid value: sha256 is required with an https:// source",
    "spec.model.sha256": 'spec.model.sha256: Invalid value: "ABC": spec.model.sha256 in body '
                         "should match",
    "spec.model: precision: int8 needs format: onnx":
        "spec.model: Invalid value: precision: int8 needs format: onnx",
    "spec.model: precision: int8 needs format: onnx (the int8 encoder":
        "spec.model: Invalid value: precision: int8 needs format: onnx",
    "spec.model.precision": 'spec.model.precision: Unsupported value: "float16": supported '
                            'values: "float32", "int8"',
}


def test_every_invalid_case_has_a_server_message():
    assert sorted(SERVER_SAYS) == sorted(case[2] for case in INVALID)


def create(cluster: ControlPlane, resource: dict[str, Any]):
    return cluster.kubectl("create", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(resource),
                           check=False)


@pytest.mark.parametrize(("resource", "model_says"), [(c[0], c[2]) for c in INVALID],
                         ids=[c[2] for c in INVALID])
def test_invalid_resources_are_rejected_by_the_server(cluster, resource, model_says):
    resource = copy.deepcopy(resource)
    resource["metadata"]["name"] = "invalid"
    result = create(cluster, resource)
    assert result.returncode != 0, f"the server accepted {resource}"
    assert SERVER_SAYS[model_says] in result.stderr
    assert get(cluster, resource["kind"], "invalid", NAMESPACE) is None


def schema_defaults(schema: dict[str, Any], value: Any, path: str = "") -> dict[str, Any]:
    """Every default the schema declares under objects present in ``value``, by path.

    An independent reading of the CRD (structural defaulting applies a property's default
    when the property is missing and its parent object exists).
    """
    found: dict[str, Any] = {}
    if not isinstance(value, dict):
        return found
    for key, sub in (schema.get("properties") or {}).items():
        if key in value:
            found.update(schema_defaults(sub, value[key], f"{path}.{key}"))
        # The object's own default is applied first when it is missing; what it sets wins
        # over its fields' defaults (the resources here leave every defaulted object out).
        if "default" in sub:
            found.update(leaves(sub["default"], f"{path}.{key}"))
    return found


def leaves(value: Any, path: str) -> dict[str, Any]:
    """An object default as the scalar values it sets, by path (``{}`` sets nothing)."""
    if not isinstance(value, dict):
        return {path: value}
    return {leaf: v for key, sub in value.items()
            for leaf, v in leaves(sub, f"{path}.{key}").items()}


def lookup(obj: Any, path: str) -> Any:
    for key in path.strip(".").split("."):
        obj = obj[key]
    return obj


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_server_applies_the_crd_defaults(cluster, kind):
    minimal = {"EmbeddingSearch": {"corpus": {"source": "c.jsonl"}},
               "LLMService": {}}[kind]
    name = f"defaults-{kind.lower()}"
    resource = {"apiVersion": EXAMPLES[kind]["apiVersion"], "kind": kind,
                "metadata": {"name": name}, "spec": minimal}
    created = create(cluster, resource)
    assert created.returncode == 0, created.stderr
    try:
        stored = get(cluster, kind, name, NAMESPACE)
        assert stored is not None
        schema = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        expected = schema_defaults(schema["properties"]["spec"], stored["spec"], "")
        assert len(expected) >= 5, expected
        assert {path: lookup(stored["spec"], path) for path in expected} == expected
    finally:
        cluster.kubectl("delete", PLURAL[kind], name, "-n", NAMESPACE, "--wait=false")


def test_examples_are_accepted_by_the_server(cluster):
    """examples/ as a user applies them (server-side dry run: nothing is left behind)."""
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        result = cluster.kubectl("apply", "--dry-run=server", "-n", NAMESPACE, "-f", str(path))
        assert "(server dry run)" in result.stdout


def test_printer_columns_and_scale_subresource(cluster):
    """`kubectl get esearch` shows the CRD's columns; `kubectl scale` goes through /scale."""
    crd = CRDS["EmbeddingSearch"]
    columns = [c["name"].upper() for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert "esearch" in crd["spec"]["names"]["shortNames"]
    cluster.apply({**EXAMPLES["EmbeddingSearch"],
                   "metadata": {"name": "columns", "namespace": NAMESPACE}})
    try:
        header, row = cluster.kubectl("get", "esearch", "columns", "-n",
                                      NAMESPACE).stdout.splitlines()
        assert header.split() == ["NAME", *columns]
        assert row.split()[0] == "columns"
        assert EXAMPLES["EmbeddingSearch"]["spec"]["model"]["source"] in row.split()
        cluster.kubectl("scale", "esearch/columns", "-n", NAMESPACE, "--replicas=3")
        assert get(cluster, "EmbeddingSearch", "columns", NAMESPACE)["spec"]["replicas"] == 3
        scale = cluster.get_json("esearch", "columns", "-n", NAMESPACE, "--subresource=scale")
        assert (scale["kind"], scale["spec"]["replicas"]) == ("Scale", 3)
    finally:
        cluster.kubectl("delete", "esearch", "columns", "-n", NAMESPACE, "--wait=false")
