"""The approximate (``hnsw``) corpus index: a usearch HNSW graph, rescored in float32.

Why usearch (measured on clustered synthetic vectors against faiss-cpu and hnswlib, see
docs/models.md "Choosing an index"): its saved index opens memory-mapped
(``Index.restore(path, view=True)``), so replicas on one node share the page cache as they
do for the float32 matrix, and it quantizes natively to int8 and to one bit per dimension.

Every search asks the graph for ``k x rescore_factor`` candidates (``k`` without
quantization), then ranks them by their exact cosine with the float32 rows of the index
(the memory-mapped ``embeddings.safetensors``), so returned scores are the exact index's
scores for the same rows, and quantization only costs the candidates it misses.

A filter keeps the rows it matches (:mod:`tritonop_backend.filters`). Few rows, or a small
share of the corpus: they are scanned exactly, which is fast because they are few, and is
what approximate indexes with predicates do below some selectivity anyway. Otherwise the
graph is asked for proportionally more candidates, those outside the filter are dropped,
and if fewer than ``k`` remain (of those the filter could give), the exact scan of the
filtered rows answers instead. Results under a filter therefore always satisfy it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ANN_FILE = "hnsw.usearch"
QUANTIZATIONS = {"none": "f32", "int8": "i8", "binary": "b1"}
EXACT_FILTER_ROWS = 32768
"""A filter keeping at most this many rows is answered by an exact scan of them."""
MAX_OVERSAMPLE = 16
"""A filter keeping less than 1/this of the corpus is answered by an exact scan of its rows."""
RECALL_K = 10
RECALL_QUERIES = 1000
SCAN_ROWS = 65536
"""Rows per block of the streaming exact scan that measures recall (bounded memory)."""
RESCORE_FACTORS = {"none": 4, "int8": 4, "binary": 20}
"""``rescore_factor`` when the spec leaves it unset, by quantization. One bit per dimension
ranks candidates coarsely: at 50K clustered 384-d vectors (``bench/synthetic.py``, graph
defaults, 1000 fresh queries) binary's recall@10 is 0.57 with 4, 0.86 with 10, 0.97 with 16
and 0.995 with 20; int8's 0.86 with 1, 0.995 with 2 and 0.999 with 4. Without quantization
``k`` candidates are fetched whatever the factor (4 keeps the fingerprints of the versions
built before these defaults)."""


@dataclass(frozen=True)
class HnswSettings:
    """How the graph is built and searched (``spec.search.hnsw`` and ``quantization``)."""

    connectivity: int = 16
    ef_construction: int = 128
    ef_search: int = 64
    quantization: str = "none"
    rescore_factor: int | None = None
    """None: the quantization's default (:data:`RESCORE_FACTORS`); an explicit value wins."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {sorted(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.rescore_factor is None:
            object.__setattr__(self, "rescore_factor", RESCORE_FACTORS[self.quantization])

    def candidates(self, k: int) -> int:
        """Candidates fetched from the graph for ``k`` results."""
        return k * (int(self.rescore_factor or 1) if self.quantization != "none" else 1)

    def as_manifest(self) -> dict[str, Any]:
        return {"kind": "hnsw", **asdict(self)}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> HnswSettings:
        """The settings the spec asked for (what a version's fingerprint names)."""
        names = {"connectivity", "ef_construction", "ef_search", "quantization",
                 "rescore_factor"}
        return cls(**{key: value for key, value in entry.items() if key in names})

    @classmethod
    def served(cls, entry: dict[str, Any]) -> HnswSettings:
        """The settings to search with: the spec's, with ``ef_search`` as prepare raised it
        to reach ``minRecall`` (``ef_search_served``; the spec's where it did not)."""
        settings = cls.from_manifest(entry)
        return replace(settings, ef_search=int(entry.get("ef_search_served",
                                                         settings.ef_search)))


