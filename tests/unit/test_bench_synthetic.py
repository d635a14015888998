"""The scale benchmarks' pure parts (bench/synthetic.py, bench/scenarios/scale.py): the
clustered generator, the memory-mapped index file, recall and the filtered-scan check,
against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from bench import synthetic
from bench.scenarios.scale import headline

from tritonop_backend.search import _mapped_tensor


def test_generator_is_deterministic_by_seed_and_block(monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK", 1000)
    a = np.empty((2500, 16), np.float32)
    b = np.empty((2500, 16), np.float32)
    synthetic.fill_clustered(a, 5)
    synthetic.fill_clustered(b, 5)
    assert np.array_equal(a, b)
    other = np.empty((2500, 16), np.float32)
    synthetic.fill_clustered(other, 6)
    assert not np.allclose(a, other)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_rows_cluster_around_their_centres():
    dim, seed = 64, 3
    rows = np.empty((4000, dim), np.float32)
    synthetic.fill_clustered(rows, seed, clusters=20)
    centres = synthetic.mixture(seed, 20, dim).centres
    nearest = (rows @ centres.T).max(axis=1)
    # cos to its own centre is about 1 / sqrt(1 + w^2 (spread^2 + floor^2)) (0.51-0.69 over
    # the widths w); to unrelated unit vectors about 0 +- 1/sqrt(dim)
    assert 0.5 < np.median(nearest) < 0.85
    unrelated = np.random.default_rng(0).standard_normal((20, dim)).astype(np.float32)
    unrelated /= np.linalg.norm(unrelated, axis=1, keepdims=True)
    assert np.median((rows @ unrelated.T).max(axis=1)) < 0.4
    # a row's nearest neighbours are its cluster's rows: far closer than a random row
    scores = rows[:50] @ rows.T
    np.fill_diagonal(scores[:, :50], -1)
    assert np.median(scores.max(axis=1)) > 0.4 > np.median(np.abs(scores))
    queries = synthetic.clustered_queries(seed, 30, 4000, dim)
    assert queries.shape == (30, dim)
    assert not np.isin(queries, rows).all(axis=1).any()  # fresh draws, not corpus rows


def _lid(rows: np.ndarray, k: int = 20) -> float:
    """Median maximum-likelihood local intrinsic dimensionality over 200 rows' ``k``
    nearest neighbours (the mean of the log distance ratios over all ``k``, as the figures
    in bench/synthetic.py were measured; Levina and Bickel's k - 1 gives 5% less), the
    rows being unit vectors."""
    scores = rows[:200] @ rows.T
    np.fill_diagonal(scores[:, :200], -np.inf)
    near = -np.sort(-scores, axis=1)[:, :k]
    distances = np.sqrt(np.maximum(2 - 2 * near, 1e-12))
    return float(np.median(-1 / np.mean(np.log(distances / distances[:, -1:]), axis=1)))


def test_rows_vary_along_few_directions_like_real_embeddings():
    # Real MiniLM embeddings (the news corpus) have a local intrinsic dimensionality of
    # ~17; isotropic Gaussian clusters in 384 dimensions have 60-100, which makes every
    # graph index look worse than it would on real vectors.
    dim = 384
    rows = np.empty((20_000, dim), np.float32)
    synthetic.fill_clustered(rows, 11)
    assert 10 < _lid(rows) < 25
    rng = np.random.default_rng(0)
    isotropic = rows[rng.permutation(len(rows))[:1]] + rng.standard_normal((20_000, dim)) / 20
    isotropic = (isotropic / np.linalg.norm(isotropic, axis=1, keepdims=True)).astype(np.float32)
    assert _lid(isotropic) > 60  # the estimate tells them apart
    # centres are related through their topics, not all orthogonal as random unit vectors
    centres = synthetic.mixture(11, 400, dim).centres
    closest = centres @ centres.T
    np.fill_diagonal(closest, -1)
    assert np.median(closest.max(axis=1)) > 0.5


def test_embeddings_file_reads_back_as_the_index_reads_it(tmp_path):
    path = tmp_path / "embeddings.safetensors"
    written = synthetic.create_embeddings(path, 300, 12)
    synthetic.fill_clustered(written, 1)
    written.flush()
    expected = np.empty((300, 12), np.float32)
    synthetic.fill_clustered(expected, 1)
    assert np.array_equal(_mapped_tensor(path, "embeddings"), expected)
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(str(path))["embeddings"], expected)
    synthetic.write_ids(tmp_path, 3)
    assert (tmp_path / "texts.utf8").read_bytes() == b"v0v1v2"
    assert np.load(tmp_path / "texts.offsets.npy").tolist() == [0, 2, 4, 6]


def test_recall_counts_results_reaching_the_exact_kth_score():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((500, 8)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = matrix[:20]
    scores = queries @ matrix.T
    exact = np.argsort(-scores, axis=1)[:, :10]
    kth = np.sort(scores, axis=1)[:, -10]
    perfect = [scores[i, exact[i]] for i in range(20)]
    assert synthetic.recall_at_k(perfect, kth, 10) == 1.0
    # half of every answer replaced by rows outside the exact top 10: recall 0.5, as the
    # set intersection with the exact ids says
    worse = np.argsort(-scores, axis=1)[:, 100:105]
    mixed_ids = np.concatenate([exact[:, :5], worse], axis=1)
    mixed = [scores[i, mixed_ids[i]] for i in range(20)]
    overlap = np.mean([len(set(mixed_ids[i]) & set(exact[i])) / 10 for i in range(20)])
    assert synthetic.recall_at_k(mixed, kth, 10) == pytest.approx(overlap) == 0.5
    with pytest.raises(ValueError):
        synthetic.recall_at_k([], np.zeros(0), 10)


def test_filtered_scan_and_the_equality_check():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((1000, 8)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    rows = np.flatnonzero(rng.integers(0, 10, 1000) == 3)
    query = matrix[7]
    ids, scores = synthetic.filtered_scan(matrix, rows, query, 5)
    # reference: every row's score, those outside the filter masked out
    masked = np.full(1000, -np.inf, np.float32)
    masked[rows] = matrix[rows] @ query
    assert list(ids) == list(np.argsort(-masked)[:5])
    assert set(ids) <= set(rows)
    assert synthetic.same_results(ids, scores + 1e-7, ids, scores)
    assert not synthetic.same_results(ids[::-1], scores[::-1], ids, scores)
    assert not synthetic.same_results(ids, scores + 1e-3, ids, scores)
    # ties go to the lower id, as the exact index orders them
    tied = np.tile(matrix[:1], (4, 1))
    assert list(synthetic.filtered_scan(tied, np.array([0, 1, 2, 3]), matrix[0], 2)[0]) == \
        [0, 1]


def test_headline_index_is_the_fastest_meeting_recall_and_memory():
    def index(recall, memory_mb, e2e):
        return {"recall_at_10": recall, "index_memory_mb": memory_mb,
                "search_model_rss_mb": memory_mb + 900, "end_to_end_ms": {"p50": e2e}}

    indexes = {"exact": index(1.0, 100, 5.0), "hnsw": index(0.99, 20000, 6.0),
               "hnsw+int8": index(0.985, 5000, 9.0), "hnsw+binary": index(0.99, 1000, 8.0)}
    assert headline(indexes) == "hnsw+binary"
    indexes["hnsw+binary"] = index(0.9, 1000, 8.0)
    assert headline(indexes) == "hnsw+int8"
    indexes["hnsw+int8"] = index(0.95, 5000, 9.0)
    assert headline(indexes) == "hnsw"  # none meets both: the best recall
    assert headline({"exact": index(1.0, 1, 1.0), "hnsw": {"skipped": "no memory"}}) == \
        "hnsw+int8"
    # the index's own memory decides, not the process's runtime beside it (here 6.5 GB)
    assert headline({"hnsw+int8": index(0.99, 5600, 9.0),
                     "hnsw+binary": index(0.99, 1000, 20.0)}) == "hnsw+int8"
    # results from before the index's memory was measured: the whole search model's
    old = {"recall_at_10": 0.99, "search_model_rss_mb": 7000, "end_to_end_ms": {"p50": 9.0}}
    assert headline({"hnsw+int8": old, "hnsw+binary": index(0.985, 2000, 12.0)}) == \
        "hnsw+binary"


def test_scale_and_filter_sections_name_the_size_and_the_noise(tmp_path):
    from bench import report
    from bench.alternation import quietness

    noisy = quietness(1.6, 1.8, [1.5], 2)
    step = {"p50": 1.3, "p90": 2.0, "p99": 3.0}
    scale = {
        "vectors": 50_000, "dimension": 384, "clusters": 224, "generate_seconds": 0.8,
        "queries": 30, "num_results": 10, "headline": "hnsw+int8", "quiet": noisy,
        "indexes": {
            "exact": {"skipped": "not served: too big"},
            "hnsw+int8": {"index": {"kind": "hnsw", "recall_at_10": 0.999},
                          "search_step_ms": step, "end_to_end_ms": step, "recall_at_10": 1.0,
                          "search_model_rss_mb": 155.0, "graph_mb": 25.4,
                          "float32_rows_mb": 73.2, "build_seconds": 19.9}},
        "real": {"vectors": 300, "indexes": {"hnsw+int8": {
            "recall_at_10": 1.0, "recall_queries": 300, "build_seconds": 0.0,
            "graph_mb": 0.15}}}}
    page = "\n".join(report.section_scale(scale, tmp_path))
    assert "**Size run: 50,000 vectors**" in page and "10,000,000" in page
    assert "not served: too big" in page and "**noisy**" in page
    assert "| hnsw+int8 | 1.3 | 1.3 | 1.0000 | – | 155 |" in page
    assert "`hnsw+int8`, the index with the best recall, since none met" in page
    scale["targets"] = [{"id": "SCALE.recall", "met": True}, {"id": "SCALE.memory", "met": True}]
    page = "\n".join(report.section_scale(scale, tmp_path))
    assert "`hnsw+int8`, the fastest index meeting the recall and memory targets" in page
    filtered = {"vectors": 100_000, "filter": {"tenant": "t7"}, "kept_rows": 983,
                "kept_share": 0.0098, "queries": 30, "equal_to_scan": 1.0, "quiet": noisy,
                "unfiltered_ms": step, "filtered_ms": step}
    page = "\n".join(report.section_filter(filtered, tmp_path))
    assert "**Size run: 100,000 vectors**" in page and "1,000,000" in page
    assert "983 rows (0.98%)" in page and "100% of the filtered answers" in page
