"""The corpus texts of an index: one UTF-8 blob and its row offsets, memory-mapped.

A search answers with the texts of its hits, so the index keeps every corpus text. Kept as
one Python ``bytes`` object per text, 10M short texts cost about 1.2 GB of objects per
replica and a minute of JSON parsing at start. Here they are two files instead:
``texts.utf8`` (the UTF-8 bytes of every text, back to back) and ``texts.offsets.npy``
(``uint64 [count + 1]``: text ``i`` is ``blob[offsets[i]:offsets[i + 1]]``), both mapped,
so a text is read from the page cache (shared by the replicas of a node) when it is hit.

Indexes written before these files keep their texts in ``texts.jsonl`` (one JSON string a
line): :meth:`TextColumn.load` still reads them, into memory as before.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tritonop_backend.artifacts import (
    TEXT_OFFSETS_FILE,
    TEXTS_BLOB_FILE,
    TEXTS_FILE,
    ArtifactError,
)

WRITE_BLOCK = 65536
"""Texts encoded and written at once (bounded memory while writing)."""


class TextColumn:
    """Texts as UTF-8 ``bytes``, read lazily: ``column[i]`` is one text, ``column[ids]`` an
    object array of the shape of ``ids`` (what the search model puts in its ``texts``
    output), exactly what ``text.encode("utf-8")`` gives.

    Args:
        blob: every text's bytes back to back (``bytes`` or a read-only ``mmap``).
        offsets: ``[count + 1]`` positions in ``blob``; the last is its length.
    """

    def __init__(self, blob: bytes | mmap.mmap, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) == 0 or int(offsets[0]) != 0 \
                or int(offsets[-1]) != len(blob):
            raise ArtifactError(f"text offsets do not fit a blob of {len(blob)} bytes "
                                f"(first {offsets[:1].tolist()}, last {offsets[-1:].tolist()})")
        self._blob = blob
        self._offsets = offsets

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> TextColumn:
        """The column of ``texts``, held in memory (one ``bytes`` blob)."""
        encoded = [text.encode("utf-8") for text in texts]
        offsets = np.zeros(len(encoded) + 1, dtype=np.uint64)
        np.cumsum(np.array([len(text) for text in encoded], dtype=np.uint64), out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    @classmethod
    def load(cls, directory: Path) -> TextColumn:
        """The texts of an index directory: the mapped blob, else an older ``texts.jsonl``.

        Raises:
            ArtifactError: neither is there, or the files do not fit together.
        """
        directory = Path(directory)
        blob_path, offsets_path = directory / TEXTS_BLOB_FILE, directory / TEXT_OFFSETS_FILE
        if blob_path.is_file():
            try:
                offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
                blob = _map(blob_path)
            except (OSError, ValueError) as err:
                raise ArtifactError(f"{directory}: the texts cannot be read ({err}); "
                                    "build the index again") from None
            if offsets.dtype != np.uint64:
                raise ArtifactError(f"{offsets_path}: offsets are {offsets.dtype}, not uint64; "
                                    "build the index again")
            try:
                return cls(blob, offsets)
            except ArtifactError as err:
                raise ArtifactError(f"{directory}: {err}; build the index again") from None
        if (directory / TEXTS_FILE).is_file():  # written before the blob existed
            with open(directory / TEXTS_FILE, encoding="utf-8") as lines:
                return cls.from_texts(json.loads(line) for line in lines)
        raise ArtifactError(f"{directory} holds no texts ({TEXTS_BLOB_FILE} or {TEXTS_FILE}); "
                            "build the index again")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int | slice | np.ndarray) -> bytes | np.ndarray:
        if isinstance(index, (int, np.integer)):
            row = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"text {index} of {len(self)}")
            begin, end = self._offsets[row:row + 2].tolist()
            return self._blob[begin:end]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else \
            np.asarray(index, dtype=np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and not (0 <= rows.min() and rows.max() < len(self)):
            raise IndexError(f"text ids outside 0..{len(self) - 1}")
        begins = self._offsets[rows].ravel().tolist()
        ends = self._offsets[rows + 1].ravel().tolist()
        out = np.empty(rows.size, dtype=object)
        out[:] = [self._blob[b:e] for b, e in zip(begins, ends, strict=True)]
        return out.reshape(rows.shape)

    def __iter__(self) -> Iterator[bytes]:
        for begin in range(0, len(self), WRITE_BLOCK):
            yield from self[slice(begin, min(len(self), begin + WRITE_BLOCK))]


def _map(path: Path) -> bytes | mmap.mmap:
    """``path`` mapped read-only (an empty file cannot be mapped: its empty contents)."""
    with open(path, "rb") as data:
        if data.seek(0, 2) == 0:
            return b""
        return mmap.mmap(data.fileno(), 0, access=mmap.ACCESS_READ)


def write_texts(directory: Path, texts: Iterable[str]) -> None:
    """Write ``texts`` as :meth:`TextColumn.load` reads them, replacing an older
    ``texts.jsonl``; a block of texts is encoded at a time."""
    directory = Path(directory)
    (directory / TEXTS_FILE).unlink(missing_ok=True)
    lengths: list[int] = []
    block: list[bytes] = []
    with open(directory / TEXTS_BLOB_FILE, "wb") as out:
        for text in texts:
            block.append(text.encode("utf-8"))
            if len(block) == WRITE_BLOCK:
                lengths.extend(map(len, block))
                out.write(b"".join(block))
                block = []
        lengths.extend(map(len, block))
        out.write(b"".join(block))
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
    np.cumsum(np.array(lengths, dtype=np.uint64), out=offsets[1:])
    np.save(directory / TEXT_OFFSETS_FILE, offsets, allow_pickle=False)
