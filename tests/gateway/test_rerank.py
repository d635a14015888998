"""Reranking through a real tritonserver and the gateway, against sentence-transformers.

One server for the module: two EmbeddingSearch resources over the 12 tiny texts, each
with a tiny random BERT encoder and a tiny random cross-encoder made here and saved by
sentence-transformers' ``CrossEncoder``:

* ``rr``: TorchScript cross-encoder with CrossEncoder's default activation (sigmoid);
* ``rx``: ONNX cross-encoder saved with an Identity activation (raw logits).

The reference is ``CrossEncoder(folder).predict`` and, for a reranked search,
``SentenceTransformer(folder).encode`` with a numpy top-k, re-scored by ``predict``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.encoders import TINY_ENCODERS, make_cross_encoder, make_tiny_encoder
from tests.support.triton import (
    API,
    FILTER_FIELDS,
    FILTER_RECORDS,
    TINY_TEXTS,
    free_port,
    post_json,
    running_triton,
)
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import gateway_config
from tritonop.gateway.server import GatewayThread
from tritonop.resources import parse_resource

CANDIDATES = 6
MAX_DOCUMENTS = 20
MAX_CHARACTERS = 4000
QUERIES = ["storm warning in europe", "software for programmers", "music downtown"]
LONG_DOCUMENT = "the quick brown fox jumps over the lazy dog " * 60  # > 48 tokens, < bound
DOCUMENTS = [*TINY_TEXTS, LONG_DOCUMENT]
LONG_CORPUS = ["storm warning over the alps", "storm " + "x" * MAX_CHARACTERS, "music downtown"]


class Served:
    def __init__(self, url: str, triton: str, folders: dict[str, Path], encoder: Path) -> None:
        self.url, self.triton, self.folders, self.encoder = url, triton, folders, encoder

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return post_json(f"{self.url}/v1/{path}", body)

    def cross_encoder(self, name: str) -> Any:
        from sentence_transformers import CrossEncoder

        return CrossEncoder(str(self.folders[name]), device="cpu")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    models = tmp_path_factory.mktemp("rerank-models")
    encoder = make_tiny_encoder(TINY_ENCODERS[0], models / "encoder")
    folders = {
        "rr": make_cross_encoder(models / "ce-sigmoid", seed=1),
        "rx": make_cross_encoder(models / "ce-identity", seed=2,
                                 activation="torch.nn.modules.linear.Identity"),
    }
    # The 12 tiny texts as records with fields, so that searches can be filtered too.
    corpus = tmp_path_factory.mktemp("rerank-corpus") / "tiny.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in FILTER_RECORDS))
    fields = [{"name": n, "type": t} for n, t in FILTER_FIELDS.items()]
    # "rl": a corpus with a text longer than the character bound of requests.
    long_corpus = corpus.parent / "long.jsonl"
    long_corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in LONG_CORPUS))
    resources = [
        parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                        "metadata": {"name": name}, "spec": {
            "model": {"source": str(encoder)},
            "corpus": {"source": str(source), **({"fields": fields} if name != "rl" else {})},
            "search": {"defaultTopK": 3, "maxTopK": 12},
            "api": {"limits": {"maxInputCharacters": MAX_CHARACTERS}},
            "rerank": {"model": {"source": str(folders[model]), "format": fmt},
                       "candidates": CANDIDATES, "maxDocuments": MAX_DOCUMENTS}}})
        for name, model, fmt, source in (("rr", "rr", "torchscript", corpus),
                                         ("rx", "rx", "onnx", corpus),
                                         ("rl", "rr", "onnx", long_corpus))]
    root = tmp_path_factory.mktemp("rerank-artifacts")
    with running_triton(resources, root, tmp_path_factory.mktemp("rerank-triton")) as triton:
        address = TritonAddress(triton.server.grpc_url, triton.server.http_url)
        gateway = GatewayThread(gateway_config(resources), address, free_port()).start()
        try:
            yield Served(gateway.url, triton.http, folders, encoder)
        finally:
            gateway.stop()


def assert_same_ranking(indices: list[int], scores: list[float], reference: np.ndarray) -> None:
    """Scores equal the reference's rank by rank (1e-4), and each index has its score."""
    expected = sorted(reference.tolist(), reverse=True)[:len(scores)]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    np.testing.assert_allclose([reference[i] for i in indices], scores, atol=1e-4)
    gaps = np.diff(expected)
    for position in range(len(indices) - 1):  # clear gaps: the very order of the reference
        if abs(gaps[position]) > 1e-4:
            assert reference[indices[position]] > reference[indices[position + 1]]


