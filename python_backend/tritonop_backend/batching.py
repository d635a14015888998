"""Helpers to turn Triton's list of requests into one tensor operation and back.

The dynamic batcher hands a Python model a list of requests, each with its own
``[rows, length, ...]`` tensors; lengths differ between requests (inputs are declared
``allow_ragged_batch``). Padding them to a common length and stacking them lets the
model run once per batch instead of once per request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_and_stack(arrays: Sequence[np.ndarray], pad_value: float = 0) -> np.ndarray:
    """Stack ``[rows_i, length_i, ...]`` arrays into ``[sum(rows), max(length), ...]``.

    Positions past each array's own length are filled with ``pad_value``.
    """
    if not arrays:
        raise ValueError("pad_and_stack needs at least one array")
    length = max(a.shape[1] for a in arrays)
    rows = sum(a.shape[0] for a in arrays)
    out = np.full((rows, length, *arrays[0].shape[2:]), pad_value, dtype=arrays[0].dtype)
    start = 0
    for a in arrays:
        out[start : start + a.shape[0], : a.shape[1]] = a
        start += a.shape[0]
    return out


def split_rows(stacked: np.ndarray, like: Sequence[np.ndarray], trim: bool) -> list[np.ndarray]:
    """Undo :func:`pad_and_stack`: give each request its own rows back.

    Args:
        stacked: ``[sum(rows), ...]`` result of a batched operation.
        like: the per-request arrays that were stacked, for their row counts and lengths.
        trim: also cut axis 1 back to each request's own length.
    """
    parts = []
    start = 0
    for a in like:
        part = stacked[start : start + a.shape[0]]
        if trim:
            part = part[:, : a.shape[1]]
        parts.append(part)
        start += a.shape[0]
    return parts
