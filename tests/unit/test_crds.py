"""CRDs: generated from the spec models, structural, and as strict as the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.crd_schema import validation_errors
from tritonop.crd import KINDS, crd_files, custom_resource_definition
from tritonop.resources import ResourceError, parse_resource

ROOT = Path(__file__).resolve().parents[2]
API = "serving.tritonop.dev/v1alpha1"
CRDS = {kind: custom_resource_definition(kind) for kind in KINDS}


def test_checked_in_crds_match_the_spec_models():
    """crds/ is what `make crds` writes; regenerate it when this fails."""
    files = crd_files()
    checked_in = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")
                  if p.name != "kustomization.yaml"}  # hand-written, see test_deploy.py
    assert checked_in == files, "run `make crds` and commit crds/"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_is_a_valid_kubernetes_object(kind):
    kubernetes_validate.validate(CRDS[kind], "1.30", strict=True)


def schema_nodes(node: dict[str, Any], path: str = ""):
    """Every schema node: the root, and those under properties, items, additionalProperties."""
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from schema_nodes(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from schema_nodes(node[key], f"{path}[{key}]")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural(kind):
    schema = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in schema_nodes(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"), f"{path} has no type"


def test_names_columns_and_subresources():
    version = CRDS["EmbeddingSearch"]["spec"]["versions"][0]
    names = CRDS["EmbeddingSearch"]["spec"]["names"]
    assert names["shortNames"] == ["esearch"] and names["categories"] == ["tritonop"]
    assert CRDS["LLMService"]["spec"]["names"]["shortNames"] == ["llm"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Ready", "Model", "Age"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    assert "status" in version["subresources"]


def load_examples() -> list[dict[str, Any]]:
    return [doc for path in sorted((ROOT / "examples").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("example", load_examples(), ids=lambda d: d["metadata"]["name"])
def test_examples_are_accepted_by_the_crd_schema(example):
    assert validation_errors(CRDS[example["kind"]], example) == []


def es(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "x"},
            "spec": {"corpus": {"source": "c.jsonl"}, **spec}}


def llm(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "LLMService", "metadata": {"name": "x"}, "spec": spec}


INVALID = [
    # (resource, what the API server says, what pydantic says)
    (es(model={"format": "tf"}), "'tf' is not one of ['torchscript', 'onnx']",
     "spec.model.format"),
    ({**es(), "spec": {}}, "'corpus' is a required property", "spec.corpus: Field required"),
    (es(replicas=-1), "-1 is less than the minimum of 0", "spec.replicas"),
    (es(stages={"encoder": {"maxBatchSize": 0}}), "0 is less than the minimum of 1",
     "spec.stages.encoder.maxBatchSize"),
    (es(cache={"size": "lots"}), "'lots' does not match", "spec.cache.size"),
    (es(shards=2), "Additional properties are not allowed ('shards' was unexpected)",
     "spec.shards: unknown field"),
    (es(search={"defaultTopK": 50, "maxTopK": 10}), ".spec.search: defaultTopK must be <= maxTopK",
     "spec.search: defaultTopK must be <= maxTopK"),
    (es(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
     ".spec.autoscaling: minReplicas must be <= maxReplicas",
     "spec.autoscaling: minReplicas must be <= maxReplicas"),
    (es(artifacts={"hostPath": {"path": "/a"}, "persistentVolumeClaim": {"claimName": "c"}}),
     ".spec.artifacts: set at most one of persistentVolumeClaim, hostPath, emptyDir",
     "spec.artifacts: set at most one of"),
    (es(artifacts={"emptyDir": {}, "prepare": "job"}),
     ".spec.artifacts: an emptyDir is per pod: it needs prepare: perPod",
     "spec.artifacts: an emptyDir is per pod"),
    (es(artifacts={"prepare": "none"}),
     ".spec.artifacts: prepare: none needs a prepared persistentVolumeClaim or hostPath",
     "spec.artifacts: prepare: none needs"),
    (llm(artifacts={"prepare": "job"}),
     ".spec: an LLMService's artifacts are prepared per pod",
     "spec: an LLMService's artifacts are prepared per pod"),
    (es(artifacts={"hostPath": {"path": "relative"}}), "'relative' does not match '^/'",
     "spec.artifacts.hostPath.path"),
    (es(corpus={"source": "corpus/../../../dev/zero"}),
     "'corpus/../../../dev/zero' does not match", "spec.corpus.source: must not contain '..'"),
    (llm(model={"dtype": "int4"}), "'int4' is not one of", "spec.model.dtype"),
    (llm(generation={"defaults": {"topP": 0}}), "0 is less than or equal to the minimum of 0",
     "spec.generation.defaults.topP"),
    (llm(generation={"defaults": {"maxTokens": 2000}}),
     ".spec.generation: defaults.maxTokens must be <= limits.maxTokens",
     "spec.generation: defaults.maxTokens must be <= limits.maxTokens"),
    (llm(model={"maxContextLength": 256}, generation={"defaults": {"maxTokens": 512}}),
     ".spec: generation.defaults.maxTokens must be < model.maxContextLength",
     "spec: generation.defaults.maxTokens must be < model.maxContextLength"),
    (llm(gpus=17), "17 is greater than the maximum of 16", "spec.gpus"),
    (llm(resources={"requests": {"cpu": "fast"}}), "'fast' does not match",
     "spec.resources.requests.cpu"),
    (es(resources={"limits": {"memory": "4 GB"}}), "'4 GB' does not match",
     "spec.resources.limits.memory"),
    (llm(model={"device": "cuda"}), ".spec: model.device: cuda needs gpus >= 1",
     "spec: model.device: cuda needs gpus >= 1"),
    (llm(model={"device": "cuda"}, gpus=0), ".spec: model.device: cuda needs gpus >= 1",
     "spec: model.device: cuda needs gpus >= 1 (a pod"),
    (es(model={"device": "gpu"}, resources={"limits": {"nvidia.com/gpu": 0}}),
     ".spec.resources: nvidia.com/gpu is set by the operator",
     "spec.resources: nvidia.com/gpu is set by the operator"),
    (llm(resources={"requests": {"cpu": "-1"}}), "'-1' does not match",
     "spec.resources.requests.cpu: '-1' is not a Kubernetes quantity"),
    (es(resources={"limits": {"cpus": 2}}), ".spec.resources: limits: a resource name is",
     "spec.resources: limits: a resource name is"),
    (llm(model={"source": "https://example.com/m.gguf"}),
     ".spec.model: sha256 is required with an https:// source",
     "spec.model: sha256 is required with an https:// source"),
    (es(model={"source": "http://example.com/m"}),
     ".spec.model: sha256 is required with an https:// source",
     "spec.model: sha256 is required"),
    (llm(model={"source": "https://example.com/m.gguf", "sha256": "ABC"}), "'ABC' does not match",
     "spec.model.sha256"),
    (es(model={"precision": "int8"}), ".spec.model: precision: int8 needs format: onnx",
     "spec.model: precision: int8 needs format: onnx"),
    (es(model={"precision": "int8", "format": "torchscript"}),
     ".spec.model: precision: int8 needs format: onnx",
     "spec.model: precision: int8 needs format: onnx (the int8 encoder"),
    (es(model={"precision": "float16", "format": "onnx"}), "'float16' is not one of",
     "spec.model.precision"),
]


@pytest.mark.parametrize(("resource", "server_says", "model_says"), INVALID,
                         ids=[case[2] for case in INVALID])
def test_invalid_resources_are_rejected_by_the_crd_and_the_model(resource, server_says,
                                                                 model_says):
    errors = validation_errors(CRDS[resource["kind"]], resource)
    assert any(server_says in error for error in errors), errors
    with pytest.raises(ResourceError, match=model_says.replace("(", r"\(").replace(")", r"\)")):
        parse_resource(resource)


def test_int8_precision_with_onnx_is_accepted_by_the_crd_and_the_model():
    resource = es(model={"precision": "int8", "format": "onnx"})
    assert validation_errors(CRDS["EmbeddingSearch"], resource) == []
    assert parse_resource(resource).spec.model.precision == "int8"
    assert parse_resource(es()).spec.model.precision == "float32"
