"""The pure parts of reranking: scores, ranking, the request parser, the model's files,
the stage's batching, and what the renderer and the fingerprint make of ``spec.rerank``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tritonop.artifacts.cross_encoder import _check_layout, activation
from tritonop.artifacts.versions import resource_fingerprint
from tritonop.gateway.config import Admission, ModelEntry, model_entry
from tritonop.gateway.errors import APIError
from tritonop.gateway.protocol import parse_search
from tritonop.gateway.rerank import candidates, parse_rerank, rerank_body
from tritonop.render.repository import render_repository
from tritonop.resources import ResourceError, parse_resource
from tritonop_backend.artifacts import ArtifactError
from tritonop_backend.errors import RequestError
from tritonop_backend.rerank import (
    RerankedSearch,
    Reranker,
    RerankStage,
    activate,
    best_rows,
    rank,
    runs,
)

API = "serving.tritonop.dev/v1alpha1"
ENTRY = ModelEntry("news", "embedding", Admission(1, 1), max_top_k=10, default_top_k=3,
                   rerank_candidates=5, max_rerank_documents=4)
PLAIN = ModelEntry("plain", "embedding", Admission(1, 1), max_top_k=10, default_top_k=3)
MODELS = {"news": ENTRY, "plain": PLAIN}


# Scores and ranking --------------------------------------------------------------------

def test_activations_match_torch() -> None:
    import torch

    logits = np.array([-100.0, -3.5, 0.0, 2.25, 100.0], dtype=np.float32)
    np.testing.assert_allclose(activate(logits, "sigmoid"),
                               torch.sigmoid(torch.from_numpy(logits)).numpy(), atol=1e-7)
    np.testing.assert_allclose(activate(logits, "tanh"), np.tanh(logits), atol=1e-7)
    np.testing.assert_array_equal(activate(logits, "identity"), logits)
    with pytest.raises(ValueError, match="activation"):
        activate(logits, "softmax")


def test_runs_group_similar_lengths_within_the_bounds() -> None:
    lengths = np.array([12] * 10 + [17] * 20 + [18] * 12 + [23] * 8)
    assert [(r.start, r.stop) for r in runs(lengths)] == [(0, 42), (42, 50)]  # 23 > 1.5 x 12
    assert [(r.start, r.stop) for r in runs(lengths, most=16)] == [
        (0, 16), (16, 32), (32, 48), (48, 50)]
    # a run holds `least` pairs before a length may end it; lengths only sorted, any spread
    assert [(r.start, r.stop) for r in runs(np.array([1, 2, 4, 8, 16, 32]), least=2)] == [
        (0, 2), (2, 4), (4, 6)]
    assert runs(np.array([5])) == [slice(0, 1)]


def test_rank_is_best_first_and_keeps_the_order_of_ties() -> None:
    assert rank([0.1, 0.9, 0.5, 0.9], 10) == [1, 3, 2, 0]
    assert rank([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]
    assert rank([], 3) == []


# The /v1/rerank body --------------------------------------------------------------------

def test_parse_rerank_takes_strings_and_text_objects() -> None:
    args = parse_rerank({"model": "news", "query": "q", "documents": ["a", {"text": "b"}]},
                        MODELS)
    assert (args.documents, args.top_n, args.return_documents) == (["a", "b"], 2, False)


def test_top_n_beyond_the_documents_means_all_of_them() -> None:
    args = parse_rerank({"model": "news", "query": "q", "documents": ["a", "b"], "top_n": 4},
                        MODELS)
    assert args.top_n == 2


@pytest.mark.parametrize(("body", "field"), [
    ({"documents": []}, "documents"),
    ({"documents": {"text": "a"}}, "documents"),
    ({"documents": ["a"] * 5}, "documents"),
    ({"documents": ["a", None]}, "documents[1]"),
    ({"documents": [{"text": 3}]}, "documents[0].text"),
    ({"documents": [{}]}, "documents[0].text"),
    ({"documents": [""]}, "documents[0]"),
    ({"top_n": 0}, "top_n"),
    ({"top_n": 5}, "top_n"),  # beyond maxDocuments
    ({"top_n": True}, "top_n"),
    ({"query": ""}, "query"),
    ({"query": 7}, "query"),
    ({"return_documents": 1}, "return_documents"),
    ({"max_chunks_per_doc": 2}, "max_chunks_per_doc"),
    ({"model": "plain"}, "model"),
])
def test_parse_rerank_refuses_naming_the_field(body: dict[str, Any], field: str) -> None:
    request = {"model": "news", "query": "q", "documents": ["a"], **body}
    with pytest.raises(APIError) as err:
        parse_rerank(request, MODELS)
    assert (err.value.status, err.value.param) == (400, field)


def test_parse_rerank_unknown_model_is_a_404() -> None:
    with pytest.raises(APIError) as err:
        parse_rerank({"model": "nope", "query": "q", "documents": ["a"]}, MODELS)
    assert err.value.status == 404


def test_rerank_body_lists_the_best_first_with_documents_when_asked() -> None:
    args = parse_rerank({"model": "news", "query": "q", "documents": ["a", "b", "c"],
                         "top_n": 2, "return_documents": True}, MODELS)
    body = rerank_body(args, np.array([0.2, 0.7, 0.5], dtype=np.float32), [3, 4, 5])
    assert [(r["index"], r["document"]["text"]) for r in body["results"]] == [(1, "b"), (2, "c")]
    assert body["results"][0]["relevance_score"] == pytest.approx(0.7)
    assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
    assert body["model"] == "news"


def test_search_rerank_needs_a_reranker_and_a_boolean() -> None:
    assert parse_search({"model": "news", "text": "q", "rerank": True}, MODELS).rerank
    assert not parse_search({"model": "news", "text": "q"}, MODELS).rerank
    for model, value in (("plain", True), ("news", "yes")):
        with pytest.raises(APIError) as err:
            parse_search({"model": model, "text": "q", "rerank": value}, MODELS)
        assert err.value.param == "rerank"


def test_candidates_cover_num_results_within_max_top_k() -> None:
    assert candidates(ENTRY, 3) == 5
    assert candidates(ENTRY, 8) == 8
    assert candidates(ModelEntry("x", "embedding", Admission(1, 1), max_top_k=4,
                                 rerank_candidates=50), 3) == 4


# The search-then-rerank model's logic (``<name>_reranked``) ------------------------------

def test_reranked_search_checks_num_results_and_counts_candidates() -> None:
    settings = RerankedSearch(candidates=5, default_k=3, max_k=10)
    assert settings.num_results(None, 2) == 3
    assert settings.num_results(np.array([[4], [4]], dtype=np.int32), 2) == 4
    for bad in (np.array([[0]]), np.array([[11]]), np.array([[2], [3]])):
        with pytest.raises(RequestError) as err:
            settings.num_results(bad, len(bad))
        assert err.value.field == "num_results"
    assert [settings.search_count(k) for k in (1, 5, 7, 10)] == [5, 5, 7, 10]
    assert RerankedSearch(candidates=50, default_k=3, max_k=10).search_count(3) == 10


def test_best_rows_orders_each_row_by_the_rerank_score() -> None:
    ids = np.array([[7, 8, 9], [1, 2, 3]], dtype=np.int64)
    texts = np.array([[b"g", b"h", b"i"], [b"a", b"b", b"c"]], dtype=object)
    cosine = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], dtype=np.float32)
    reranked = [np.array([0.1, 0.3, 0.2], dtype=np.float32),
                np.array([0.5, 0.4, 0.9], dtype=np.float32)]
    out = best_rows(ids, texts, cosine, reranked, 2)
    np.testing.assert_array_equal(out["ids"], [[8, 9], [3, 1]])
    np.testing.assert_allclose(out["scores"], [[0.3, 0.2], [0.9, 0.5]])
    np.testing.assert_allclose(out["search_scores"], [[0.8, 0.7], [0.4, 0.6]])
    assert out["texts"].tolist() == [[b"h", b"i"], [b"c", b"a"]]
    empty = best_rows(np.zeros((1, 0), np.int64), np.zeros((1, 0), object),
                      np.zeros((1, 0), np.float32), [np.zeros(0, np.float32)], 3)
    assert empty["ids"].shape == (1, 0)


# The model's files ------------------------------------------------------------------------

def _folder(tmp_path: Path, config: dict[str, Any], **files: Any) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, body in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    return tmp_path


@pytest.mark.parametrize(("config", "files", "expected"), [
    ({}, {}, "sigmoid"),  # sentence-transformers' default for one label
    ({}, {"config_sentence_transformers": {
        "activation_fn": "torch.nn.modules.linear.Identity"}}, "identity"),
    ({"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}}, {},
     "tanh"),
    ({"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}, {},
     "identity"),
    ({"sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}},
     {"config_sentence_transformers": {
         "activation_fn": "torch.nn.modules.activation.Sigmoid"}}, "sigmoid"),
    ({}, {"config_sentence_transformers": {"activation_fn": "mymodule.Scale"}}, "sigmoid"),
])
def test_activation_is_read_as_sentence_transformers_reads_it(
        tmp_path: Path, config: dict[str, Any], files: dict[str, Any], expected: str) -> None:
    folder = _folder(tmp_path, config, **files)
    assert activation("src", folder, config) == expected


def test_an_activation_tritonop_does_not_apply_is_refused(tmp_path: Path) -> None:
    config = {"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.ReLU"}}
    with pytest.raises(ArtifactError, match="ReLU"):
        activation("src", _folder(tmp_path, config), config)


@pytest.mark.parametrize(("config", "modules", "match"), [
    ({"num_labels": 2}, None, "2 labels"),
    ({"id2label": {"0": "a", "1": "b"}}, None, "2 labels"),
    ({"architectures": ["BertModel"]}, None, "ForSequenceClassification"),
    ({}, [{"type": "sentence_transformers.models.Transformer"},
          {"type": "sentence_transformers.models.Pooling"}], "one Transformer"),
])
def test_what_is_not_a_one_label_cross_encoder_is_refused(
        tmp_path: Path, config: dict[str, Any], modules: Any, match: str) -> None:
    folder = _folder(tmp_path, config, **({"modules": modules} if modules else {}))
    with pytest.raises(ArtifactError, match=match):
        _check_layout("src", folder, config)


# The Triton stage, with a stand-in graph ----------------------------------------------

class _Tokenizer:
    """Encodes a pair as its two lengths; lengths as their sum."""

    def lengths(self, pairs: list[tuple[str, str]]) -> list[int]:
        return [len(q) + len(d) for q, d in pairs]

    def encode(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, ...]:
        ids = np.array([[len(q), len(d)] for q, d in pairs], dtype=np.int64)
        return ids, np.ones_like(ids), np.zeros_like(ids)


def _stage() -> RerankStage:
    graph = lambda ids, mask, types: (ids[:, 1] - ids[:, 0]).astype(np.float32)  # noqa: E731
    return RerankStage.from_reranker(Reranker(_Tokenizer(), graph, "identity"), 50)


def _texts(*values: str) -> np.ndarray:
    return np.array([[v.encode() for v in values]], dtype=object)


def test_stage_scores_every_request_of_a_batch_in_order() -> None:
    # Documents of several lengths, so the length-sorted runs must be put back in order.
    docs = ["a" * n for n in (9, 2, 30, 5)] * 20  # more pairs than one run takes
    results = _stage().run([{"query": _texts("qq"), "documents": _texts(*docs)},
                            {"query": _texts("q"), "documents": _texts("abc")}])
    np.testing.assert_array_equal(results[0]["scores"], [[len(d) - 2 for d in docs]])
    np.testing.assert_array_equal(results[0]["tokens"], [[len(d) + 2 for d in docs]])
    np.testing.assert_array_equal(results[1]["scores"], [[2.0]])


def test_stage_answers_a_bad_request_alone() -> None:
    results = _stage().run([{"query": _texts("q"), "documents": _texts("x" * 51)},
                            {"query": _texts("q"), "documents": _texts("ab")},
                            {"query": None, "documents": _texts("ab")},
                            {"query": _texts("q"), "documents": np.array([[b"\xff"]],
                                                                         dtype=object)}])
    assert isinstance(results[0], RequestError) and results[0].field == "documents[0]"
    np.testing.assert_array_equal(results[1]["scores"], [[1.0]])
    assert isinstance(results[2], RequestError) and results[2].field == "query"
    assert isinstance(results[3], RequestError) and "UTF-8" in results[3].problem


def test_stage_bounds_documents_per_query_for_triton_clients_too() -> None:
    """spec.rerank.maxDocuments bounded only the gateway; Triton's clients reach the model
    directly (with spec.api.triton.expose), and every pair costs a cross-encoder pass."""
    graph = lambda ids, mask, types: (ids[:, 1] - ids[:, 0]).astype(np.float32)  # noqa: E731
    stage = RerankStage.from_reranker(Reranker(_Tokenizer(), graph, "identity"), 50, 3)
    results = stage.run([{"query": _texts("q"), "documents": _texts(*"abcd")},
                         {"query": _texts("q"), "documents": _texts(*"abc")}])
    assert isinstance(results[0], RequestError) and results[0].field == "documents"
    assert "at most 3 documents" in results[0].problem
    np.testing.assert_array_equal(results[1]["scores"], [[0.0, 0.0, 0.0]])


# Spec, render, fingerprint --------------------------------------------------------------

def _search(rerank: dict[str, Any] | None) -> Any:
    spec: dict[str, Any] = {"corpus": {"source": "/artifacts/c.txt"}}
    if rerank is not None:
        spec["rerank"] = rerank
    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": "news"}, "spec": spec})


def test_rerank_spec_defaults_and_bounds() -> None:
    spec = _search({"model": {"source": "hf://org/reranker"}}).spec
    assert (spec.rerank.candidates, spec.rerank.max_documents) == (50, 1000)
    for bad in ({"model": {"source": "x"}, "candidates": 0},
                {"model": {"source": "x"}, "candidates": 1001},
                {"model": {"source": "https://host/m.tar"}},
                {}):
        with pytest.raises(ResourceError):
            _search(bad)


def test_the_rerank_model_is_rendered_only_with_spec_rerank() -> None:
    plain = render_repository([_search(None)])
    assert not any(path.startswith("news_rerank/") for path in plain)
    files = render_repository([_search({"model": {"source": "/m", "format": "onnx"},
                                        "stage": {"maxBatchSize": 4}})])
    config = files["news_rerank/config.pbtxt"].decode()
    assert "max_batch_size: 4" in config and "allow_ragged_batch: true" in config
    assert "dynamic_batching" in config
    fingerprint = resource_fingerprint(_search({"model": {"source": "/m", "format": "onnx"}}))
    assert f"/artifacts/news/{fingerprint}/rerank" in config
    assert b"RerankStage" in files["news_rerank/1/model.py"]
    assert b"RerankStage" not in files["news_search/1/model.py"]


def test_fingerprint_changes_with_the_cross_encoder_only() -> None:
    plain = resource_fingerprint(_search(None))
    one = resource_fingerprint(_search({"model": {"source": "/m"}}))
    assert plain != one
    assert one == resource_fingerprint(_search({"model": {"source": "/m"}, "candidates": 9}))
    assert one != resource_fingerprint(_search({"model": {"source": "/m", "format": "onnx"}}))


def test_gateway_entry_carries_the_rerank_bounds() -> None:
    entry = model_entry(_search({"model": {"source": "/m"}, "candidates": 7,
                                 "maxDocuments": 9}))
    assert (entry.rerank_candidates, entry.max_rerank_documents) == (7, 9)
    assert model_entry(_search(None)).rerank_candidates == 0


# Export, in process, against CrossEncoder.predict ---------------------------------------

@pytest.mark.parametrize(("model_type", "fmt"), [
    ("bert", "onnx"), ("distilbert", "onnx"), ("roberta", "torchscript")])
def test_exported_cross_encoder_scores_equal_predict(tmp_path: Path, model_type: str,
                                                     fmt: str) -> None:
    """Token types (BERT), none (DistilBERT), positions after the padding id (RoBERTa)."""
    from sentence_transformers import CrossEncoder

    from tests.support.encoders import make_cross_encoder
    from tritonop.artifacts.cross_encoder import export_cross_encoder, inspect_cross_encoder

    folder = make_cross_encoder(tmp_path / "ce", model_type)
    manifest = export_cross_encoder(inspect_cross_encoder(str(folder), folder), fmt,
                                    tmp_path / "rerank")
    assert (manifest.format, manifest.activation) == (fmt, "sigmoid")
    pairs = [("storm in europe", "severe storm warning for northern europe"),
             ("jazz", "jazz festival opens downtown"),
             ("a long query " * 30, "the quick brown fox jumps over the lazy dog " * 30)]
    # and 24 of growing lengths, shuffled: several runs (see runs), scored back in order
    pairs += [("storm", "rain and wind " * (1 + (7 * i) % 24)) for i in range(24)]
    scores, tokens = Reranker.load(tmp_path / "rerank").score(pairs)
    reference = CrossEncoder(str(folder), device="cpu").predict(pairs)
    np.testing.assert_allclose(scores, reference, atol=1e-4)
    assert tokens.max() == manifest.max_sequence_length  # the long pair, truncated