@pytest.mark.parametrize("name", ["rr", "rx"])
@pytest.mark.parametrize("query", QUERIES)
def test_rerank_scores_equal_cross_encoder_predict(served, name, query) -> None:
    status, body = served.post("rerank", {"model": name, "query": query,
                                          "documents": DOCUMENTS})
    assert status == 200, body
    reference = served.cross_encoder(name).predict([(query, d) for d in DOCUMENTS])
    results = body["results"]
    assert len(results) == len(DOCUMENTS)  # no top_n: every document
    assert "document" not in results[0]  # return_documents defaults to false
    assert_same_ranking([r["index"] for r in results],
                        [r["relevance_score"] for r in results], reference)
    assert body["model"] == name
    assert body["usage"]["total_tokens"] > 0


def test_concurrent_requests_of_different_sizes_each_get_their_own_scores(served) -> None:
    """Requests that Triton may batch together (ragged: 1 to 13 documents each)."""
    from concurrent.futures import ThreadPoolExecutor

    asks = [(QUERIES[i % len(QUERIES)], DOCUMENTS[: 1 + (i * 5) % len(DOCUMENTS)])
            for i in range(12)]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: served.post("rerank", {
            "model": "rr", "query": ask[0], "documents": ask[1]}), asks))
    model = served.cross_encoder("rr")
    for (query, documents), (status, body) in zip(asks, answers, strict=True):
        assert status == 200, body
        reference = model.predict([(query, d) for d in documents])
        by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
        np.testing.assert_allclose([by_index[i] for i in range(len(documents))], reference,
                                   atol=1e-4)


def test_the_references_cover_both_activations(served) -> None:
    """``rr``'s reference applies CrossEncoder's default sigmoid, ``rx``'s the Identity it
    saved: the equality tests above hold the served scores to each."""
    assert type(served.cross_encoder("rr").activation_fn).__name__ == "Sigmoid"
    assert type(served.cross_encoder("rx").activation_fn).__name__ == "Identity"


def test_top_n_and_return_documents(served) -> None:
    documents = [{"text": d} for d in TINY_TEXTS[:5]]
    status, body = served.post("rerank", {"model": "rr", "query": QUERIES[0],
                                          "documents": documents, "top_n": 2,
                                          "return_documents": True})
    assert status == 200, body
    reference = served.cross_encoder("rr").predict([(QUERIES[0], d) for d in TINY_TEXTS[:5]])
    results = body["results"]
    assert len(results) == 2
    assert_same_ranking([r["index"] for r in results],
                        [r["relevance_score"] for r in results], reference)
    assert [r["document"]["text"] for r in results] == [TINY_TEXTS[r["index"]] for r in results]
    # top_n beyond the documents: all of them, as Cohere answers.
    status, body = served.post("rerank", {"model": "rr", "query": QUERIES[0],
                                          "documents": TINY_TEXTS[:3], "top_n": 10})
    assert status == 200, body
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2]


def test_long_document_is_truncated_not_refused(served) -> None:
    """A document beyond the model's 48 tokens scores as CrossEncoder's truncated pair."""
    longer = LONG_DOCUMENT + " and then some more words at the end"
    status, body = served.post("rerank", {"model": "rr", "query": "fox",
                                          "documents": [LONG_DOCUMENT, longer]})
    assert status == 200, body
    reference = served.cross_encoder("rr").predict([("fox", LONG_DOCUMENT), ("fox", longer)])
    by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([by_index[0], by_index[1]], reference, atol=1e-4)
    assert by_index[0] == pytest.approx(by_index[1], abs=1e-6)  # the same first 48 tokens


