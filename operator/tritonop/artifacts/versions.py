"""Versioned artifacts: the one definition of what decides an EmbeddingSearch's artifacts.

An EmbeddingSearch's exported encoder and corpus index depend on the model (source and
export format), the pooling, the maximum sequence length and the corpus content, and on
nothing else: replicas, batching, threads or the cache change how they are served, not
what is built. :func:`resource_fingerprint` hashes exactly those, and everything that
names a version uses it: the renderer (the folder the models read, the prepare Job's
name), ``tritonop prepare`` (the folder it builds) and, through the rendered
``artifacts_fingerprint`` parameter, the models in Triton (which refuse another version).

A version lives in ``<root>/<resource name>/<fingerprint>/`` (``model/``, ``index/``,
``version.json`` written last), built in a staging folder beside it and renamed into
place, so a version folder is either complete or absent, and never changes once there.
A spec change builds a new folder while pods keep reading the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path, PurePosixPath

from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.artifacts import VERSION_FILE

# Bumped when the layout or the format of what is built changes: every version rebuilds.
LAYOUT = "1"
FINGERPRINT_LENGTH = 16
STAGING_PREFIX = ".staging-"


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_sha256(resource: Resource) -> str:
    """The corpus content hash, where the corpus ships with the resource; else ``""``.

    A relative ``corpus.source`` resolves against the resource's folder (the examples in
    the operator image, in a cluster), which the operator and the prepare step both read,
    so both hash the same bytes. An absolute path names a file on the artifacts volume,
    which the operator does not mount: such a corpus is identified by its path alone (a
    changed corpus needs a new file name). Cached by size and modification time, since
    the operator renders on every resync. A resource document the operator rendered
    carries the hash it used (:attr:`Resource.corpus_sha256`): that one is the answer.
    """
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    if resource.corpus_sha256 is not None:
        return resource.corpus_sha256
    return read_corpus_sha256(resource)


def read_corpus_sha256(resource: Resource) -> str:
    """The hash of the corpus file as this process reads it (``""`` where it cannot)."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    if Path(spec.corpus.source).is_absolute() or resource.base_dir is None:
        return ""
    path = resource.resolve_path(spec.corpus.source)
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def fingerprint_inputs(resource: Resource) -> dict[str, str]:
    """The settings a version is built from, by their spec field names."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    model, corpus = spec.model, spec.corpus
    return {
        "layout": LAYOUT,
        "model.source": model.source,
        "model.format": model.format,
        "model.pooling": model.pooling or "auto",
        "model.maxSequenceLength": str(model.max_sequence_length or "auto"),
        "corpus.source": corpus.source,
        "corpus.textField": corpus.text_field,
        "corpus.sha256": corpus_sha256(resource),
    }


def resource_fingerprint(resource: Resource) -> str:
    """The hex fingerprint naming this resource's artifacts version."""
    canonical = json.dumps(fingerprint_inputs(resource), sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:FINGERPRINT_LENGTH]


def version_dir(resource: Resource, artifacts_root: str) -> str:
    """Where this resource's current artifacts version lives under ``artifacts_root``."""
    return str(PurePosixPath(artifacts_root) / resource.name / resource_fingerprint(resource))


def complete_versions(resource_dir: Path) -> list[str]:
    """Fingerprints of the complete versions in a resource's folder, oldest first."""
    if not resource_dir.is_dir():
        return []
    found = [p for p in resource_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / VERSION_FILE).is_file()]
    return [p.name for p in sorted(found, key=lambda p: (p / VERSION_FILE).stat().st_mtime)]


def remove_versions(resource_dir: Path, keep: set[str]) -> list[str]:
    """Delete every version folder of a resource except ``keep``; returns what went.

    Versions are immutable and pods pin one by fingerprint, so the only safe time to
    remove one is after no pod reads it: the caller passes the versions its live pods
    use (after a rollout, the new one; during one, both). Staging folders are removed
    too; call this under the resource's prepare lock so that none is being written.
    """
    removed = []
    if not resource_dir.is_dir():
        return removed
    for path in sorted(resource_dir.iterdir()):
        if not path.is_dir() or path.name in keep:
            continue
        if path.name.startswith(".") and not path.name.startswith(STAGING_PREFIX):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
