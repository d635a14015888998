"""Fixtures for operator tests: a fresh emulator per test and a kubeconfig pointing at it."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.kube_emulator import KubeEmulator, running_emulator, write_kubeconfig


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """A running emulator that knows tritonop's kinds and their children."""
    async with running_emulator() as emulator:
        yield emulator


@pytest.fixture
def kubeconfig(kube: KubeEmulator, tmp_path: Path) -> Path:
    """A kubeconfig file for ``kube``; pass it to ``running_operator``."""
    return write_kubeconfig(tmp_path / "kubeconfig", str(kube.url))


@pytest.fixture
def fast_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resync every second, so that the operator's periodic reconcile shows within a test."""
    monkeypatch.setenv("TRITONOP_RESYNC_SECONDS", "1")