def reranked_reference(served: Served, name: str, query: str, rows: list[int] | None = None
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The cosine of every corpus text, and the cross-encoder's score of the top
    ``CANDIDATES`` of them among ``rows`` (default: all; -inf for the others), from
    sentence-transformers and numpy.

    The tiny tokenizers' vocabulary differs from run to run, so two texts may tie (within
    1e-4) at the cut: then either may be a candidate, and both candidate sets are returned.
    """
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(served.encoder), device="cpu")
    corpus = encoder.encode(TINY_TEXTS, normalize_embeddings=True)
    cosine = corpus @ encoder.encode([query], normalize_embeddings=True)[0]
    allowed = np.array(range(len(TINY_TEXTS)) if rows is None else rows)
    order = [int(i) for i in allowed[np.argsort(-cosine[allowed], kind="stable")]]
    sets = [order[:CANDIDATES]]
    cut = CANDIDATES - 1
    if len(order) > CANDIDATES and cosine[order[cut]] - cosine[order[cut + 1]] <= 1e-4:
        sets.append([*order[:cut], order[cut + 1]])
    model = served.cross_encoder(name)
    references = []
    for candidates in sets:
        reference = np.full(len(TINY_TEXTS), -np.inf, dtype=np.float32)
        reference[candidates] = model.predict([(query, TINY_TEXTS[i]) for i in candidates])
        references.append(reference)
    return cosine, references


def assert_ranking_of_one(indices: list[int], scores: list[float],
                          references: list[np.ndarray]) -> None:
    """:func:`assert_same_ranking` against one of ``references``."""
    failures = []
    for reference in references:
        try:
            assert_same_ranking(indices, scores, reference)
            return
        except AssertionError as err:
            failures.append(err)
    raise failures[0]


@pytest.mark.parametrize("name", ["rr", "rx"])
@pytest.mark.parametrize("query", QUERIES)
def test_search_with_rerank_equals_reranked_numpy_top_candidates(served, name, query) -> None:
    cosine, references = reranked_reference(served, name, query)
    status, body = served.post("search", {"model": name, "text": query, "num_results": 3,
                                          "rerank": True})
    assert status == 200, body
    hits = body["data"]
    assert len(hits) == 3
    assert_ranking_of_one([h["id"] for h in hits], [h["score"] for h in hits], references)
    for hit in hits:
        assert hit["text"] == TINY_TEXTS[hit["id"]]
        assert hit["search_score"] == pytest.approx(float(cosine[hit["id"]]), abs=1e-4)


@pytest.mark.parametrize("name", ["rr", "rx"])
def test_filtered_search_with_rerank_through_the_openai_client(served, name) -> None:
    """Only rows with lang "en" are candidates; the openai client's generic post, as the
    README shows it."""
    from openai import OpenAI

    english = [i for i, record in enumerate(FILTER_RECORDS) if record.get("lang") == "en"]
    _, references = reranked_reference(served, name, QUERIES[0], english)
    client = OpenAI(base_url=f"{served.url}/v1", api_key="none")
    body = client.post("/search", cast_to=object, body={
        "model": name, "text": QUERIES[0], "num_results": 3, "rerank": True,
        "filter": {"lang": "en"}})
    hits = body["data"]  # type: ignore[index]
    assert len(hits) == 3 and {h["id"] for h in hits} <= set(english)
    assert_ranking_of_one([h["id"] for h in hits], [h["score"] for h in hits], references)
    # A filter that matches nothing: an empty result, not an error.
    body = client.post("/search", cast_to=object, body={
        "model": name, "text": QUERIES[0], "rerank": True, "filter": {"lang": "xx"}})
    assert body["data"] == []  # type: ignore[index]


@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("query", QUERIES)
def test_triton_reranked_model_equals_reranked_numpy_top_candidates(served, query,
                                                                    filtered) -> None:
    """``rr_reranked``, the search re-scored inside Triton, for Triton's own clients."""
    rows = [i for i, r in enumerate(FILTER_RECORDS) if r.get("lang") == "en"] if filtered \
        else None
    cosine, references = reranked_reference(served, "rr", query, rows)
    request: dict[str, Any] = {"text": query, "num_results": 3}
    if filtered:
        request["filter"] = json.dumps({"lang": "en"})
    status, body = post_json(f"{served.triton}/v2/models/rr_reranked/generate", request)
    assert status == 200, body
    assert len(body["ids"]) == 3
    assert_ranking_of_one(body["ids"], body["scores"], references)
    assert body["texts"] == [TINY_TEXTS[i] for i in body["ids"]]
    np.testing.assert_allclose(body["search_scores"], cosine[body["ids"]], atol=1e-4)