def _graph_vectors(vectors: np.ndarray, quantization: str) -> np.ndarray:
    """What the graph stores for these unit rows: float32 (usearch itself scales to int8),
    or the sign bits packed 8 to a byte for binary (compared by Hamming distance)."""
    if quantization == "binary":  # packbits keeps a transposed view's order: usearch needs rows
        return np.ascontiguousarray(np.packbits(vectors > 0, axis=1))
    return np.ascontiguousarray(vectors, dtype=np.float32)


def build_graph(embeddings: np.ndarray, settings: HnswSettings, path: Path,
                threads: int = 0) -> float:
    """Build the HNSW graph of the unit rows of ``embeddings`` and save it to ``path``.

    Returns:
        The seconds the build took.
    """
    from usearch.index import Index

    start = time.perf_counter()
    binary = settings.quantization == "binary"
    graph = Index(ndim=embeddings.shape[1], metric="hamming" if binary else "ip",
                  dtype=QUANTIZATIONS[settings.quantization],
                  connectivity=settings.connectivity,
                  expansion_add=settings.ef_construction, expansion_search=settings.ef_search)
    for begin in range(0, len(embeddings), SCAN_ROWS):  # bounded copies of a memmap
        block = embeddings[begin:begin + SCAN_ROWS]
        graph.add(np.arange(begin, begin + len(block), dtype=np.uint64),
                  _graph_vectors(block, settings.quantization), threads=threads)
    graph.save(str(path))
    return time.perf_counter() - start


