"""Checks on the shipped Debian package-description demo corpus.

The embedding-search demo relies on ``examples/corpus/debian-packages.jsonl`` having a fixed
size and clean, unique texts, and on it being reproducible from its public source; these
tests guard both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = REPO_ROOT / "examples" / "corpus"
CORPUS = CORPUS_DIR / "debian-packages.jsonl"
SCRIPT = CORPUS_DIR / "build_debian_corpus.py"
EXPECTED_RECORDS = 20_000
# SHA-256 of the uncompressed bookworm main/binary-amd64/Packages the corpus was built from
# (InRelease Date: Sat, 11 Jul 2026 10:16:37 UTC; see examples/corpus/README.md).
SOURCE_INDEX_SHA256 = "515e692f2c4121c6fcec444ef100cc18f79a991910615f3a88c8b7becfc94d2f"


def _load_builder() -> ModuleType:
    """Import the build script by path, since ``examples/`` is not a package."""
    spec = importlib.util.spec_from_file_location("build_debian_corpus", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while decorating.
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    """Parse every line of the shipped corpus, failing on the first invalid one."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as err:
            pytest.fail(f"line {number} is not valid JSON: {err}")
    return parsed


def test_corpus_has_exact_record_count() -> None:
    lines = CORPUS.read_bytes().split(b"\n")
    assert lines[-1] == b"", "file must end with a newline"
    assert len(lines) - 1 == EXPECTED_RECORDS


def test_records_have_package_and_nonempty_text(records: list[dict[str, str]]) -> None:
    for record in records:
        assert set(record) == {"package", "text"}, record
        assert isinstance(record["package"], str) and record["package"], record
        assert isinstance(record["text"], str) and record["text"].strip(), record
        assert record["text"] == record["text"].strip(), record


def test_texts_and_packages_are_unique(records: list[dict[str, str]]) -> None:
    texts = [record["text"] for record in records]
    packages = [record["package"] for record in records]
    assert len(set(texts)) == len(texts)
    assert len(set(packages)) == len(packages)


def test_records_are_sorted_by_package(records: list[dict[str, str]]) -> None:
    packages = [record["package"] for record in records]
    assert packages == sorted(packages)


def test_script_reproduces_corpus_byte_for_byte(tmp_path: Path) -> None:
    builder = _load_builder()
    try:
        index = builder.find_default_index()
    except FileNotFoundError:
        pytest.skip(
            "Debian bookworm main amd64 Packages index not found under /var/lib/apt/lists "
            "(not a Debian machine, or apt-get update has not been run)"
        )
    try:
        digest = hashlib.sha256(builder.read_index_text(index).encode("utf-8")).hexdigest()
    except RuntimeError as err:
        pytest.skip(f"cannot read {index}: {err}")
    if digest != SOURCE_INDEX_SHA256:
        pytest.skip(
            f"{index} is a different snapshot (sha256 {digest}) from the one the corpus was "
            f"built from ({SOURCE_INDEX_SHA256})"
        )

    output = tmp_path / "debian-packages.jsonl"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--packages", str(index), "--output", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == CORPUS.read_bytes()
