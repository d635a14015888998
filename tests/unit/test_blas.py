"""The exact scan's product: torch's where numpy's OpenBLAS falls back to a generic kernel."""

from __future__ import annotations

import numpy as np
import pytest

import tritonop_backend.blas as blas
from tritonop_backend.blas import fallback_kernel, numpy_kernels, numpy_product, scan_product
from tritonop_backend.search import CorpusIndex


@pytest.mark.parametrize(("flags", "kernels", "expected"), [
    ({"sse3", "avx", "avx2", "avx512f"}, ["Prescott"], "Prescott"),  # a CPU it does not know
    ({"avx2"}, ["Sandybridge"], "Sandybridge"),
    ({"avx2", "avx512f"}, ["SkylakeX"], None),
    ({"avx2"}, ["Haswell"], None),
    ({"avx2"}, ["Zen"], None),
    ({"sse3"}, ["Prescott"], None),  # an old CPU: the generic kernel is its best
    ({"avx2"}, [], None),  # numpy on another BLAS (MKL, Accelerate): left alone
])
def test_a_fallback_is_a_kernel_narrower_than_an_avx2_cpu(flags, kernels, expected):
    assert fallback_kernel(flags, kernels) == expected


def test_numpy_kernels_names_the_kernel_of_this_process():
    kernels = numpy_kernels()
    assert all(isinstance(kernel, str) and kernel for kernel in kernels)


def test_the_chosen_product_equals_numpy_and_ranks_as_a_brute_force(monkeypatch):
    product, name = scan_product(threads=1)
    assert name in ("numpy", "torch")
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((5000, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = rng.standard_normal((7, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    columns = np.ascontiguousarray(rows.T)
    expected = queries @ columns
    np.testing.assert_allclose(product(queries, columns), expected, atol=1e-6)
    found = CorpusIndex(rows, [str(i) for i in range(len(rows))], product=product).search(
        queries, 10)
    for row, ids in zip(expected, found.ids, strict=True):
        order = np.argsort(-row, kind="stable")
        if row[order[9]] - row[order[10]] > 1e-5:  # the tenth place is decided
            assert ids.tolist() == order[:10].tolist()
    # The torch product as well, wherever this test runs (as on a CPU OpenBLAS misses).
    monkeypatch.setattr(blas, "fallback_kernel", lambda flags, kernels: "Prescott")
    torch_product, name = scan_product(threads=1)
    assert name == "torch" and torch_product is not numpy_product
    np.testing.assert_allclose(torch_product(queries, columns), expected, atol=1e-6)
