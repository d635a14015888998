"""The int8 screen in front of the exact scan: its results equal a float64 brute force,
ties and near-ties included, and it stays off where its product cannot be trusted."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

import tritonop_backend.screen as screen_module
import tritonop_backend.search as search_module
from tritonop_backend.pooling import l2_normalize
from tritonop_backend.screen import Int8Screen, at_least_k, kth_best
from tritonop_backend.search import CorpusIndex

pytest.importorskip("onnxruntime")
rng = np.random.default_rng(11)


def brute_force(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """float64 cosine of every row, stable sort: lowest ids first among equal scores."""
    scores = l2_normalize(queries).astype(np.float64) @ corpus.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def screened(corpus: np.ndarray) -> CorpusIndex:
    index = CorpusIndex(corpus, [str(i) for i in range(len(corpus))])
    index.screen = Int8Screen.build(index.columns)
    assert index.screen is not None
    return index


def clustered(count: int, dim: int) -> np.ndarray:
    """Rows around a few centres, as sentence embeddings are: many close scores."""
    centres = rng.standard_normal((12, dim)).astype(np.float32)
    rows = centres[rng.integers(0, 12, count)] + 0.3 * rng.standard_normal((count, dim))
    return l2_normalize(rows.astype(np.float32))


@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("make", [
    lambda: l2_normalize(rng.standard_normal((5003, 64)).astype(np.float32)),
    lambda: clustered(6000, 96),
], ids=["random", "clustered"])
def test_screened_search_equals_a_float64_brute_force(make, k):
    corpus = make()
    index = screened(corpus)
    queries = np.concatenate([corpus[:4] + 0.05 * rng.standard_normal((4, corpus.shape[1])),
                              rng.standard_normal((4, corpus.shape[1]))]).astype(np.float32)
    found = index.search(queries, k)
    expected = brute_force(corpus, queries, k)
    for row in range(len(queries)):
        decided = _decided(corpus, queries[row], k)  # the k-th place not a float32 coin toss
        assert found.ids[row][:decided].tolist() == expected[row][:decided].tolist()
    assert np.all(np.diff(found.scores, axis=1) <= 0)
    unscreened = CorpusIndex(corpus, [str(i) for i in range(len(corpus))]).search(queries, k)
    np.testing.assert_allclose(found.scores, unscreened.scores, atol=1e-6)


def _decided(corpus: np.ndarray, query: np.ndarray, k: int) -> int:
    """How many of the first k places float32 decides: up to the first near-tie."""
    scores = np.sort(l2_normalize(query[None])[0].astype(np.float64) @ corpus.T)[::-1]
    gaps = np.flatnonzero(np.diff(scores[: k + 1]) > -1e-6)
    return int(gaps[0]) if len(gaps) else k


def test_exact_ties_go_to_the_lowest_ids_as_without_the_screen():
    base = l2_normalize(rng.standard_normal((700, 32)).astype(np.float32))
    corpus = np.concatenate([base] * 7)  # every row 7 times: 4,900 rows, ties everywhere
    index = screened(corpus)
    queries = base[:5]
    found = index.search(queries, 10)
    plain = CorpusIndex(corpus, [str(i) for i in range(len(corpus))]).search(queries, 10)
    assert found.ids.tolist() == plain.ids.tolist()
    assert found.ids[:, :7].tolist() == [[i + 700 * copy for copy in range(7)] for i in range(5)]


def test_near_ties_far_below_the_int8_step_keep_their_order():
    query = l2_normalize(rng.standard_normal((1, 48)).astype(np.float32))
    near = query + 1e-2 * rng.standard_normal((40, 48))  # within 1e-3, where int8 sees ties
    far = rng.standard_normal((4200, 48))
    corpus = l2_normalize(np.concatenate([far[:2000], near, far[2000:]]).astype(np.float32))
    found = screened(corpus).search(query, 20)
    decided = _decided(corpus, query[0], 20)
    assert decided >= 10
    assert found.ids[0][:decided].tolist() == brute_force(corpus, query, decided)[0].tolist()


def test_the_bound_holds_for_every_row():
    corpus = clustered(4500, 64)
    screen = Int8Screen.build(np.ascontiguousarray(corpus.T))
    queries = l2_normalize(rng.standard_normal((6, 64)).astype(np.float32))
    for query, rows in zip(queries, screen.candidates(queries, 5), strict=True):
        exact = corpus.astype(np.float64) @ query
        top = set(np.argsort(-exact, kind="stable")[:5].tolist())
        assert top <= set(rows.tolist())
        assert len(rows) < len(corpus) // 4  # and it screens: few candidates


def test_a_product_that_differs_from_numpy_leaves_the_screen_off(monkeypatch, caplog):
    def overflowing(columns, threads):  # a kernel that saturates at 16 bits
        return lambda queries: np.clip(queries.astype(np.int64) @ columns, -32768, 32767)

    monkeypatch.setattr(screen_module, "constant_product", overflowing)
    with caplog.at_level(logging.WARNING):
        assert Int8Screen.build(np.ones((384, 10), dtype=np.float32)) is None
    assert "int8 product differs from numpy's" in caplog.text


def test_without_onnxruntime_there_is_no_screen(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert Int8Screen.build(np.ones((8, 10), dtype=np.float32)) is None


def test_nan_scores_fall_back_to_the_float32_scan():
    scores = rng.standard_normal((2, 800)).astype(np.float32)
    scores[1] = np.nan
    assert kth_best(scores, 3) is None
    assert kth_best(scores[:1], 3)[0] == np.sort(scores[0])[-3]
    assert np.all(at_least_k(scores[:1], 3) <= np.sort(scores[0])[-3])


def test_a_loaded_index_screens_from_its_size(monkeypatch, tmp_path):
    from tritonop_backend.artifacts import IndexManifest
    from tritonop_backend.search import load_index, write_index

    monkeypatch.setattr(search_module, "SCREEN_ROWS", 2000)
    for count, screens in ((1999, False), (2000, True)):
        corpus = l2_normalize(rng.standard_normal((count, 16)).astype(np.float32))
        folder = tmp_path / str(count)
        write_index(folder, corpus, [str(i) for i in range(count)],
                    IndexManifest("m", "f", "mean", 16, 16, count, "x"))
        index, _ = load_index(folder)
        assert (index.screen is not None) == screens
        assert index.product_name.startswith("int8 screen, then float32; ") == screens
        queries = rng.standard_normal((3, 16)).astype(np.float32)
        assert index.search(queries, 5).ids.tolist() == brute_force(corpus, queries, 5).tolist()
        keep = np.arange(0, count, 3)  # a filter's rows: the float32 scan, screen or not
        filtered = index.search(queries, 5, rows=keep).ids
        assert filtered.tolist() == keep[brute_force(corpus[keep], queries, 5)].tolist()


def test_a_query_the_screen_cannot_narrow_is_scanned_in_float32():
    corpus = l2_normalize(rng.standard_normal((4100, 16)).astype(np.float32))
    index = screened(corpus)
    scanned = []
    index.product = lambda queries, columns: scanned.append(len(queries)) or queries @ columns
    zero = np.zeros((1, 16), dtype=np.float32)  # a client may send its own embedding
    assert len(index.screen.candidates(zero, 3)[0]) == len(corpus)  # every row ties
    assert index.search(zero, 3).ids.tolist() == [[0, 1, 2]] and scanned == [1]
    assert index.search(corpus[:2], 3).ids[:, 0].tolist() == [0, 1] and scanned == [1]
    # Beside others, only the zero query is scanned (the others' candidates are rescored,
    # rather than every row in float64 for a batch whose total looked small enough).
    batch = np.concatenate([corpus[10:15], zero, corpus[20:22]])
    found = index.search(batch, 3)
    assert scanned == [1, 1]
    assert found.ids[5].tolist() == [0, 1, 2]
    others = [0, 1, 2, 3, 4, 6, 7]
    assert found.ids[others].tolist() == brute_force(corpus, batch[others], 3).tolist()
