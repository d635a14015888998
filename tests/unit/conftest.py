"""Fixtures shared by the unit tests of the LLM engine."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol(smol_dir: Path):  # -> LoadedModel; imported lazily, torch is slow to import
    """SmolLM2-135M-Instruct in float32 on the CPU, loaded once per session."""
    from tritonop_backend.llm.loading import load_causal_lm

    return load_causal_lm(smol_dir, "float32", "cpu")
