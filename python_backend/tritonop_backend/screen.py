"""An int8 screen in front of the exact scan: the exact top k at an int8 product's cost.

A float32 scan reads every vector for every batch of queries (20,000 x 384: 30 MB, 1-3 ms
on this project's 2-core AMD EPYC). The screen multiplies int8 copies of the queries and
vectors instead (a quarter of the bytes, packed once by ONNX Runtime: 0.1-0.3 ms for 1 to
8 queries), then scores only the few rows that can be in the top k exactly (summed in
float64, rounded to float32).

Why the result is exact. For a query ``q`` and a row ``c``, let ``Q`` and ``C`` be their
dequantized int8 copies, ``a = Q . C`` the screen's score and ``e = q . c`` the exact
one. Then ``|e - a| <= |q - Q| |c| + |Q| |c - C| <= eps``, with the norms of the
rounding errors measured (the rows' when the screen is built, the query's per query)
and a margin for float32's own rounding. If ``a_k`` is the k-th best screen score, k rows
have ``e >= a_k - eps``, so the k-th best exact score is at least that, and every row of
the exact top k (ties at its cut included) has ``a >= a_k - 2 eps``. Scoring those rows
exactly and sorting them gives the exact top k.

Rows are quantized to 7 bits (``[-63, 63]``, a scale per row) and queries to 8 (a
scale per query): ONNX Runtime multiplies uint8 by int8, and on x86 CPUs without VNNI its
kernel adds pairs of products in 16 bits, which 8-bit rows could overflow (255 x 127 x
2 > 32,767); 7-bit rows cannot (255 x 63 x 2 = 32,130). A probe at build time checks the
product against numpy's, so a kernel that still differs leaves the screen off.
"""

from __future__ import annotations

import logging

import numpy as np

from tritonop_backend.blas import constant_product

LOGGER = logging.getLogger(__name__)

ROW_LEVELS = 63
QUERY_LEVELS = 127
ZERO_POINT = 128
MARGIN = 1e-4
"""Added to the bound, in cosine: float32's rounding of the exact and the screen's
scores (at most ~2e-5 for 384 dimensions) with room to spare."""
GROUP = 8


class Int8Screen:
    """The rows of ``columns [dim, count]`` that can be in a query's exact top k.

    Args:
        columns: the scan's float32 matrix (one column per row of the corpus).
        threads: ONNX Runtime's threads for the int8 product.
    """

    def __init__(self, columns: np.ndarray, threads: int = 1) -> None:
        self.scales = np.empty(columns.shape[1], dtype=np.float32)
        self.rows = np.empty(columns.shape, dtype=np.int8)
        row_error = np.empty(columns.shape[1], dtype=np.float64)
        row_norm = np.empty(columns.shape[1], dtype=np.float64)
        for start in range(0, columns.shape[1], 65_536):  # bounded scratch memory
            part = slice(start, start + 65_536)
            block = columns[:, part]
            scales = np.abs(block).max(axis=0) / ROW_LEVELS
            scales[scales == 0] = 1.0
            self.scales[part] = scales
            quantized = np.rint(block / self.scales[part])
            self.rows[:, part] = quantized
            row_error[part] = np.linalg.norm(block - quantized * self.scales[part], axis=0)
            row_norm[part] = np.linalg.norm(block, axis=0)
        self.row_error = float(row_error.max())
        self.row_norm = float(row_norm.max())
        self._product = constant_product(self.rows, threads)

    @classmethod
    def build(cls, columns: np.ndarray, threads: int = 1) -> Int8Screen | None:
        """A screen of ``columns``; None where onnxruntime is missing or its int8 product
        differs from numpy's on a probe of extreme values."""
        dim = len(columns)
        extreme = np.repeat(np.array([[ROW_LEVELS, -ROW_LEVELS]], dtype=np.int8), dim, axis=0)
        probe = np.repeat(np.array([[QUERY_LEVELS], [-QUERY_LEVELS]]), dim, axis=1)
        product = constant_product(extreme, threads)
        if product is None:
            return None
        if not np.array_equal(product(_uint8(probe)), probe @ extreme.astype(np.int64)):
            LOGGER.warning("onnxruntime's int8 product differs from numpy's on this CPU: the "
                           "exact scan reads float32 vectors")
            return None
        return cls(columns, threads)

    def candidates(self, queries: np.ndarray, k: int) -> list[np.ndarray] | None:
        """Per query row (unit length, float32), the ascending ids of the rows that hold
        its exact top ``k`` and a few more; None where a query's scores are not finite."""
        steps = np.abs(queries).max(axis=1).astype(np.float64) / QUERY_LEVELS
        steps[steps == 0] = 1.0
        quantized = np.rint(queries / steps[:, None])
        dequantized = quantized * steps[:, None]
        bounds = (np.linalg.norm(queries - dequantized, axis=1) * self.row_norm
                  + np.linalg.norm(dequantized, axis=1) * self.row_error + MARGIN)
        # The screen's scores divided by the query's step: the order is the same.
        assert self._product is not None
        scores = self._product(_uint8(quantized)).astype(np.float32)
        scores *= self.scales
        cuts = kth_best(scores, k)
        if cuts is None:
            return None
        return [np.flatnonzero(row >= cut - 2 * bound / step)
                for row, cut, bound, step in zip(scores, cuts, bounds, steps, strict=True)]


def _uint8(quantized: np.ndarray) -> np.ndarray:
    """Quantized queries as the product takes them: uint8 around :data:`ZERO_POINT`."""
    return (quantized + ZERO_POINT).astype(np.uint8)


def at_least_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores [rows, n]``, a value that at least ``k`` of its scores reach:
    the k-th best of the maxima of :data:`GROUP`-score groups (``n >= 2 * GROUP * k``).

    Close to the k-th best score itself, and found in one pass over the scores instead
    of a selection (8 x 20,000 scores: ~0.1 ms against ~1.6 ms for ``argpartition``).
    """
    rows, count = scores.shape
    groups = count // GROUP
    maxima = scores[:, : groups * GROUP].reshape(rows, GROUP, groups).max(axis=1)
    return np.partition(maxima, groups - k, axis=1)[:, groups - k]


def kth_best(scores: np.ndarray, k: int) -> np.ndarray | None:
    """The k-th best score of each row; None where a row has fewer than k scores at or
    above :func:`at_least_k`'s value (NaN scores)."""
    cuts = []
    for row, floor in zip(scores, at_least_k(scores, k), strict=True):
        above = row[row >= floor]
        if len(above) < k:
            return None
        cuts.append(np.partition(above, len(above) - k)[len(above) - k])
    return np.array(cuts, dtype=scores.dtype)
