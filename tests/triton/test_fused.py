"""``stages.fuse`` served by Triton: ``oxf`` (tokenizer, ONNX encoder and pooling in one
model) answers as the three-model ensemble does, against sentence-transformers and numpy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file

from tests.support.triton import post_json, served_embeddings
from tests.triton.test_search import assert_same_ranking, infer_inputs
from tritonop.render.repository import artifact_dirs

pytestmark = pytest.mark.triton

QUERIES = [
    "europe climate change storm",
    "Zürich, São Paulo и 北京: non-ASCII queries work",
    "library for parsing JSON",
    "a text longer than the maximum length " * 80,  # ~560 tokens: truncated to 256
]


@pytest.fixture(scope="module")
def corpus_matrix(triton) -> np.ndarray:
    index_dir = artifact_dirs(triton.resources["oxf"], str(triton.artifacts_root))[1]
    return load_file(f"{index_dir}/embeddings.safetensors")["embeddings"]


def top_k(corpus_matrix: np.ndarray, embedding: np.ndarray, k: int):
    """Brute force: every corpus row scored against the query, full sort."""
    scores = corpus_matrix @ embedding.astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def inferences(triton, model: str) -> int:
    return int(triton.model_stats(model).get("inference_count", 0))


def test_only_the_fused_model_embeds(triton):
    _, index = post_json(f"{triton.http}/v2/repository/index", {"ready": True})
    names = {entry["name"] for entry in index}
    assert {"oxf", "oxf_embedding", "oxf_embed", "oxf_search"} <= names
    assert not {"oxf_tokenizer", "oxf_encoder", "oxf_pooling"} & names
    before = inferences(triton, "oxf_embed")
    served_embeddings(triton, "oxf", QUERIES[:2])
    assert triton.generate("oxf", {"text": QUERIES[0]})[0] == 200
    assert inferences(triton, "oxf_embed") == before + 3


def test_fused_embeddings_match_sentence_transformers(triton, source_model):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(source_model.directory), device="cpu")
    expected = reference.encode(QUERIES, normalize_embeddings=True)
    actual = served_embeddings(triton, "oxf", QUERIES)
    cosine = np.sum(expected * actual, axis=1) / np.linalg.norm(actual, axis=1)
    assert np.all(cosine >= 0.9999), cosine
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


def test_fused_attention_mask_counts_the_tokens(triton, source_model):
    """The gateway's usage is the mask's row sums: the tokenizer's own token count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source_model.directory))
    for text in (QUERIES[0], QUERIES[3]):
        status, body = triton.generate("oxf_embedding", {"text": text})
        assert status == 200, body
        tokens = len(tokenizer(text, truncation=True, max_length=256)["input_ids"])
        assert body["attention_mask"] == [1] * tokens


@pytest.mark.parametrize("text", QUERIES)
def test_fused_search_top10_equals_numpy(triton, corpus_matrix, text):
    status, body = triton.generate("oxf", {"text": text, "num_results": 10})
    assert status == 200, body
    (embedding,) = served_embeddings(triton, "oxf", [text])
    assert_same_ranking(body["ids"], body["scores"], *top_k(corpus_matrix, embedding, 10))


def test_fused_batched_and_concurrent_requests_equal_numpy(triton, corpus_matrix):
    """Several rows in one request, and requests batched together by the one model."""
    client = grpcclient.InferenceServerClient(triton.server.grpc_url)
    embeddings = served_embeddings(triton, "oxf", QUERIES)
    result = client.infer("oxf", infer_inputs(grpcclient, QUERIES, 5))
    ids, scores = result.as_numpy("ids"), result.as_numpy("scores")
    assert ids.shape == (len(QUERIES), 5)
    for row, embedding in enumerate(embeddings):
        assert_same_ranking(ids[row], scores[row], *top_k(corpus_matrix, embedding, 5))
    texts = [f"query number {i} about storms and climate" for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda t: triton.generate("oxf", {"text": t}), texts))
    for text, (status, body) in zip(texts, answers, strict=True):
        assert status == 200, body
        (embedding,) = served_embeddings(triton, "oxf", [text])
        assert_same_ranking(body["ids"], body["scores"], *top_k(corpus_matrix, embedding, 10))


@pytest.mark.parametrize("model", ["oxf", "oxf_embedding"])
def test_fused_text_over_the_bound_is_a_400_and_its_batch_mates_are_answered(triton, model):
    bodies = [{"text": "storm " * 6000}] + [{"text": "europe climate change storm"}] * 6
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: triton.generate(model, body), bodies))
    status, answer = answers[0]
    assert status == 400, answer
    assert "text: element 0 is 36000 characters long; at most 32768 are allowed" in (
        answer["error"])
    assert [status for status, _ in answers[1:]] == [200] * 6
