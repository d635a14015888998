"""Search through Triton over HTTP generate, HTTP infer and gRPC equals brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from safetensors.numpy import load_file

from tritonop.render.repository import artifact_dirs

pytestmark = pytest.mark.triton

QUERIES = ["europe climate change storm", "text editor for programmers",
           "Zürich weather", "library for parsing JSON"]


@pytest.fixture(scope="module")
def corpus_matrix(triton) -> np.ndarray:
    index_dir = artifact_dirs(triton.resources["ts"], str(triton.artifacts_root))[1]
    return load_file(f"{index_dir}/embeddings.safetensors")["embeddings"]


def reference(triton, corpus_matrix, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the served query embedding against every corpus row, full sort."""
    _, body = triton.generate("ts_embedding", {"text": text})
    scores = corpus_matrix @ np.array(body["embedding"], dtype=np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def assert_same_ranking(ids, scores, expected_ids, expected_scores):
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    # Ids must match exactly except between near-equal scores, where float
    # summation order may legitimately swap neighbours.
    different = np.asarray(ids) != expected_ids
    if different.any():
        gaps = np.abs(np.diff(expected_scores))
        assert all(gaps[max(i - 1, 0)] < 1e-5 or gaps[min(i, len(gaps) - 1)] < 1e-5
                   for i in np.flatnonzero(different))


@pytest.mark.parametrize("text", QUERIES)
def test_generate_equals_brute_force(triton, corpus_matrix, text):
    status, body = triton.generate("ts", {"text": text, "num_results": 10})
    assert status == 200, body
    expected_ids, expected_scores = reference(triton, corpus_matrix, text, 10)
    assert_same_ranking(body["ids"], body["scores"], expected_ids, expected_scores)
    texts = triton.resources["ts"]
    assert len(body["texts"]) == 10 and texts is not None


def test_default_top_k_and_texts_belong_to_ids(triton, corpus):
    import json

    corpus_texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    status, body = triton.generate("ts", {"text": "python web framework"})
    assert status == 200
    assert len(body["ids"]) == 10  # spec default
    assert body["texts"] == [corpus_texts[i] for i in body["ids"]]


def infer_inputs(module, texts: list[str], k: int):
    text = module.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    num = module.InferInput("num_results", [len(texts), 1], "INT32")
    num.set_data_from_numpy(np.full((len(texts), 1), k, dtype=np.int32))
    return [text, num]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batched_infer_equals_brute_force(triton, corpus_matrix, protocol):
    if protocol == "http":
        client = httpclient.InferenceServerClient(triton.server.http_url)
        inputs = infer_inputs(httpclient, QUERIES, 5)
    else:
        client = grpcclient.InferenceServerClient(triton.server.grpc_url)
        inputs = infer_inputs(grpcclient, QUERIES, 5)
    result = client.infer("ts", inputs)
    ids, scores, texts = (result.as_numpy(n) for n in ("ids", "scores", "texts"))
    assert ids.shape == scores.shape == texts.shape == (len(QUERIES), 5)
    for row, text in enumerate(QUERIES):
        assert_same_ranking(ids[row], scores[row], *reference(triton, corpus_matrix, text, 5))


def test_num_results_beyond_corpus_returns_whole_corpus_ranked(triton):
    status, body = triton.generate("tiny", {"text": "storm over europe", "num_results": 50})
    assert status == 200, body
    assert sorted(body["ids"]) == list(range(12))
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert body["texts"][0] == "severe storm warning for northern europe"


@pytest.mark.parametrize("model", ["ox", "mx"])
def test_other_encoders_and_pooling_search_their_own_index(triton, model):
    status, body = triton.generate(model, {"text": "Zürich weather: storms over the Alps",
                                           "num_results": 1})
    assert status == 200, body
    assert body["texts"] == "Zürich weather: storms over the Alps"  # a corpus text finds itself
    assert body["scores"] == pytest.approx(1.0, abs=1e-4)


def test_a_screened_index_equals_brute_force(triton):
    """``big``'s 4,500 vectors go through the int8 screen; its answers are the scan's."""
    from tritonop_backend.search import SCREEN_ROWS

    index_dir = artifact_dirs(triton.resources["big"], str(triton.artifacts_root))[1]
    matrix = load_file(f"{index_dir}/embeddings.safetensors")["embeddings"]
    assert len(matrix) == 4500 >= SCREEN_ROWS
    log = triton.server.log_path.read_text(errors="replace")
    assert "big_search: exact index of 4500 vectors (scan: int8 screen, then float32" in log
    for text in QUERIES:
        status, body = triton.generate("big", {"text": text, "num_results": 10})
        assert status == 200, body
        _, embedded = triton.generate("big_embedding", {"text": text})
        scores = matrix @ np.array(embedded["embedding"], dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:10]
        assert_same_ranking(body["ids"], body["scores"], order, scores[order])
