"""Synthetic corpora at scale, and the checks the scale scenarios hold results to.

Embedding 10M texts takes hours here, so SCALE and FILTER search vectors drawn like real
embeddings. "Like" is measured, on the news example's 20,000 real MiniLM embeddings: the
local intrinsic dimensionality (LID, the maximum-likelihood estimate over a row's 20
nearest neighbours), which is what makes nearest-neighbour search hard (Aumüller and
Ceccarello, "The role of local intrinsic dimensionality in benchmarking nearest neighbor
search"), and the cosines of the 1st, 10th, 100th and 1000th neighbours:

====================================  =====  ================================
vectors (20,000; 500 rows as queries)  LID   cosine of neighbour 1/10/100/1000
====================================  =====  ================================
real (the news corpus, MiniLM)         16.9  0.70 / 0.53 / 0.40 / 0.26
this generator                         16.3  0.67 / 0.55 / 0.36 / 0.22
isotropic clusters (before 2026-12)    67.7  0.58 / 0.54 / 0.49 / --
====================================  =====  ================================

Real embeddings vary along few directions near a row; Gaussian noise in all 384 does not,
and its LID (68 at 20K rows, 101 at 3,200 rows a cluster) made the graph indexes' recall
a property of the noise, not of the index. So a row here is a cluster's centre plus
noise mostly in a low-rank subspace of its own (rank :data:`RANK`, norm :data:`SPREAD`)
and a little in every dimension (:data:`FLOOR`); and the centres themselves are drawn the
same way around about sqrt(clusters) topics (:data:`CENTRE_SPREAD`,
:data:`CENTRE_FLOOR`), since real topics are related where random unit centres would all
be orthogonal, and a graph could not tell which way another cluster lies.

Rows are generated block by block into a memory-mapped safetensors file (the index's
``embeddings.safetensors``), so 10M x 384 float32 (15 GB) never exists twice, nor once in
this process's memory: the page cache holds what is touched. Block ``b`` is drawn from the
seed ``[seed, b]``, so the same seed gives the same rows whatever else ran before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 65536
"""Rows generated at a time (and the unit of the per-block seeds)."""
RANK = 16
"""Dimensions of each cluster's own subspace, where most of its rows' noise lies."""
SPREAD = 1.2
"""Norm of a row's noise in its cluster's subspace (a unit centre: rows of one cluster
are about cos 0.4 apart, neighbours 0.55-0.7)."""
FLOOR = 0.65
"""Norm of a row's noise spread over every dimension."""
CENTRE_SPREAD, CENTRE_FLOOR = 0.6, 0.4
"""The same two norms for the centres around their topics."""
GENERATOR = "low-rank-2"
"""Names this generator in results, so that figures from the isotropic one are not mixed
with its own."""


def cluster_count(count: int) -> int:
    """Clusters for ``count`` rows: about sqrt(count) (3,162 of ~3,200 rows at 10M)."""
    return max(1, round(count ** 0.5))


@dataclass(frozen=True)
class Mixture:
    """Where rows come from: per cluster a unit centre, a subspace (``[rank, dim]``, rows
    of about unit norm) and a width (0.7-1.3, as real topics are more or less broad)."""

    centres: np.ndarray
    bases: np.ndarray
    widths: np.ndarray

    def rows(self, rng: np.random.Generator, count: int, spread: float = SPREAD,
             floor: float = FLOOR) -> np.ndarray:
        """``count`` unit rows, each a random cluster's centre plus its noise, normalised."""
        clusters, rank, dim = self.bases.shape
        if count == 0:
            return np.zeros((0, dim), np.float32)
        chosen = rng.integers(0, clusters, count)
        weights = rng.standard_normal((count, rank), dtype=np.float32)
        weights *= np.float32(spread / np.sqrt(rank))
        rows = rng.standard_normal((count, dim), dtype=np.float32)
        rows *= np.float32(floor / np.sqrt(dim))
        rows += self.centres[chosen]
        order = np.argsort(chosen, kind="stable")  # one product per cluster present
        bounds = np.flatnonzero(np.diff(chosen[order])) + 1
        for group in np.split(order, bounds):
            cluster = chosen[group[0]]
            rows[group] += (weights[group] * self.widths[cluster]) @ self.bases[cluster]
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows


def _mixture(rng: np.random.Generator, centres: np.ndarray) -> Mixture:
    clusters, dim = centres.shape
    bases = rng.standard_normal((clusters, RANK, dim), dtype=np.float32)
    bases *= np.float32(1 / np.sqrt(dim))
    return Mixture(centres, bases, rng.uniform(0.7, 1.3, clusters).astype(np.float32))


def mixture(seed: int, clusters: int, dim: int) -> Mixture:
    """The mixture of ``clusters`` clusters: their centres drawn around ~sqrt(clusters)
    random unit topics, as rows are drawn around centres."""
    rng = np.random.default_rng([seed, 0])
    topics = rng.standard_normal((cluster_count(clusters), dim), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    centres = _mixture(rng, topics).rows(rng, clusters, CENTRE_SPREAD, CENTRE_FLOOR)
    return _mixture(rng, centres)


def fill_clustered(out: np.ndarray, seed: int, clusters: int | None = None) -> None:
    """Fill ``out`` (``[count, dim]``, a memmap or an array) with the mixture's rows."""
    count, dim = out.shape
    source = mixture(seed, clusters or cluster_count(count), dim)
    for block, begin in enumerate(range(0, count, BLOCK)):
        rows = min(BLOCK, count - begin)
        out[begin:begin + rows] = source.rows(np.random.default_rng([seed, 1, block]), rows)


def clustered_queries(seed: int, count: int, rows: int, dim: int) -> np.ndarray:
    """Queries from the mixture of a ``rows``-row corpus of this seed (fresh draws, not
    corpus rows: a query is near a cluster, not a copy of a stored vector)."""
    return mixture(seed, cluster_count(rows), dim).rows(np.random.default_rng([seed, 2]),
                                                         count)


def create_embeddings(path: Path, count: int, dim: int) -> np.ndarray:
    """A safetensors file holding one float32 tensor ``embeddings [count, dim]``, as
    :func:`tritonop_backend.search.write_index` writes it, returned as a writable memmap
    of its data (the header is written first, the data where the memmap is written)."""
    header = json.dumps({"embeddings": {"dtype": "F32", "shape": [count, dim],
                                        "data_offsets": [0, 4 * count * dim]}}).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        out.truncate(8 + len(header) + 4 * count * dim)
    return np.memmap(path, dtype="<f4", mode="r+", offset=8 + len(header), shape=(count, dim))


def write_ids(directory: Path, count: int) -> None:
    """The texts of a synthetic index in ``directory``: row ``i``'s text is ``"v<i>"``
    (written as :func:`tritonop_backend.text_column.write_texts` writes them)."""
    from tritonop_backend.text_column import write_texts

    write_texts(directory, (f"v{i}" for i in range(count)))


def recall_at_k(found_scores: list[np.ndarray], kth_best: np.ndarray, k: int) -> float:
    """Mean recall@k of search results against the exact index.

    ``found_scores``: per query, the exact cosines of the rows returned (the approximate
    index rescored them in float32); ``kth_best``: per query, the exact ``k``-th best
    cosine over the whole corpus. A returned row counts when it reaches that score, so a
    row tied with an exact result (a duplicate, another id) is not a miss.
    """
    if not len(kth_best):
        raise ValueError("recall of no queries")
    hits = sum(min(k, int((np.asarray(scores) >= kth - 1e-5).sum()))
               for scores, kth in zip(found_scores, kth_best, strict=True))
    return hits / (k * len(kth_best))


def filtered_scan(matrix: np.ndarray, rows: np.ndarray, query: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the ``k`` best of the sorted ``rows`` of ``matrix`` by cosine with the
    unit ``query``, best first, ties to the lower id (the exact index's order)."""
    scores = np.asarray(matrix[rows], dtype=np.float32) @ query
    order = np.lexsort((rows, -scores))[:k]
    return rows[order].astype(np.int64), scores[order]


def same_results(ids: np.ndarray, scores: np.ndarray, expected_ids: np.ndarray,
                 expected_scores: np.ndarray) -> bool:
    """Whether served results equal the brute-force ones: the same ids in the same order,
    scores within float32 rounding of a different summation order."""
    return (np.array_equal(np.asarray(ids, dtype=np.int64), expected_ids)
            and np.allclose(scores, expected_scores, atol=1e-5))