@pytest.mark.parametrize(("body", "status"), [
    ({"text": "storm", "num_results": 0}, 400), ({"text": "storm", "num_results": 13}, 400),
    ({"text": "storm", "filter": "{not json"}, 400),
    ({"text": "storm", "filter": '{"colour": "red"}'}, 400)])
def test_triton_reranked_model_refuses_bad_input(served, body, status) -> None:
    code, answer = post_json(f"{served.triton}/v2/models/rr_reranked/generate", body)
    assert code == status, answer


def test_a_corpus_text_longer_than_the_request_bound_is_reranked_not_refused(served) -> None:
    """Candidates are corpus texts, not the client's: one longer than maxInputCharacters
    is cut to it (the cross-encoder reads far fewer tokens), where the search used to be
    refused with a 400 naming documents[1], a field the client never sent."""
    reference = served.cross_encoder("rr").predict([(QUERIES[0], t) for t in LONG_CORPUS])
    status, body = served.post("search", {"model": "rl", "text": QUERIES[0], "num_results": 3,
                                          "rerank": True})
    assert status == 200, body
    assert_same_ranking([h["id"] for h in body["data"]], [h["score"] for h in body["data"]],
                        reference)
    status, body = post_json(f"{served.triton}/v2/models/rl_reranked/generate",
                             {"text": QUERIES[0], "num_results": 3})
    assert status == 200, body
    assert_same_ranking(body["ids"], body["scores"], reference)


def test_search_without_rerank_is_unchanged(served) -> None:
    status, body = served.post("search", {"model": "rr", "text": QUERIES[0], "num_results": 3})
    assert status == 200, body
    assert all("search_score" not in hit for hit in body["data"])


@pytest.mark.parametrize(("route", "change", "field"), [
    ("rerank", {"documents": []}, "documents"),
    ("rerank", {"documents": None}, "documents"),
    ("rerank", {"documents": "one text"}, "documents"),
    ("rerank", {"documents": ["a", 5]}, "documents[1]"),
    ("rerank", {"documents": ["a", {"txt": "b"}]}, "documents[1].txt"),
    ("rerank", {"documents": ["a", "  "]}, "documents[1]"),
    ("rerank", {"documents": ["x" * (MAX_CHARACTERS + 1)]}, "documents[0]"),
    ("rerank", {"documents": ["a"] * (MAX_DOCUMENTS + 1)}, "documents"),
    ("rerank", {"top_n": 0}, "top_n"),
    ("rerank", {"top_n": -1}, "top_n"),
    ("rerank", {"top_n": "2"}, "top_n"),
    ("rerank", {"top_n": 1.5}, "top_n"),
    ("rerank", {"query": None}, "query"),
    ("rerank", {"query": ["a"]}, "query"),
    ("rerank", {"return_documents": "yes"}, "return_documents"),
    ("rerank", {"rank_fields": ["title"]}, "rank_fields"),
    ("search", {"rerank": "yes"}, "rerank"),
])
def test_bad_input_is_a_400_naming_the_field(served, route, change, field) -> None:
    body: dict[str, Any] = {"model": "rr", "query": "storm", "documents": ["a", "b"]} \
        if route == "rerank" else {"model": "rr", "text": "storm"}
    body.update(change)
    body = {key: value for key, value in body.items() if value is not None}
    status, answer = served.post(route, body)
    assert status == 400, answer
    assert answer["error"]["param"] == field, answer
