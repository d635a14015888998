"""Fixtures shared by the unit tests of the LLM engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol(smol_dir: Path):  # -> LoadedModel; imported lazily, torch is slow to import
    """SmolLM2-135M-Instruct in float32 on the CPU, loaded once per session."""
    from tritonop_backend.llm.loading import load_causal_lm

    return load_causal_lm(smol_dir, "float32", "cpu")


@pytest.fixture(scope="session")
def smol_bf16(smol_dir: Path):  # -> LoadedModel
    """SmolLM2 in bfloat16 as the engine serves it on a CPU (linear layers packed, grouped
    decode attention); only for tests that skip where the CPU has no native bfloat16."""
    import torch

    from tritonop_backend.llm.loading import load_causal_lm

    loaded = load_causal_lm(smol_dir, "bfloat16", "cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.note is None
    return loaded


@pytest.fixture(scope="session")
def smol_bf16_stock(smol_dir: Path):  # -> LoadedModel
    """The same in stock form (``pack=False``): the independent reference's model."""
    import torch

    from tritonop_backend.llm.loading import load_causal_lm

    loaded = load_causal_lm(smol_dir, "bfloat16", "cpu", pack=False)
    assert loaded.dtype == torch.bfloat16 and loaded.packed_layers == 0
    return loaded


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on two shared cores a second one mostly waits at barriers.

    Measured on this machine while other processes ran: a decode step took 4-5 times
    longer with two threads than with one. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
