"""The embedding cache: a new corpus version embeds only the texts no version embedded before.

A corpus that changes is still a new artifacts version (its content is in the fingerprint,
:mod:`tritonop.artifacts.versions`), but the vectors of its unchanged texts come from a cache
on the artifacts volume instead of the encoder. The cache is per resource,
``<resource dir>/.embedding-cache/<key>/``, where ``key`` hashes everything that changes a
vector (:func:`cache_key`: the model's content fingerprint, export format and precision,
pooling, maximum length, document prompt, dimension, and this code's formats); a text's
entry is found by the sha256 of its UTF-8 bytes. A changed model or setting finds another
key and never reuses a vector. The leading dot keeps the folder out of the version listing
and out of ``--keep-only``'s clean-up.

Layout of one key's folder::

    cache.json        the files that make the cache, each with its size and sha256
    table-<id>.npy    the hash table: [("sha256", S32), ("shard", u4), ("row", u4)], sorted
    shard-<id>.npy    float32 [rows, dimension] vectors; never changed once written

A build appends one shard holding the vectors it embedded and writes a new table listing
the texts of the corpus just built, and nothing else: a text no longer in the corpus is no
longer found (the cache keeps the latest corpus built, which an older version, complete on
the volume, never needs again). Its row stays in its shard until at most half of that
shard's rows are live, when the live ones are copied into the new shard and the old file
goes, so the vectors stored are never more than twice the corpus's. Other keys' folders go
after a build too.

Every file is written under a fresh name, flushed and renamed into place, and
``cache.json`` is renamed last; files it does not name are removed afterwards. A build
killed at any point leaves the previous cache, whole. Before a file is used its size and
sha256 are checked against ``cache.json``: a damaged table throws the key's cache away, a
damaged shard only the texts in it, which are embedded again; neither is ever read as
vectors. Call under the resource's prepare lock (:func:`tritonop.artifacts.prepare.locked`):
two builds writing one cache at once are not supported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonop_backend.artifacts import ModelManifest

log = logging.getLogger(__name__)

CACHE_DIR = ".embedding-cache"
CACHE_FORMAT = "1"  # bump when what a vector is (pooling code, normalization) changes
MANIFEST_FILE = "cache.json"
TABLE_DTYPE = np.dtype([("sha256", "S32"), ("shard", "<u4"), ("row", "<u4")])


@dataclass(frozen=True)
class CachedEmbeddings:
    """The vectors of a corpus, and how many distinct texts were embedded or reused.

    Attributes:
        vectors: ``float32 [len(texts), dimension]``, in the corpus's order.
        embedded: distinct texts the encoder ran on.
        reused: distinct texts whose vectors came from the cache.
        damaged: what was found wrong with the cache (whose files were then not used).
    """

    vectors: np.ndarray
    embedded: int
    reused: int
    damaged: tuple[str, ...] = ()


def cache_key(model: ModelManifest, pooling: str, max_length: int, document_prompt: str) -> str:
    """The hex name of the cache that holds vectors made with exactly these settings."""
    inputs = {
        "cache": CACHE_FORMAT,
        "model.fingerprint": model.fingerprint,  # weights, config and tokenizer
        "model.format": model.format,  # TorchScript and ONNX round differently
        "dimension": model.dimension,
        "pooling": pooling,
        "maxSequenceLength": max_length,
        "documentPrompt": document_prompt,
    }
    if model.precision != "float32":  # int8 weights; float32 keeps the keys made before
        inputs["model.precision"] = model.precision
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """The sha256 of each text's UTF-8 bytes, as an ``S32`` array."""
    digests = b"".join(hashlib.sha256(text.encode("utf-8")).digest() for text in texts)
    return np.frombuffer(digests, dtype="S32")


