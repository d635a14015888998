"""The exact scan's matrix product, on a BLAS that knows this CPU.

numpy's wheels (1.26, which the local tritonserver pins) carry OpenBLAS 0.3.23, which
picks its kernels by CPU model. On a CPU newer than it knows it falls back to its generic
SSE3 kernel ("Prescott"): on an Intel Xeon of family 6 model 207 (AVX-512, AMX), 8 queries
over 20,000 rows of 384 floats took 16 ms on one thread, and torch's product (MKL, which
dispatches on the CPU's features) 2.2 ms; one query 5.2 against 1.3 ms. Where numpy's
OpenBLAS runs such a fallback on a CPU with AVX2, and torch is installed (the encoder and
the LLM use it), the scan multiplies with torch; everywhere else with numpy.

A few queries at once are another weak spot, whatever the kernel: OpenBLAS packs the whole
``[dim, count]`` matrix for a product of two queries or more, so on this project's AMD EPYC
(Zen 4) 20,000 x 384 took 0.8 ms for one query and 4.5-5.6 ms for two to eight. One query
at a time reads the matrix without packing it. So an index, when loaded, times numpy's
product for one query and for 8 (:func:`scan_product`), and where 8 cost over 4x one,
batches smaller than their ratio multiply one query at a time (:func:`one_at_a_time`).

Better still is to pack the matrix once, when the index loads: ONNX Runtime's products
(MLAS) pack a constant operand when a session is created and read the packed copy at every
call. On the AMD EPYC, 20,000 x 384 with 2, 4, 8 and 16 queries took 1.3, 1.6, 2.0 and
3.0 ms packed once against 1.8, 3.8, 7.8 and 14 ms one query at a time (and 7-10 ms
numpy's batch). So where onnxruntime is installed (the ONNX encoders use it) and the
matrix is at most :data:`PACKED_BYTES`, batches multiply by its packed copy
(:func:`packed_product`); the products above remain for one query (numpy's reads the
plain matrix ~25% faster than the packed one), for other matrices (a filter's gathered
rows) and for larger ones, where a second copy would cost too much memory.

Each of these is a float32 product of the same numbers: they differ in the last bits of a
score (the order of the sums), as two BLAS builds do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)

Product = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(queries [q, dim], columns [dim, n]) -> float32 [q, n]``."""

TIMED_QUERIES = 8
TIMED_COLUMNS = 20_000
BATCH_SLOWDOWN = 4.0
"""Where numpy's product of 8 queries takes over this many times one query's, smaller
batches go one query at a time (a product that reads the matrix once per batch takes
1.5-2.5x; numpy's OpenBLAS here took 7x)."""

PACKED_BYTES = 256 << 20
"""The largest matrix packed once (its copy costs as much memory again): 174,762 rows of
384 float32s."""

VECTOR_KERNELS = frozenset({"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"})
"""OpenBLAS kernels that use AVX2 or wider: any other on an AVX2 CPU is a fallback."""


