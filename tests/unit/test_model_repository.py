"""Rendering EmbeddingSearch resources into Triton model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tritonop.render.repository import render_repository, write_repository
from tritonop.resources import load_resources, parse_resource

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def configs(files: dict[str, bytes]) -> dict[str, model_config_pb2.ModelConfig]:
    parsed = {}
    for path, content in files.items():
        if path.endswith("config.pbtxt"):
            parsed[path.split("/")[0]] = text_format.Parse(content.decode(),
                                                           model_config_pb2.ModelConfig())
    return parsed


def search(spec: dict) -> dict[str, model_config_pb2.ModelConfig]:
    body = {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "EmbeddingSearch",
            "metadata": {"name": "s"}, "spec": {"corpus": {"source": "c.jsonl"}, **spec}}
    return configs(render_repository([parse_resource(body)]))


def test_checked_in_repository_matches_the_renderer(tmp_path):
    """model_repository/ is what `make render` writes; regenerate it when this fails."""
    resources = [r for path in EXAMPLES for r in load_resources(path)]
    write_repository(render_repository(resources), tmp_path)
    rendered = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    checked_in = {p.relative_to(ROOT / "model_repository")
                  for p in (ROOT / "model_repository").rglob("*")
                  if p.is_file() and p.name != "README.md"}
    assert rendered == checked_in, "run `make render` and commit model_repository/"
    for relative in rendered:
        assert (tmp_path / relative).read_bytes() == \
            (ROOT / "model_repository" / relative).read_bytes(), f"{relative} drifted"


def test_every_python_model_has_dynamic_batching_and_a_queue_bound():
    models = search({"stages": {
        "tokenizer": {"maxBatchSize": 8, "maxQueueSize": 3},
        "encoder": {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 250, "maxQueueSize": 5,
                    "instances": 2, "threads": 1},
    }})
    python_models = {name: c for name, c in models.items() if c.backend == "python"}
    assert set(python_models) == {"s_tokenizer", "s_encoder", "s_pooling", "s_search"}
    for config in python_models.values():
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    encoder = python_models["s_encoder"]
    assert encoder.max_batch_size == 16
    assert encoder.dynamic_batching.max_queue_delay_microseconds == 250
    assert encoder.dynamic_batching.default_queue_policy.max_queue_size == 5
    assert encoder.instance_group[0].count == 2
    assert encoder.parameters["threads"].string_value == "1"
    assert python_models["s_tokenizer"].dynamic_batching.default_queue_policy.max_queue_size == 3
    # A client batch must fit every step: the ensembles take the smallest.
    assert models["s"].max_batch_size == 8 and models["s_embedding"].max_batch_size == 8


def test_ensembles_chain_the_steps():
    models = search({})
    steps = [step.model_name for step in models["s"].ensemble_scheduling.step]
    assert steps == ["s_tokenizer", "s_encoder", "s_pooling", "s_search"]
    embedding_steps = [step.model_name for step in models["s_embedding"].ensemble_scheduling.step]
    assert embedding_steps == ["s_tokenizer", "s_encoder", "s_pooling"]
    assert [o.name for o in models["s"].output] == ["ids", "scores", "texts"]
    assert {i.name: i.optional for i in models["s"].input} == {"text": False,
                                                                "num_results": True,
                                                                "filter": True}


@pytest.mark.parametrize("enabled", [True, False])
def test_response_cache_switch(enabled):
    models = search({"cache": {"enabled": enabled}})
    assert models["s"].response_cache.enable is enabled
    assert not models["s_search"].response_cache.enable


def test_model_settings_reach_the_parameters():
    models = search({"model": {"pooling": "max", "maxSequenceLength": 64, "normalize": False,
                               "format": "onnx", "device": "gpu"},
                     "search": {"defaultTopK": 3, "maxTopK": 7}})
    search_params = {k: v.string_value for k, v in models["s_search"].parameters.items()}
    assert search_params["pooling"] == "max" and search_params["max_sequence_length"] == "64"
    assert (search_params["default_top_k"], search_params["max_top_k"]) == ("3", "7")
    version = search_params["artifacts_fingerprint"]
    assert search_params["index_dir"] == f"/artifacts/s/{version}/index"
    assert search_params["artifacts_dir"] == f"/artifacts/s/{version}"
    assert models["s_pooling"].parameters["normalize"].string_value == "false"
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert models["s_encoder"].instance_group[0].kind == gpu


def test_unset_model_settings_are_resolved_by_the_models():
    params = search({})["s_tokenizer"].parameters
    assert params["pooling"].string_value == "auto"
    assert params["max_sequence_length"].string_value == "auto"


@pytest.mark.parametrize(("limits", "expected"), [({}, "32768"),
                                                  ({"maxInputCharacters": 500}, "500")])
def test_the_character_bound_reaches_every_model_that_reads_client_text(limits, expected):
    """The tokenizer step (behind both ensembles) and the LLM check it before tokenizing."""
    api = {"api": {"limits": limits}}
    assert search(api)["s_tokenizer"].parameters["max_input_characters"].string_value == expected
    body = {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "chat"}, "spec": {"model": {"source": "/m"}, **api}}
    llm = configs(render_repository([parse_resource(body)]))["chat"]
    assert llm.parameters["max_input_characters"].string_value == expected


def test_write_repository_removes_stale_models_only(tmp_path):
    (tmp_path / "old_model").mkdir()
    (tmp_path / "old_model" / "config.pbtxt").write_text("name: 'old_model'")
    (tmp_path / "README.md").write_text("keep me")
    write_repository({"m/config.pbtxt": b"name: 'm'"}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "m"]


@pytest.mark.parametrize("graphs", [True, False])
def test_llm_engine_settings_reach_the_parameters(graphs):
    body = {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "chat"},
            "spec": {"model": {"source": "/models/mistral", "dtype": "bfloat16"},
                     "engine": {"maxSequences": 32, "maxWaiting": 5, "cudaGraphs": graphs}}}
    params = {k: v.string_value
              for k, v in configs(render_repository([parse_resource(body)]))["chat"]
              .parameters.items()}
    assert (params["max_sequences"], params["max_waiting"]) == ("32", "5")
    assert params["dtype"] == "bfloat16" and params["threads"] == "auto"
    assert params["cuda_graphs"] == ("true" if graphs else "false")