def cached_embeddings(
    texts: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    cache_root: Path | None,
    key: str,
) -> CachedEmbeddings:
    """Vectors of ``texts``: from the cache where it has them, from ``embed`` otherwise.

    ``embed`` gets each missing text once (duplicates in the corpus are embedded once) and
    returns their unit-length ``float32`` vectors in order. Afterwards the cache under
    ``cache_root / key`` holds exactly this corpus's texts. Without a ``cache_root`` every
    text is embedded and nothing is written. A cache that cannot be written (a full or
    read-only volume) is reported as a warning: the vectors returned are right either way.
    """
    if cache_root is None or not texts:
        vectors = embed(list(texts)) if texts else np.empty((0, 0), dtype=np.float32)
        return CachedEmbeddings(vectors, len(texts), 0)
    directory = Path(cache_root) / key
    unique, first, inverse = np.unique(text_hashes(texts), return_index=True,
                                       return_inverse=True)
    inverse = inverse.reshape(-1)
    cache, damaged = _Cache.open(directory)
    shard, row = cache.lookup(unique)
    found, damaged_shards = cache.read_shards(shard, row)
    hit = np.zeros(len(unique), dtype=bool)
    for positions, _ in found:
        hit[positions] = True
    shard[~hit] = -1  # absent, or in a damaged shard
    missing = np.flatnonzero(~hit)
    new = _embed(embed, [texts[first[i]] for i in missing], cache.dimension if found else None)
    vectors = np.empty((len(texts), new.shape[1] if len(missing) else cache.dimension or 0),
                       dtype=np.float32)
    for positions, cached in found:  # each distinct text at its first place in the corpus
        vectors[first[positions]] = cached
    vectors[first[missing]] = new
    again = np.flatnonzero(first[inverse] != np.arange(len(texts)))
    vectors[again] = vectors[first[inverse[again]]]  # and at the places it comes again
    result = CachedEmbeddings(vectors, len(missing), int(hit.sum()),
                              tuple(damaged + damaged_shards))
    log.info("embedding cache: embedded %d texts, reused %d (%d texts in the corpus)",
             result.embedded, result.reused, len(texts))
    try:
        cache.replace_with(unique, vectors, first, shard, row, missing)
    except OSError as err:
        log.warning("embedding cache %s not updated (%s); the index is built all the same",
                    directory, err)
    _remove_other_keys(Path(cache_root), key)
    return result


def _embed(embed: Callable[[list[str]], np.ndarray], texts: list[str],
           dimension: int | None) -> np.ndarray:
    if not texts:
        return np.empty((0, dimension or 0), dtype=np.float32)
    vectors = np.asarray(embed(texts), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts) or \
            (dimension is not None and vectors.shape[1] != dimension):
        raise ValueError(f"embedding {len(texts)} texts gave an array of shape {vectors.shape}")
    return vectors