def numpy_product(queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
    return queries @ columns


def fallback_kernel(cpu_flags: set[str], kernels: list[str]) -> str | None:
    """The first of numpy's OpenBLAS ``kernels`` narrower than an AVX2 CPU's vectors."""
    if "avx2" not in cpu_flags:
        return None
    return next((kernel for kernel in kernels if kernel.lower() not in VECTOR_KERNELS), None)


def numpy_kernels() -> list[str]:
    """The kernels numpy's OpenBLAS picked in this process (none for another BLAS)."""
    from threadpoolctl import threadpool_info

    return [info.get("architecture") or "" for info in threadpool_info()
            if info.get("internal_api") == "openblas" and "numpy" in info.get("filepath", "")]


def scan_product(threads: int = 1, columns: np.ndarray | None = None) -> tuple[Product, str]:
    """The product the exact scan uses here, and its name.

    Args:
        threads: the threads of torch's or ONNX Runtime's product, where they multiply.
        columns: the scan's ``[dim, count]`` matrix: packed once where it can be
            (``onnxruntime, packed once``); numpy's product is timed on it, and where a
            batch costs it about what as many single queries do, small batches go one
            query at a time (``numpy, one query at a time below N``) whenever the product
            is not of the packed matrix.
    """
    product, name = blas_product(threads, columns)
    if columns is None or columns.nbytes > PACKED_BYTES:
        return product, name
    packed = packed_product(columns, threads, product)
    if packed is None:
        return product, name
    return packed, "onnxruntime, packed once"


def blas_product(threads: int = 1, columns: np.ndarray | None = None) -> tuple[Product, str]:
    """:func:`scan_product`'s choice for any matrix: numpy's, one query at a time below a
    ratio, or torch's."""
    kernel = fallback_kernel(_cpu_flags(), numpy_kernels())
    if kernel is None:
        if columns is None:
            return numpy_product, "numpy"
        one, batch = seconds(columns, 1), seconds(columns, TIMED_QUERIES)
        if batch <= BATCH_SLOWDOWN * one:
            return numpy_product, "numpy"
        below = min(TIMED_QUERIES, int(batch / one))
        LOGGER.info("numpy's product takes %.1f ms for 1 query and %.1f ms for %d: the scan "
                    "multiplies fewer than %d one at a time", one * 1e3, batch * 1e3,
                    TIMED_QUERIES, below)
        return one_at_a_time(below), f"numpy, one query at a time below {below}"
    try:
        import torch
    except ImportError:
        LOGGER.warning("numpy's OpenBLAS runs its generic %s kernel on this CPU and torch is "
                       "not installed: the exact scan runs several times slower", kernel)
        return numpy_product, "numpy"
    torch.set_num_threads(threads)
    LOGGER.warning("numpy's OpenBLAS runs its generic %s kernel on this CPU: the exact scan "
                "multiplies with torch", kernel)

    def torch_product(queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            product = torch.from_numpy(np.ascontiguousarray(queries)) @ torch.from_numpy(columns)
        result: np.ndarray = product.numpy()
        return result

    return torch_product, "torch"


def packed_product(columns: np.ndarray, threads: int, other: Product) -> Product | None:
    """ONNX Runtime's product of two queries or more by ``columns``, packed once now;
    ``other`` multiplies one query and any other matrix. None where onnxruntime is not
    installed."""
    run = constant_product(columns, threads)
    if run is None:
        return None

    def product(queries: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        if matrix is not columns or len(queries) < 2:
            return other(queries, matrix)
        return run(np.ascontiguousarray(queries, dtype=np.float32))

    return product


def constant_product(columns: np.ndarray, threads: int
                     ) -> Callable[[np.ndarray], np.ndarray] | None:
    """``queries -> queries @ columns`` in ONNX Runtime, ``columns`` packed once now; None
    where onnxruntime is not installed.

    float32 ``columns`` take float32 queries (``MatMul``); int8 ``columns`` take uint8
    queries that stand for ``value - 128`` and give int32 (``MatMulInteger``). The
    session's graph is one product whose second operand is ``columns`` itself, handed over
    as an external initializer (no copy of it in the graph); ``columns`` must stay
    unchanged while the product is used.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_external_initializers([_COLUMNS], [ort.OrtValue.ortvalue_from_numpy(columns)])
    graph = scan_graph(*columns.shape, integer=columns.dtype == np.int8)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(queries: np.ndarray) -> np.ndarray:
        scores: np.ndarray = session.run(None, {_QUERIES: queries})[0]
        return scores

    return run


_QUERIES, _COLUMNS, _SCORES, _ZERO = "queries", "columns", "scores", "queries_zero_point"


def scan_graph(dim: int, count: int, integer: bool = False) -> bytes:
    """The ONNX model ``scores = queries [q, dim] @ columns [dim, count]``, serialized.

    ``columns`` is an initializer whose data is external (:func:`constant_product`
    supplies it). ``integer``: uint8 queries around a zero point of 128, int8 columns,
    int32 scores. Written field by field in protobuf's wire format, because the serving
    image holds onnxruntime but not the ``onnx`` package (the tests parse it with ``onnx``).
    """
    queries_type, columns_type, scores_type = ((_UINT8, _INT8, _INT32) if integer
                                               else (_FLOAT, _FLOAT, _FLOAT))

    def tensor_type(element: int, *dims: bytes) -> bytes:  # TypeProto: a tensor
        shape = _message(2, b"".join(_message(1, dim) for dim in dims))
        return _message(2, _message(1, _varint(1, element) + shape))

    operands = _text(1, _QUERIES) + _text(1, _COLUMNS) + (_text(1, _ZERO) if integer else b"")
    node = _message(1, operands + _text(2, _SCORES)
                    + _text(4, "MatMulInteger" if integer else "MatMul"))
    initializers = _message(5, _varint(1, dim) + _varint(1, count) + _varint(2, columns_type)
                            + _text(8, _COLUMNS)
                            + _message(13, _text(1, "location") + _text(2, _COLUMNS))
                            + _varint(14, 1))  # data_location: EXTERNAL
    if integer:  # a scalar: no dims; raw_data one byte
        initializers += _message(5, _varint(2, _UINT8) + _text(8, _ZERO) + _message(9, b"\x80"))
    queries = _message(11, _text(1, _QUERIES) + tensor_type(queries_type, _text(2, _QUERIES),
                                                            _varint(1, dim)))
    scores = _message(12, _text(1, _SCORES) + tensor_type(scores_type, _text(2, _QUERIES),
                                                          _varint(1, count)))
    graph = node + _text(2, "scan") + initializers + queries + scores
    opset = _text(1, "") + _varint(2, 17)  # the default domain, version 17
    return _varint(1, 8) + _message(8, opset) + _message(7, graph)  # IR version 8


_FLOAT, _UINT8, _INT8, _INT32 = 1, 2, 3, 6  # TensorProto's data types


def _varint(field: int, value: int) -> bytes:
    return _uvarint(field << 3) + _uvarint(value)


def _message(field: int, payload: bytes) -> bytes:
    return _uvarint(field << 3 | 2) + _uvarint(len(payload)) + payload


def _text(field: int, text: str) -> bytes:
    return _message(field, text.encode())


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def one_at_a_time(below: int) -> Product:
    """numpy's product, one query at a time for fewer than ``below`` queries."""

    def product(queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        if len(queries) >= below:
            return numpy_product(queries, columns)
        scores = np.empty((len(queries), columns.shape[1]), dtype=np.float32)
        for row, query in enumerate(queries):
            np.matmul(query, columns, out=scores[row])
        return scores

    return product


def seconds(columns: np.ndarray, queries: int) -> float:
    """The best of three numpy products of ``queries`` queries with the first
    :data:`TIMED_COLUMNS` columns (a few milliseconds each)."""
    sample = columns[:, :TIMED_COLUMNS]
    batch = np.random.default_rng(0).standard_normal((queries, len(columns)), np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        numpy_product(batch, sample)
        best = min(best, time.perf_counter() - start)
    return best


def _cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
