"""The exact scan's product: the index's matrix packed once by ONNX Runtime; for other
matrices torch's where numpy's OpenBLAS falls back to a generic kernel, one query at a time
where its batches cost what their queries do."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import tritonop_backend.blas as blas
from tritonop_backend.blas import (
    blas_product,
    constant_product,
    fallback_kernel,
    numpy_kernels,
    numpy_product,
    packed_product,
    scan_graph,
    scan_product,
)
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


@pytest.mark.parametrize(("one", "eight", "expected"), [
    (1.0, 7.0, "numpy, one query at a time below 7"),  # this AMD EPYC's OpenBLAS
    (1.0, 20.0, "numpy, one query at a time below 8"),  # only measured up to 8
    (1.0, 2.0, "numpy"),  # a batch read once: left alone
])
def test_a_product_that_batches_poorly_goes_one_query_at_a_time(monkeypatch, one, eight,
                                                                 expected):
    monkeypatch.setattr(blas, "fallback_kernel", lambda flags, kernels: None)
    monkeypatch.setattr(blas, "seconds", lambda columns, queries: {1: one, 8: eight}[queries])
    rng = np.random.default_rng(5)
    columns = rng.standard_normal((16, 300)).astype(np.float32)
    product, name = blas_product(threads=1, columns=columns)
    assert name == expected
    for count in range(1, 11):  # below the limit one at a time, from it numpy's batch
        queries = rng.standard_normal((count, 16)).astype(np.float32)
        found = product(queries, columns)
        assert found.dtype == np.float32 and found.shape == (count, 300)
        np.testing.assert_allclose(found, queries @ columns, rtol=1e-5, atol=1e-5)


def test_an_index_loaded_from_disk_ranks_as_numpy_whatever_product_it_times(tmp_path):
    from tritonop_backend.artifacts import IndexManifest
    from tritonop_backend.search import load_index, write_index

    rng = np.random.default_rng(4)
    rows = rng.standard_normal((3000, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert blas.seconds(np.ascontiguousarray(rows.T), 2) > 0
    manifest = IndexManifest("m", "f", "mean", 16, 32, len(rows), "x")
    write_index(tmp_path, rows, [f"text {i}" for i in range(len(rows))], manifest)
    index, _ = load_index(tmp_path)
    assert index.product_name == scan_product(1, index.columns)[1] or \
        index.product_name.startswith("numpy")  # timed twice: may differ on a busy machine
    for count in (1, 3, 9):
        queries = rows[:count] + 0.01
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        expected = np.argsort(-(unit @ rows.T), axis=1, kind="stable")[:, :5]
        assert index.search(queries, 5).ids.tolist() == expected.tolist()


@pytest.mark.parametrize(("packed_bytes", "expected"), [
    (blas.PACKED_BYTES, "onnxruntime, packed once"),
    (8 * 8 * 4 - 1, "numpy, one query at a time below 7"),  # past the limit: not packed
])
def test_the_loaded_index_names_its_product(monkeypatch, tmp_path, packed_bytes, expected):
    from tritonop_backend.artifacts import IndexManifest
    from tritonop_backend.search import load_index, write_index

    monkeypatch.setattr(blas, "fallback_kernel", lambda flags, kernels: None)
    monkeypatch.setattr(blas, "seconds", lambda columns, queries: {1: 1.0, 8: 7.0}[queries])
    monkeypatch.setattr(blas, "PACKED_BYTES", packed_bytes)
    rows = np.eye(8, dtype=np.float32)
    write_index(tmp_path, rows, [str(i) for i in range(8)],
                IndexManifest("m", "f", "mean", 16, 8, 8, "x"))
    index, _ = load_index(tmp_path)
    assert index.product_name == expected
    assert index.search(rows[[2, 5]], 1).ids.tolist() == [[2], [5]]
    assert index.search(rows[[2, 5]], 1, rows=np.array([1, 5])).ids.tolist() == [[1], [5]]


def test_without_onnxruntime_the_scan_keeps_a_blas_product(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    monkeypatch.setattr(blas, "fallback_kernel", lambda flags, kernels: None)
    monkeypatch.setattr(blas, "seconds", lambda columns, queries: 1.0)
    columns = np.ones((4, 10), dtype=np.float32)
    assert packed_product(columns, 1, numpy_product) is None
    assert scan_product(1, columns) == (numpy_product, "numpy")


@pytest.mark.parametrize("integer", [False, True])
def test_the_scan_graph_is_the_model_onnx_writes(integer):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    kinds = ((TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if integer
             else (TensorProto.FLOAT,) * 3)
    columns = TensorProto(name="columns", data_type=kinds[1], dims=[384, 20000],
                          data_location=TensorProto.EXTERNAL)
    columns.external_data.add(key="location", value="columns")
    initializers = [columns]
    operands = ["queries", "columns"]
    if integer:
        initializers.append(helper.make_tensor("queries_zero_point", TensorProto.UINT8, [],
                                               b"\x80", raw=True))
        operands.append("queries_zero_point")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger" if integer else "MatMul", operands, ["scores"])],
        "scan",
        [helper.make_tensor_value_info("queries", kinds[0], ["queries", 384])],
        [helper.make_tensor_value_info("scores", kinds[2], ["queries", 20000])],
        initializers)
    expected = helper.make_model(graph, ir_version=8,
                                 opset_imports=[helper.make_operatorsetid("", 17)])
    assert onnx.load_from_string(scan_graph(384, 20000, integer=integer)) == expected


def test_the_int8_product_equals_numpy_at_the_extremes():
    """7-bit columns, as the screen makes them (8-bit ones could overflow the 16-bit sums
    of a CPU without VNNI), by 8-bit queries: exact int32 everywhere."""
    pytest.importorskip("onnxruntime")
    columns = np.random.default_rng(8).integers(-63, 64, (384, 500))
    columns[:, :2] = [63, -63]  # every product at its largest
    queries = np.random.default_rng(9).integers(-127, 128, (5, 384))
    queries[0], queries[1] = 127, -127
    found = constant_product(columns.astype(np.int8), threads=1)(
        (queries + 128).astype(np.uint8))
    assert found.dtype == np.int32
    np.testing.assert_array_equal(found, queries @ columns)


def test_the_packed_product_equals_numpy_and_hands_other_matrices_on():
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((3000, 48)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    columns = np.ascontiguousarray(rows.T)
    handed_on = []

    def other(queries, matrix):
        handed_on.append(matrix.shape)
        return numpy_product(queries, matrix)

    product = packed_product(columns, 1, other)
    for count in (1, 2, 5, 8, 17):
        queries = rng.standard_normal((count, 48)).astype(np.float32)
        found = product(queries, columns)
        assert found.dtype == np.float32 and found.shape == (count, 3000)
        np.testing.assert_allclose(found, queries @ columns, atol=1e-5)
    assert handed_on == [(48, 3000)]  # one query: numpy's reads the plain matrix faster
    gathered = np.ascontiguousarray(columns[:, :40])  # a filter's rows: not the packed matrix
    np.testing.assert_allclose(product(rows[:3], gathered), rows[:3] @ gathered, atol=1e-6)
    assert handed_on == [(48, 3000), (48, 40)]
