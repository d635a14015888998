"""``spec.stages.fuse``: one embed model in place of tokenizer, encoder and pooling."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tritonop.crd import model_schema
from tritonop.render.repository import render_repository
from tritonop.resources import parse_resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.stages import STAGES

ENCODER = {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 250, "maxQueueSize": 5,
           "instances": 2, "threads": 3}
# Everything that sits around the embedding steps: filters, hnsw, rerank, the cache.
AROUND = {"corpus": {"source": "c.jsonl", "fields": [{"name": "kind", "type": "string"}]},
          "search": {"index": "hnsw", "quantization": "int8", "defaultTopK": 3, "maxTopK": 7},
          "rerank": {"model": {"source": "hf://org/reranker"}},
          "cache": {"enabled": True},
          "model": {"format": "onnx", "normalize": False, "queryPrompt": "query: "},
          "api": {"limits": {"maxInputCharacters": 500}}}


def render(fuse: bool | None, **spec: Any) -> dict[str, model_config_pb2.ModelConfig]:
    stages = {**spec.pop("stages", {}), **({} if fuse is None else {"fuse": fuse})}
    body = {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "EmbeddingSearch",
            "metadata": {"name": "s"}, "spec": {"corpus": {"source": "c.jsonl"}, **spec,
                                                "stages": stages}}
    files = render_repository([parse_resource(body)])
    assert files["s_embed/1/model.py" if stages.get("fuse") else "s_tokenizer/1/model.py"] == \
        files["s_search/1/model.py"]  # the one generic pipeline adapter
    return {path.split("/")[0]: text_format.Parse(content.decode(),
                                                  model_config_pb2.ModelConfig())
            for path, content in files.items() if path.endswith("config.pbtxt")}


def signature(config: model_config_pb2.ModelConfig) -> dict[str, Any]:
    """What a client of a model sees: its inputs, outputs and batch size."""
    body = json_format.MessageToDict(config, preserving_proto_field_name=True)
    return {key: body.get(key) for key in ("input", "output", "max_batch_size")}


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_fuse_is_off_by_default_and_in_the_crd_schema():
    assert render(None) == render(False)
    assert "s_tokenizer" in render(None) and "s_embed" not in render(None)
    stages = model_schema(EmbeddingSearchSpec)["properties"]["stages"]["properties"]
    assert stages["fuse"]["type"] == "boolean" and stages["fuse"]["default"] is False


def test_fused_repository_has_one_embed_model_batched_as_the_encoder():
    models = render(True, stages={"encoder": ENCODER, "tokenizer": {"maxBatchSize": 4}},
                    model={"device": "gpu"})
    assert {n for n, c in models.items() if c.backend == "python"} == {"s_embed", "s_search"}
    embed = models["s_embed"]
    assert embed.max_batch_size == 16
    assert embed.dynamic_batching.max_queue_delay_microseconds == 250
    assert embed.dynamic_batching.default_queue_policy.max_queue_size == 5
    assert embed.instance_group[0].count == 2
    assert embed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert parameters(embed)["stage"] == "embed" and parameters(embed)["threads"] == "3"
    assert parameters(embed)["stage"] in STAGES
    # The unused tokenizer settings no longer bound a client's batch; the encoder's do.
    assert models["s"].max_batch_size == models["s_embedding"].max_batch_size == 16


def test_fused_ensembles_keep_what_clients_see():
    fused, split = render(True, **AROUND), render(False, **AROUND)
    for model in ("s", "s_embedding", "s_search", "s_rerank", "s_reranked"):
        assert signature(fused[model]) == signature(split[model]), model
    assert [step.model_name for step in fused["s"].ensemble_scheduling.step] == \
        ["s_embed", "s_search"]
    assert [step.model_name for step in fused["s_embedding"].ensemble_scheduling.step] == \
        ["s_embed"]
    assert fused["s"].response_cache.enable
    # The search, the reranker and the search re-scored by it are rendered as before.
    for model in ("s_search", "s_rerank", "s_reranked"):
        assert fused[model] == split[model], model
    assert set(fused) == {"s", "s_embedding", "s_embed", "s_search", "s_rerank", "s_reranked"}


def test_embed_model_gets_every_setting_the_three_steps_had():
    fused, split = render(True, **AROUND), render(False, **AROUND)
    merged = {**parameters(split["s_tokenizer"]), **parameters(split["s_encoder"]),
              **parameters(split["s_pooling"]), "stage": "embed"}
    assert parameters(fused["s_embed"]) == merged
    assert merged["query_prompt"] != "auto" and merged["normalize"] == "false"
    assert merged["max_input_characters"] == "500"


@pytest.mark.parametrize("fuse", [True, False])
def test_every_step_of_every_ensemble_is_rendered_with_its_tensors(fuse):
    """Each ensemble step names a rendered model and only tensors that model declares."""
    models = render(fuse, **AROUND)
    for config in models.values():
        for step in config.ensemble_scheduling.step:
            model = models[step.model_name]
            assert set(step.input_map) <= {t.name for t in model.input}
            assert set(step.output_map) <= {t.name for t in model.output}
