"""Embeddings served by Triton equal independent references."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.triton import served_embeddings

pytestmark = pytest.mark.triton

QUERIES = [
    "europe climate change storm",
    "Zürich, São Paulo и 北京: non-ASCII queries work",
    "a text longer than the maximum length " * 80,  # ~560 tokens: truncated to 256
]


@pytest.fixture(scope="module")
def sentence_transformer(source_model):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(source_model.directory), device="cpu")


@pytest.mark.parametrize("model", ["ts", "ox"])
def test_embeddings_match_sentence_transformers(triton, sentence_transformer, model):
    expected = sentence_transformer.encode(QUERIES, normalize_embeddings=True)
    actual = served_embeddings(triton, model, QUERIES)
    cosine = np.sum(expected * actual, axis=1) / np.linalg.norm(actual, axis=1)
    assert np.all(cosine >= 0.9999), cosine
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


def test_max_pooling_matches_numpy_reference(triton, source_model):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source_model.directory))
    model = AutoModel.from_pretrained(str(source_model.directory)).eval()
    batch = tokenizer(QUERIES, padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy().astype(bool)[:, :, None]
    expected = np.where(mask, hidden, -np.inf).max(axis=1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    actual = served_embeddings(triton, "mx", QUERIES)
    assert np.all(np.sum(expected * actual, axis=1) >= 0.9999)