class HnswSearcher:
    """Top-k over an HNSW graph, rescored with the float32 ``rows`` (``[count, dim]``).

    Args:
        path: the saved graph, memory-mapped (nothing is copied into the process).
        rows: unit-length float32 rows, memory-mapped or in memory.
    """

    def __init__(self, path: Path, rows: np.ndarray, settings: HnswSettings,
                 threads: int = 1) -> None:
        from usearch.index import Index

        graph = Index.restore(str(path), view=True)
        if graph is None:
            from tritonop_backend.artifacts import ArtifactError

            raise ArtifactError(f"{path} is not a usearch index")
        if len(graph) != len(rows):
            from tritonop_backend.artifacts import ArtifactError

            raise ArtifactError(f"{path} holds {len(graph)} vectors, the index {len(rows)}")
        self.graph, self.rows, self.settings, self.threads = graph, rows, settings, threads

    def candidates(self, queries: np.ndarray, count: int) -> list[np.ndarray]:
        """Up to ``count`` candidate ids per query row, from the graph."""
        count = min(count, len(self.rows))
        self.graph.expansion_search = max(self.settings.ef_search, count)
        found = self.graph.search(_graph_vectors(queries, self.settings.quantization), count,
                                  threads=self.threads)
        if not hasattr(found, "counts"):  # one query: usearch answers Matches, its hits only
            return [np.asarray(found.keys, dtype=np.int64)]
        return [found.keys[i, : found.counts[i]].astype(np.int64) for i in range(len(queries))]

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Ids and scores of the (approximately) best ``k`` rows per unit query row.

        Args:
            rows: search only these (sorted ids, a filter's matches).
        Returns:
            Per query, ids and their exact cosine scores, best first (ties: lower id).
        """
        total = len(self.rows)
        k = min(k, total if rows is None else len(rows))
        if k == 0:
            empty = np.zeros(0, dtype=np.int64)
            return [empty] * len(queries), [empty.astype(np.float32)] * len(queries)
        wanted = self.settings.candidates(k)
        if rows is not None and (len(rows) <= EXACT_FILTER_ROWS
                                 or len(rows) * MAX_OVERSAMPLE < total):
            return self._exact(queries, k, rows)
        if rows is not None:
            wanted = math.ceil(wanted * total / len(rows))
        ids_out, scores_out = [], []
        for query, found in zip(queries, self.candidates(queries, wanted), strict=True):
            if rows is not None:
                found = found[_member(found, rows)]
            if len(found) < k:  # the graph gave too few: this query, exactly
                ids, scores = self._exact(query[None], k, np.arange(total) if rows is None
                                          else rows)
                ids_out.append(ids[0])
                scores_out.append(scores[0])
                continue
            ids, scores = _rank(found, self._scores(found, query), k)
            ids_out.append(ids)
            scores_out.append(scores)
        return ids_out, scores_out

    def _scores(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, dtype=np.float32)
        order = np.argsort(ids)  # memory-mapped rows read in file order
        scores = np.empty(len(ids), dtype=np.float32)
        scores[order] = np.asarray(self.rows[ids[order]], dtype=np.float32) @ query
        return scores

    def _exact(self, queries: np.ndarray, k: int, rows: np.ndarray
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids_out, scores_out = [], []
        for begin in range(0, len(rows), SCAN_ROWS):
            block = rows[begin:begin + SCAN_ROWS]
            scores = np.asarray(self.rows[block], dtype=np.float32) @ queries.T
            for i in range(len(queries)):
                ids, best = _rank(block, scores[:, i], k)
                if begin:
                    ids, best = _rank(np.concatenate([ids_out[i], ids]),
                                      np.concatenate([scores_out[i], best]), k)
                    ids_out[i], scores_out[i] = ids, best
                else:
                    ids_out.append(ids)
                    scores_out.append(best)
        return ids_out, scores_out


def _member(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in the sorted ``rows``."""
    at = np.searchsorted(rows, ids)
    return (at < len(rows)) & (rows[np.minimum(at, len(rows) - 1)] == ids)


def _rank(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of ``ids`` by score, then by lower id (as the exact index orders)."""
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].astype(np.int64), scores[order].astype(np.float32)


def kth_best_scores(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact ``k``-th best cosine of each unit query over all unit rows, in one
    streaming pass over ``embeddings`` (memory: one block of rows times the queries)."""
    best = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    for begin in range(0, len(embeddings), SCAN_ROWS):
        block = np.asarray(embeddings[begin:begin + SCAN_ROWS], dtype=np.float32)
        scores = np.concatenate([best, queries @ block.T], axis=1)
        keep = min(k, scores.shape[1])
        best = -np.partition(-scores, keep - 1, axis=1)[:, :keep]
    return best.min(axis=1)


def measure_recall(searcher: HnswSearcher, embeddings: np.ndarray, k: int = RECALL_K,
                   sample: int = RECALL_QUERIES, seed: int = 0) -> tuple[float, int]:
    """Recall@k of the graph against the exact index, with corpus rows as queries.

    ``sample`` rows (all, where fewer), chosen by a fixed seed, are searched both ways. A
    returned row counts as found when its score reaches the exact ``k``-th best score, so
    a duplicate of a row the exact index returned (an equal score, another id) is not a
    miss. Self-queries find themselves; their other ``k - 1`` neighbours are the test.

    Returns:
        The mean recall and the number of queries it was measured on.
    """
    probe = RecallProbe(embeddings, k, sample, seed)
    return probe.recall(searcher), len(probe.queries)


class RecallProbe:
    """The sample :func:`measure_recall` searches, with its exact ``k``-th best scores
    computed once, so that several search settings can be measured against it."""

    def __init__(self, embeddings: np.ndarray, k: int = RECALL_K, sample: int = RECALL_QUERIES,
                 seed: int = 0) -> None:
        count = len(embeddings)
        self.k = min(k, count)
        chosen = np.arange(count) if count <= sample else np.sort(
            np.random.default_rng(seed).choice(count, sample, replace=False))
        self.queries = np.asarray(embeddings[chosen], dtype=np.float32)
        self.kth = kth_best_scores(embeddings, self.queries, self.k)

    def recall(self, searcher: HnswSearcher) -> float:
        """The searcher's mean recall@k over the sample."""
        k, found = self.k, 0
        for begin in range(0, len(self.queries), 256):
            _, scores = searcher.search(self.queries[begin:begin + 256], k)
            for row, got in enumerate(scores):
                found += min(k, int((got >= self.kth[begin + row] - 1e-6).sum()))
        return found / (k * len(self.queries))
