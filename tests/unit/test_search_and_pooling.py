"""Pure backend logic: pooling, exact top-k, text checks, per-request error isolation."""

from __future__ import annotations

import numpy as np
import pytest

from tritonop_backend.batching import pad_and_stack, split_rows
from tritonop_backend.errors import RequestError
from tritonop_backend.pooling import l2_normalize, pool
from tritonop_backend.search import CorpusIndex, _top_k, _top_k_above
from tritonop_backend.stages import SearchStage, TokenizerStage
from tritonop_backend.text import decode_texts
from tritonop_backend.tokenizer import TextTokenizer

rng = np.random.default_rng(7)


def brute_force_top_k(corpus: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Reference: cosine of every row, full stable sort."""
    corpus = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    scores = corpus @ (query / np.linalg.norm(query))
    return np.argsort(-scores, kind="stable")[:k]


@pytest.fixture(scope="module")
def index() -> CorpusIndex:
    vectors = l2_normalize(rng.standard_normal((5000, 48)).astype(np.float32))
    return CorpusIndex(vectors, [f"text {i}" for i in range(5000)])


@pytest.mark.parametrize("k", [1, 7, 100])
def test_top_k_equals_brute_force(index, k):
    queries = rng.standard_normal((5, 48)).astype(np.float32)
    found = index.search(queries, k)
    for row, query in enumerate(queries):
        np.testing.assert_array_equal(found.ids[row], brute_force_top_k(index.embeddings, query, k))
    assert np.all(np.diff(found.scores, axis=1) <= 0), "scores must be best first"


def test_k_beyond_corpus_returns_whole_corpus_ranked():
    small = CorpusIndex(l2_normalize(rng.standard_normal((6, 8)).astype(np.float32)),
                        list("abcdef"))
    query = rng.standard_normal((1, 8)).astype(np.float32)
    found = small.search(query, 50)
    np.testing.assert_array_equal(found.ids[0], brute_force_top_k(small.embeddings, query[0], 6))


def test_ties_are_broken_by_corpus_position():
    same = np.ones((4, 3), dtype=np.float32) / np.sqrt(3)
    found = CorpusIndex(same, list("abcd")).search(np.ones((1, 3), np.float32), 3)
    np.testing.assert_array_equal(found.ids[0], [0, 1, 2])


@pytest.mark.parametrize("levels", [None, 50, 3, 1])  # continuous scores, then ties galore
@pytest.mark.parametrize("k", [1, 10, 64])
def test_top_k_above_a_threshold_equals_a_stable_sort(levels, k):
    scores = rng.standard_normal((6, 4099)).astype(np.float32)  # not a multiple of a group
    if levels is not None:
        scores = np.floor(scores * levels / 4).astype(np.float32)
    found = _top_k_above(scores, k)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(found.ids, expected)
    np.testing.assert_array_equal(found.scores, np.take_along_axis(scores, expected, axis=1))
    np.testing.assert_array_equal(_top_k(scores, k).ids, expected)


def test_top_k_with_nan_scores_leaves_the_threshold_for_a_partition():
    scores = rng.standard_normal((2, 4096)).astype(np.float32)
    scores[1, ::8] = np.nan  # NaN maxima sort last: the threshold is NaN, which none reaches
    assert _top_k_above(scores, 5) is None
    assert _top_k(scores, 5).ids.shape == (2, 5)


def masked_reference(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    rows = []
    for h, m in zip(hidden, mask, strict=True):
        real = h[m.astype(bool)]
        rows.append({"mean": real.mean(0), "max": real.max(0), "cls": h[0],
                     "lasttoken": real[-1]}[mode])
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "lasttoken"])
def test_pooling_ignores_padding(mode):
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    hidden[mask == 0] = 1e6  # padding garbage must not leak into the result
    np.testing.assert_allclose(pool(hidden, mask, mode), masked_reference(hidden, mask, mode),
                               rtol=1e-6)


def test_pad_and_split_round_trip():
    parts = [np.arange(6).reshape(2, 3), np.arange(5).reshape(1, 5)]
    stacked = pad_and_stack(parts, pad_value=-1)
    assert stacked.shape == (3, 5) and stacked[0, 3] == -1
    back = split_rows(stacked, parts, trim=True)
    for got, want in zip(back, parts, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("values", "message"),
    [([b"\xff\xfe"], "text: element 0 is not valid UTF-8"),
     ([b"ok", b"   "], "text: element 1 is empty or only whitespace"),
     ([""], "text: element 0 is empty")],
)
def test_decode_texts_rejects(values, message):
    with pytest.raises(RequestError, match=message):
        decode_texts(values)


def test_decode_texts_strips_and_keeps_unicode():
    assert decode_texts(["  Zürich ".encode(), "北京"]) == ["Zürich", "北京"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_embeddings_are_refused_alone(index, bad):
    stage = SearchStage.from_index(index, default_k=3, max_k=10)
    good = rng.standard_normal((3, 48)).astype(np.float32)
    broken = good.copy()
    broken[2, 7] = bad
    results = stage.run([{"embedding": broken, "num_results": None},
                         {"embedding": good, "num_results": None}])
    assert isinstance(results[0], RequestError)
    assert str(results[0]) == "embedding: row 2 holds NaN or infinite values"
    np.testing.assert_array_equal(results[1]["ids"][2],
                                  brute_force_top_k(index.embeddings, good[2], 3))


def test_an_embedding_too_large_to_normalize_is_refused_by_name(index):
    """Finite values near float32's largest: the length overflows, and normalizing made the
    query a zero vector that returned arbitrary rows with score 0."""
    stage = SearchStage.from_index(index, default_k=3, max_k=10)
    huge = np.full((1, 48), 3e38, dtype=np.float32)
    (result,) = stage.run([{"embedding": huge, "num_results": None}])
    assert isinstance(result, RequestError)
    assert str(result) == "embedding: row 0 is too large to normalize (its length overflows " \
        "float32)"


def test_bad_request_does_not_fail_its_batch_mates(index):
    stage = SearchStage.from_index(index, default_k=3, max_k=10)
    good = rng.standard_normal((2, 48)).astype(np.float32)
    batch = [
        {"embedding": good, "num_results": np.array([[4], [4]], np.int32)},
        {"embedding": good[:1], "num_results": np.array([[0]], np.int32)},
        {"embedding": good[:1], "num_results": np.array([[11]], np.int32)},
        {"embedding": good[:1, :10], "num_results": None},
        {"embedding": good[:1], "num_results": None},
    ]
    results = stage.run(batch)
    assert results[0]["ids"].shape == (2, 4)
    np.testing.assert_array_equal(results[0]["ids"][1],
                                  brute_force_top_k(index.embeddings, good[1], 4))
    assert "must be at least 1" in str(results[1])
    assert "above this service's maximum of 10" in str(results[2])
    assert "embedding: expected [rows, 48]" in str(results[3])
    assert results[4]["ids"].shape == (1, 3)  # default top-k
    assert results[4]["texts"][0, 0] == f"text {results[4]['ids'][0, 0]}".encode()


def test_decode_texts_counts_characters_not_bytes():
    assert decode_texts(["é" * 8], max_characters=8) == ["é" * 8]  # 16 bytes, 8 characters
    with pytest.raises(RequestError) as caught:
        decode_texts([b"ok", "é" * 9], max_characters=8)
    assert str(caught.value) == "text: element 1 is 9 characters long; at most 8 are allowed"


class RecordingTokenizer(TextTokenizer):
    """The model's real tokenizer, remembering the longest text it was handed."""

    longest = 0

    def encode_groups(self, groups):
        self.longest = max([self.longest, *(len(text) for group in groups for text in group)])
        return super().encode_groups(groups)


def test_text_over_the_character_bound_is_refused_before_tokenizing(source_model):
    """An 8 MiB text used to be tokenized whole (seconds, a gigabyte) before truncation."""
    tokenizer = RecordingTokenizer(source_model.directory / "tokenizer.json", 256)
    stage = TokenizerStage.from_tokenizer(tokenizer, max_characters=1000)
    huge = "storm " * (8 * 2**20 // 6)
    batch = [
        {"text": np.array([[b"europe climate change storm"]], dtype=object)},
        {"text": np.array([[b"short"], [huge.encode()]], dtype=object)},
        {"text": np.array([["x" * 1000]], dtype=object)},
    ]
    results = stage.run(batch)
    assert isinstance(results[1], RequestError)
    assert str(results[1]) == (
        f"text: element 1 is {len(huge)} characters long; at most 1000 are allowed")
    assert tokenizer.longest == 1000  # the bound itself is allowed; the huge text never went in
    alone_ids, _ = tokenizer.encode(["europe climate change storm"])
    np.testing.assert_array_equal(results[0]["input_ids"], alone_ids)
    assert results[2]["input_ids"].shape[0] == 1
