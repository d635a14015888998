"""The exact scan's matrix product, on a BLAS that knows this CPU.

numpy's wheels (1.26, which the local tritonserver pins) carry OpenBLAS 0.3.23, which
picks its kernels by CPU model. On a CPU newer than it knows it falls back to its generic
SSE3 kernel ("Prescott"): on an Intel Xeon of family 6 model 207 (AVX-512, AMX), 8 queries
over 20,000 rows of 384 floats took 16 ms on one thread, and torch's product (MKL, which
dispatches on the CPU's features) 2.2 ms; one query 5.2 against 1.3 ms. Where numpy's
OpenBLAS runs such a fallback on a CPU with AVX2, and torch is installed (the encoder and
the LLM use it), the scan multiplies with torch; everywhere else with numpy, as before.
Both are float32 products of the same numbers: they differ in the last bits of a score
(the order of the sums), as two BLAS builds do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)

Product = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(queries [q, dim], columns [dim, n]) -> float32 [q, n]``."""

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


def scan_product(threads: int = 1) -> tuple[Product, str]:
    """The product the exact scan uses here, and its name (``numpy`` or ``torch``)."""
    kernel = fallback_kernel(_cpu_flags(), numpy_kernels())
    if kernel is None:
        return numpy_product, "numpy"
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


def _cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
