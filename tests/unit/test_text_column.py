"""The memory-mapped texts of an index, against the object array of ``text.encode()`` that
the search model held before (numpy's fancy indexing of it is the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tritonop_backend.artifacts import (
    TEXT_OFFSETS_FILE,
    TEXTS_BLOB_FILE,
    TEXTS_FILE,
    ArtifactError,
    IndexManifest,
)
from tritonop_backend.search import CorpusIndex, load_index, write_index
from tritonop_backend.text_column import WRITE_BLOCK, TextColumn, write_texts

TEXTS = ["storm over europe", "", "Zürich ß ø", "日本語のテキスト", "emoji 🌍🔥",
         "e\u0301 combining", "line\nbreak\r\nand\rreturn", "sep\u2028arator\u0085",
         "nul\x00byte", "\"quoted\" \\",
         "x" * 1_000_000, "", "last"]


def reference(texts: list[str]) -> np.ndarray:
    return np.array([text.encode("utf-8") for text in texts], dtype=object)


def old_index(directory: Path, texts: list[str]) -> None:
    """``texts.jsonl`` as indexes were written before the blob (one JSON string a line)."""
    with open(directory / TEXTS_FILE, "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps(text, ensure_ascii=False) + "\n")


def test_written_texts_read_back_byte_identical_and_mapped(tmp_path):
    write_texts(tmp_path, TEXTS)
    column = TextColumn.load(tmp_path)
    expected = reference(TEXTS)
    assert len(column) == len(TEXTS)
    assert [column[i] for i in range(len(TEXTS))] == list(expected)
    assert list(column) == list(expected)
    assert column[-1] == b"last" and column[np.int64(3)] == expected[3]
    assert (tmp_path / TEXTS_BLOB_FILE).read_bytes() == b"".join(expected)
    assert str(tmp_path / TEXTS_BLOB_FILE) in Path("/proc/self/maps").read_text()
    assert isinstance(np.load(tmp_path / TEXT_OFFSETS_FILE, mmap_mode="r"), np.memmap)


def test_rows_by_an_id_array_keep_its_shape(tmp_path):
    write_texts(tmp_path, TEXTS)
    column = TextColumn.load(tmp_path)
    ids = np.random.default_rng(0).integers(0, len(TEXTS), size=(4, 7))
    found = column[ids]
    assert found.dtype == object and found.shape == (4, 7)
    assert np.array_equal(found, reference(TEXTS)[ids])
    assert column[np.zeros((3, 0), dtype=np.int64)].shape == (3, 0)
    assert list(column[2:5]) == list(reference(TEXTS)[2:5])
    with pytest.raises(IndexError):
        column[np.array([0, len(TEXTS)])]
    with pytest.raises(IndexError):
        column[len(TEXTS)]


def test_more_texts_than_a_write_block(tmp_path):
    texts = [f"t{i}" * (i % 5) for i in range(WRITE_BLOCK + 3)]
    write_texts(tmp_path, iter(texts))
    column = TextColumn.load(tmp_path)
    ids = np.array([0, 1, WRITE_BLOCK - 1, WRITE_BLOCK, WRITE_BLOCK + 2])
    assert list(column[ids]) == [texts[i].encode() for i in ids]
    assert len(column) == len(texts)


@pytest.mark.parametrize("texts", [[], ["", "", ""]], ids=["no texts", "only empty texts"])
def test_an_empty_blob_reads(tmp_path, texts):
    write_texts(tmp_path, texts)
    column = TextColumn.load(tmp_path)
    assert len(column) == len(texts) and list(column) == [b""] * len(texts)


def test_an_older_jsonl_index_still_loads_with_the_same_results(tmp_path):
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((len(TEXTS), 8)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    manifest = IndexManifest("m", "f", "mean", 16, 8, len(TEXTS), "sha")
    new, old = tmp_path / "new", tmp_path / "old"
    write_index(new, matrix, TEXTS, manifest)
    assert not (new / TEXTS_FILE).exists()
    write_index(old, matrix, TEXTS, manifest)
    (old / TEXTS_BLOB_FILE).unlink()
    (old / TEXT_OFFSETS_FILE).unlink()
    old_index(old, TEXTS)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    for directory in (new, old):
        index, _ = load_index(directory)
        found = index.search(queries, 5)
        assert np.array_equal(index.texts[found.ids], reference(TEXTS)[found.ids])


def test_writing_an_index_replaces_an_older_jsonl(tmp_path):
    old_index(tmp_path, ["stale"])
    manifest = IndexManifest("m", "f", "mean", 16, 2, 2, "sha")
    write_index(tmp_path, np.eye(2, dtype=np.float32), ["a", "b"], manifest)
    assert not (tmp_path / TEXTS_FILE).exists()
    assert list(load_index(tmp_path)[0].texts) == [b"a", b"b"]


def test_texts_held_in_memory_answer_alike():
    index = CorpusIndex(np.eye(len(TEXTS), 4, dtype=np.float32), TEXTS)
    ids = np.array([[10, 0, 1], [3, 3, 12]])
    assert np.array_equal(index.texts[ids], reference(TEXTS)[ids])


def test_missing_or_damaged_texts_say_to_build_again(tmp_path):
    with pytest.raises(ArtifactError, match=f"holds no texts.*{TEXTS_BLOB_FILE}.*build the index"):
        TextColumn.load(tmp_path)
    write_texts(tmp_path, ["abc", "def"])
    with open(tmp_path / TEXTS_BLOB_FILE, "r+b") as blob:
        blob.truncate(4)
    with pytest.raises(ArtifactError, match=r"do not fit a blob of 4 bytes.*build the index"):
        TextColumn.load(tmp_path)
    (tmp_path / TEXT_OFFSETS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"cannot be read.*build the index again"):
        TextColumn.load(tmp_path)
