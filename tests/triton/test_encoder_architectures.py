"""Every encoder architecture, served by tritonserver from its folder, equals sentence-transformers.

The ``enc-<name>`` resources of the session server (conftest) were prepared from tiny
sentence-transformers folders, one per architecture. Queries are embedded as
``encode_query`` does (query prompt), the corpus as ``encode_document`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.encoders import TINY_ENCODERS, reference_documents
from tests.support.triton import TINY_TEXTS, served_embeddings
from tritonop.render.repository import artifact_dirs
from tritonop_backend.artifacts import ENCODER_FILES, INT8_ENCODER_FILE, ModelManifest

pytestmark = pytest.mark.triton

SPECS = {spec.name: spec for spec in TINY_ENCODERS}
QUERIES = [
    "europe climate change storm",
    "Zürich, São Paulo and 北京: non-ASCII queries work",
    "a python text editor",
    "a text longer than the tiny models' maximum length " * 12,  # truncated to 48 tokens
]


@pytest.fixture(scope="module")
def references(tiny_encoders):  # -> dict[str, SentenceTransformer]
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(str(path), device="cpu")
            for name, path in tiny_encoders.items()}


def served(triton, name: str) -> np.ndarray:
    return served_embeddings(triton, f"enc-{name}", QUERIES)


@pytest.mark.parametrize("name", list(SPECS))
def test_embeddings_equal_sentence_transformers(triton, references, name):
    actual = served(triton, name)
    expected = references[name].encode_query(QUERIES)
    cosine = np.sum(actual * expected, axis=1) / (
        np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))
    assert np.all(cosine >= 0.9999), cosine
    # Unit length exactly where the model has a Normalize module (xlmr has none).
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1),
                               np.linalg.norm(expected, axis=1), rtol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_search_top5_equals_brute_force_over_sentence_transformers(triton, references, name):
    model = references[name]
    documents = reference_documents(model, SPECS[name], TINY_TEXTS)
    scores = model.encode_query(QUERIES, normalize_embeddings=True) @ documents.T
    for text, row in zip(QUERIES, scores, strict=True):
        order = np.argsort(-row, kind="stable")
        status, body = triton.generate(f"enc-{name}", {"text": text, "num_results": 5})
        assert status == 200, body
        ids = body["ids"]
        # Rank by rank, the served scores are the reference's best five, and each served
        # id has, in the reference, the score served for it: the same ranking, where two
        # texts closer than the ~1e-6 between served and reference scores may swap (the
        # tiny tokenizers' training breaks ties differently from run to run, so such
        # near-ties come and go with the fixture).
        np.testing.assert_allclose(body["scores"], row[order[:5]], atol=1e-5)
        np.testing.assert_allclose(row[ids], body["scores"], atol=1e-5)
        assert len(set(ids)) == 5
        if row[order[4]] - row[order[5]] > 1e-5:  # the fifth place is decided
            assert set(ids) == set(order[:5].tolist())
        assert body["texts"] == [TINY_TEXTS[i] for i in ids]


def test_int8_encoder_is_served_close_to_sentence_transformers(triton, references):
    """``precision: int8``: the quantized file is what Triton serves, its embeddings stay
    within the cosine prepare measured and recorded, and they are not the float ones."""
    model_dir = Path(artifact_dirs(triton.resources["i8-bert"], str(triton.artifacts_root))[0])
    manifest = ModelManifest.read(model_dir)
    assert manifest.precision == "int8"
    assert (model_dir / INT8_ENCODER_FILE).is_file()
    assert not (model_dir / ENCODER_FILES["onnx"]).exists()
    assert manifest.quantization["cosine_texts"] == len(TINY_TEXTS)

    actual = served_embeddings(triton, "i8-bert", QUERIES)
    expected = references["bert"].encode_query(QUERIES, normalize_embeddings=True)
    cosine = np.sum(actual * expected, axis=1) / np.linalg.norm(actual, axis=1)
    assert np.all(cosine >= 0.98), cosine  # measured: 0.9993 and above on this model
    float_served = served(triton, "bert")
    assert np.abs(actual - float_served).max() > 1e-4  # int8 products, not float32 ones