class _Cache:
    """One key's folder: its manifest, table and shards, as read and verified."""

    def __init__(self, directory: Path, manifest: dict | None, table: np.ndarray) -> None:
        self.directory = directory
        self.shards: list[dict] = list(manifest["shards"]) if manifest else []
        self.dimension: int | None = manifest["dimension"] if manifest else None
        self.table = table

    @classmethod
    def open(cls, directory: Path) -> tuple[_Cache, list[str]]:
        """The cache in ``directory``; an empty one where there is none or it is damaged."""
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
            return cls(directory, manifest, _read_table(directory, manifest)), []
        except FileNotFoundError as err:
            if err.filename == str(directory / MANIFEST_FILE):
                return cls(directory, None, np.empty(0, dtype=TABLE_DTYPE)), []
            problem = f"{Path(err.filename).name} is missing"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problem = str(err)
        log.warning("embedding cache %s: %s; embedding every text", directory, problem)
        return cls(directory, None, np.empty(0, dtype=TABLE_DTYPE)), [problem]

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each of the sorted ``hashes``: its shard and row, or shard -1 where absent."""
        shard = np.full(len(hashes), -1, dtype=np.int64)
        row = np.zeros(len(hashes), dtype=np.int64)
        if len(self.table) and len(hashes):
            at = np.minimum(np.searchsorted(self.table["sha256"], hashes), len(self.table) - 1)
            found = self.table["sha256"][at] == hashes
            shard[found] = self.table["shard"][at[found]]
            row[found] = self.table["row"][at[found]]
        return shard, row

    def read_shards(self, shard: np.ndarray, row: np.ndarray,
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
        """The vectors found, shard by shard (positions in ``shard``, vectors); damaged files.

        Only shards that hold a vector wanted are read, each checked whole first.
        """
        found: list[tuple[np.ndarray, np.ndarray]] = []
        damaged = []
        for number in np.unique(shard[shard >= 0]).tolist():
            entry = self.shards[number]
            try:
                vectors = _read_shard(self.directory, entry, self.dimension)
            except (OSError, ValueError) as err:
                log.warning("embedding cache %s: %s; embedding its texts again",
                            self.directory, err)
                damaged.append(str(err))
                continue
            positions = np.flatnonzero(shard == number)
            found.append((positions, np.asarray(vectors[row[positions]], dtype=np.float32)))
        return found, damaged

    def replace_with(self, hashes: np.ndarray, vectors: np.ndarray, first: np.ndarray,
                     shard: np.ndarray, row: np.ndarray, embedded: np.ndarray) -> None:
        """Make the cache hold exactly ``hashes`` (sorted), whose vectors are ``vectors[first]``.

        ``shard``/``row`` say where each hash already is (shard -1: nowhere usable);
        ``embedded`` are the positions in ``hashes`` embedded now. A shard of which at most
        half the rows stay live is compacted: its live rows move into the new shard.
        """
        live = np.bincount(shard[shard >= 0], minlength=len(self.shards))
        kept = [n for n, entry in enumerate(self.shards)
                if live[n] and 2 * live[n] > entry["rows"]]
        moved = np.flatnonzero((shard >= 0) & ~np.isin(shard, kept))
        fresh = np.sort(np.concatenate([embedded, moved]).astype(np.int64))
        if not len(fresh) and len(kept) == len(self.shards) and \
                np.array_equal(hashes, self.table["sha256"]):
            return  # the same texts, all in place: nothing to write
        self.directory.mkdir(parents=True, exist_ok=True)
        shards = [self.shards[n] for n in kept]
        table = np.empty(len(hashes), dtype=TABLE_DTYPE)
        table["sha256"] = hashes
        renumber = np.full(len(self.shards), -1, dtype=np.int64)
        renumber[kept] = np.arange(len(kept))
        at_old = (shard >= 0) & np.isin(shard, kept)
        table["shard"][at_old] = renumber[shard[at_old]]
        table["row"][at_old] = row[at_old]
        if len(fresh):
            name = f"shard-{secrets.token_hex(8)}.npy"
            shards.append({"file": name, "rows": len(fresh),
                           **_write_npy(self.directory / name, vectors[first[fresh]])})
            table["shard"][fresh] = len(shards) - 1
            table["row"][fresh] = np.arange(len(fresh))
        table_name = f"table-{secrets.token_hex(8)}.npy"
        manifest = {"format": CACHE_FORMAT, "dimension": vectors.shape[1], "count": len(hashes),
                    "table": {"file": table_name, **_write_npy(self.directory / table_name,
                                                                table)},
                    "shards": shards}
        _write_atomically(self.directory / MANIFEST_FILE,
                          json.dumps(manifest, indent=1).encode())
        named = {MANIFEST_FILE, table_name, *(entry["file"] for entry in shards)}
        for path in self.directory.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)


def _read_table(directory: Path, manifest: dict) -> np.ndarray:
    """The hash table, after the manifest and the table were checked against each other."""
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{MANIFEST_FILE} has format {manifest.get('format')!r}, "
                         f"not {CACHE_FORMAT}")
    if not isinstance(manifest.get("dimension"), int) or manifest["dimension"] <= 0 or \
            not isinstance(manifest.get("shards"), list) or \
            not all(_is_entry(entry) for entry in [manifest.get("table"), *manifest["shards"]]):
        raise ValueError(f"{MANIFEST_FILE} is not a cache manifest")
    table = _load_verified(directory, manifest["table"])
    if table.dtype != TABLE_DTYPE or table.ndim != 1 or len(table) != manifest.get("count"):
        raise ValueError(f"{manifest['table']['file']} is not a table of {manifest.get('count')}")
    if np.any(table["sha256"][1:] <= table["sha256"][:-1]):
        raise ValueError(f"{manifest['table']['file']} is not sorted")
    shards = manifest["shards"]
    if len(table) and int(table["shard"].max()) >= len(shards):
        raise ValueError(f"{manifest['table']['file']} names a shard that is not there")
    rows = np.array([entry["rows"] for entry in shards], dtype=np.int64)
    if len(table) and np.any(table["row"] >= rows[table["shard"]]):
        raise ValueError(f"{manifest['table']['file']} names a row beyond its shard")
    return table


def _is_entry(entry: object) -> bool:
    """A manifest's description of one file: its name, size, sha256 (and rows, for a shard)."""
    return isinstance(entry, dict) and isinstance(entry.get("file"), str) and \
        isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str) and \
        isinstance(entry.get("rows", 0), int)


def _read_shard(directory: Path, entry: dict, dimension: int | None) -> np.ndarray:
    vectors = _load_verified(directory, entry, mmap=True)
    if vectors.dtype != np.float32 or vectors.shape != (entry["rows"], dimension):
        raise ValueError(f"{entry['file']} holds {vectors.dtype} {vectors.shape}, "
                         f"not float32 ({entry['rows']}, {dimension})")
    return vectors


def _load_verified(directory: Path, entry: dict, mmap: bool = False) -> np.ndarray:
    """``entry["file"]``, loaded after its size and sha256 matched ``entry``'s."""
    name = str(entry["file"])
    if Path(name).name != name or name.startswith("."):
        raise ValueError(f"{name!r} is not a file name")
    path = directory / name
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(f"{name} has {size} bytes, not {entry['bytes']}")
    if _sha256(path) != entry["sha256"]:
        raise ValueError(f"{name} does not match its sha256")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_npy(path: Path, array: np.ndarray) -> dict:
    """Write ``array`` to ``path`` atomically; its size and sha256 for the manifest."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as out:
        np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_other_keys(cache_root: Path, key: str) -> None:
    """Drop the caches of other models or settings: only the latest build's is kept."""
    try:
        others = [path for path in cache_root.iterdir() if path.name != key and path.is_dir()]
    except OSError:
        return  # none, or not ours to list: leaving them costs space, not correctness
    for path in others:
        shutil.rmtree(path, ignore_errors=True)
