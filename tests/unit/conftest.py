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
