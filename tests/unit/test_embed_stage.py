"""``spec.stages.fuse``'s one model equals the tokenizer, encoder and pooling stages chained.

The reference for the chain itself is sentence-transformers (``encode_query``) on the same
tiny random-weight folder; the fused stage must answer exactly what the three stages
answer on the same batch, per request errors included.
"""

from __future__ import annotations

import numpy as np
import pytest

from tritonop.artifacts.export import export_model
from tritonop.artifacts.sources import inspect
from tritonop_backend.errors import RequestError
from tritonop_backend.stages import STAGES, EmbedStage, EncoderStage, PoolingStage, TokenizerStage

MAX_CHARACTERS = 400
# Requests of 1 to 3 texts of different lengths (one truncated), and one over the bound.
BATCH = [
    ["europe climate change storm"],
    ["Zürich, São Paulo and 北京", "The Quick Brown FOX", "a long text " * 30],
    ["x" * (MAX_CHARACTERS + 1)],
    ["library for parsing JSON", "text editor"],
]


def texts(group: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in group], dtype=object)


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def parameters(request, tiny_encoders, tmp_path_factory) -> dict[str, str]:
    model_dir = tmp_path_factory.mktemp(f"embed-{request.param}") / "model"
    export_model(inspect(str(tiny_encoders["bert"])), request.param, model_dir)
    return {"model_dir": str(model_dir), "max_sequence_length": "auto", "pooling": "auto",
            "max_input_characters": str(MAX_CHARACTERS), "query_prompt": "auto",
            "normalize": "auto", "threads": "1"}


def chained(parameters: dict[str, str], batch: list[dict]) -> list:
    """The three stages as the ensemble runs them, each over the requests still going."""
    tokens = TokenizerStage(parameters).run(batch)
    going = [i for i, t in enumerate(tokens) if not isinstance(t, RequestError)]
    hidden = EncoderStage(parameters).run([tokens[i] for i in going])
    pooled = PoolingStage(parameters).run([{**h, "attention_mask": tokens[i]["attention_mask"]}
                                           for i, h in zip(going, hidden, strict=True)])
    results = list(tokens)
    for i, p in zip(going, pooled, strict=True):
        results[i] = {"embedding": p["embedding"], "attention_mask": tokens[i]["attention_mask"]}
    return results


def test_embed_stage_equals_the_three_stages_chained(parameters, tiny_encoders):
    from sentence_transformers import SentenceTransformer

    batch = [{"text": texts(group)} for group in BATCH]
    fused = STAGES["embed"](parameters, "cpu").run(batch)
    expected = chained(parameters, batch)
    assert len(fused) == len(BATCH)
    refused = fused[2]
    assert isinstance(refused, RequestError) and refused.field == "text"
    assert str(refused) == str(expected[2])
    reference = SentenceTransformer(str(tiny_encoders["bert"]), device="cpu")
    for group, got, want in zip(BATCH, fused, expected, strict=True):
        if isinstance(want, RequestError):
            continue
        assert set(got) == {"embedding", "attention_mask"}
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
        np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=0, atol=1e-6)
        truth = reference.encode_query(group)
        cosine = np.sum(got["embedding"] * truth, axis=1) / (
            np.linalg.norm(got["embedding"], axis=1) * np.linalg.norm(truth, axis=1))
        assert np.all(cosine >= 0.9999), cosine


def test_a_batch_refused_whole_gives_each_request_its_error(parameters):
    long = {"text": texts(["y" * (MAX_CHARACTERS + 5)])}
    missing = {"text": None}
    results = EmbedStage(parameters).run([long, missing])
    assert [type(r) for r in results] == [RequestError, RequestError]
    assert "is required" in str(results[1])


def test_from_steps_runs_the_stages_it_is_given(parameters):
    batch = [{"text": texts(group)} for group in BATCH if len(group[0]) <= MAX_CHARACTERS]
    steps = TokenizerStage(parameters), EncoderStage(parameters), PoolingStage(parameters)
    given = EmbedStage.from_steps(*steps).run(batch)
    for got, want in zip(given, EmbedStage(parameters).run(batch), strict=True):
        np.testing.assert_array_equal(got["embedding"], want["embedding"])
