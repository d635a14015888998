"""Synthetic corpora at scale, and the checks the scale scenarios hold results to.

Embedding 10M texts takes hours here, so SCALE and FILTER search vectors drawn like real
embeddings: a Gaussian mixture around random unit centroids, each row normalised. With
noise of ``spread / sqrt(dim)`` per dimension a row's cosine to its centroid is about
``1 / sqrt(1 + spread^2)`` (0.7 at the default spread 1), two rows of one cluster about
0.5, rows of different clusters about 0: the neighbourhoods an HNSW graph must find, where
uniform random vectors have none (every neighbour nearly as far as any other row).

Rows are generated block by block into a memory-mapped safetensors file (the index's
``embeddings.safetensors``), so 10M x 384 float32 (15 GB) never exists twice, nor once in
this process's memory: the page cache holds what is touched. Block ``b`` is drawn from the
seed ``[seed, b]``, so the same seed gives the same rows whatever else ran before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BLOCK = 65536
"""Rows generated at a time (and the unit of the per-block seeds)."""
SPREAD = 1.0


def cluster_count(count: int) -> int:
    """Clusters for ``count`` rows: about sqrt(count) (3,162 of ~3,200 rows at 10M)."""
    return max(1, round(count ** 0.5))


def mixture(seed: int, clusters: int, dim: int, spread: float = SPREAD
            ) -> tuple[np.ndarray, np.ndarray]:
    """The mixture's centres (``clusters`` random unit vectors) and each cluster's noise
    per dimension: its own width, 0.7-1.3 x ``spread``, as real topics are more or less
    broad."""
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    widths = rng.uniform(0.7, 1.3, clusters).astype(np.float32) * np.float32(
        spread / np.sqrt(dim))
    return centres, widths


def mixture_rows(centres: np.ndarray, widths: np.ndarray, rng: np.random.Generator,
                 count: int) -> np.ndarray:
    """``count`` unit rows, each a random cluster's centre plus its noise, normalised."""
    clusters, dim = centres.shape
    chosen = rng.integers(0, clusters, count)
    rows = rng.standard_normal((count, dim), dtype=np.float32)
    rows *= widths[chosen, None]
    rows += centres[chosen]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def fill_clustered(out: np.ndarray, seed: int, clusters: int | None = None) -> None:
    """Fill ``out`` (``[count, dim]``, a memmap or an array) with the mixture's rows."""
    count, dim = out.shape
    centres, widths = mixture(seed, clusters or cluster_count(count), dim)
    for block, begin in enumerate(range(0, count, BLOCK)):
        rows = min(BLOCK, count - begin)
        out[begin:begin + rows] = mixture_rows(centres, widths,
                                               np.random.default_rng([seed, 1, block]), rows)


def clustered_queries(seed: int, count: int, rows: int, dim: int) -> np.ndarray:
    """Queries from the mixture of a ``rows``-row corpus of this seed (fresh draws, not
    corpus rows: a query is near a cluster, not a copy of a stored vector)."""
    return mixture_rows(*mixture(seed, cluster_count(rows), dim),
                        np.random.default_rng([seed, 2]), count)


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
