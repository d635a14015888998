"""Versioned artifacts: the one definition of what decides an EmbeddingSearch's artifacts.

An EmbeddingSearch's exported encoder and corpus index depend on the model (source and
export format), the pooling, the maximum sequence length, the corpus content and the
record fields kept beside it, and on nothing else: replicas, batching, threads or the
cache change how they are served, not what is built. :func:`resource_fingerprint` hashes
exactly those, and everything that names a version uses it: the renderer (the folder the
models read, the prepare Job's name), ``tritonop prepare`` (the folder it builds) and,
through the rendered ``artifacts_fingerprint`` parameter, the models in Triton (which
refuse another version).

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
from stat import S_ISDIR, S_ISREG

from tritonop.artifacts.resolve import model_revision
from tritonop.resources import Resource, ResourceError
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.ann import HnswSettings
from tritonop_backend.artifacts import VERSION_FILE

# Bumped when the layout or the format of what is built changes: every version rebuilds.
LAYOUT = "2"
FINGERPRINT_LENGTH = 16
STAGING_PREFIX = ".staging-"


CORPUS_FIELD = "spec.corpus.source"


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int, max_bytes: int | None) -> str:
    """The hash of a regular file, opened so that nothing else can make it block.

    ``path`` was found regular by a ``stat``; it is opened without following a symlink and
    without blocking (a FIFO put there since would otherwise wait for a writer), checked
    again on the open descriptor, and read no further than ``max_bytes`` even if it grows.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as data:
        _check_corpus_file(path, os.fstat(fd), max_bytes)
        digest, read = hashlib.sha256(), 0
        for block in iter(lambda: data.read(1 << 20), b""):
            read += len(block)
            if max_bytes is not None and read > max_bytes:
                raise ResourceError(_too_large(path, max_bytes))
            digest.update(block)
    return digest.hexdigest()


def _too_large(path: str, max_bytes: int) -> str:
    return (f"{CORPUS_FIELD}: {path} is larger than {max_bytes} bytes, the most this operator "
            "hashes (TRITONOP_MAX_CORPUS_BYTES); put a large corpus on the artifacts volume "
            "and name it by an absolute path")


def _check_corpus_file(path: str, stat: os.stat_result, max_bytes: int | None) -> None:
    """Refuse anything but a regular file: a device such as /dev/zero never ends."""
    if not S_ISREG(stat.st_mode):
        what = "a folder" if S_ISDIR(stat.st_mode) else "not a regular file"
        raise ResourceError(f"{CORPUS_FIELD}: {path} is {what}; name a corpus file")
    if max_bytes is not None and stat.st_size > max_bytes:
        raise ResourceError(_too_large(path, max_bytes))


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


def read_corpus_sha256(resource: Resource, *, confined: bool = False,
                       max_bytes: int | None = None) -> str:
    """The hash of the corpus file as this process reads it (``""`` where there is none).

    Only a regular file is opened. The operator passes ``confined`` (the path must stay
    inside the resource's folder, symlinks resolved) and ``max_bytes``: it reads files of
    its own image on a tenant's behalf, inside the resource's lock. Locally, a user's
    corpus may be a symlink to anywhere and of any size: the user owns the machine.

    Raises:
        ResourceError: naming ``spec.corpus.source`` and what is wrong with the file.
    """
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    if Path(spec.corpus.source).is_absolute() or resource.base_dir is None:
        return ""
    path = resource.resolve_inside(spec.corpus.source, CORPUS_FIELD) if confined else \
        resource.resolve_path(spec.corpus.source)
    try:
        stat = os.stat(path)
    except OSError:
        return ""  # prepare says that the corpus does not exist, where it reads it
    _check_corpus_file(str(path), stat, max_bytes)
    try:
        return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns, max_bytes)
    except OSError as err:  # replaced by a symlink, or unreadable, since the stat
        raise ResourceError(f"{CORPUS_FIELD}: cannot read {path}: {err.strerror}") from None


def fingerprint_inputs(resource: Resource) -> dict[str, str]:
    """The settings a version is built from, by their spec field names.

    ``corpus.fields`` is in only when the spec names some (prepare writes their columns).
    ``model.documentPrompt`` is in only when the spec sets it (the corpus is embedded
    after it); unset, the model's own prompt is part of what ``model.source`` names, and
    leaving the key out keeps the versions of specs written before prompts existed.
    The query prompt, normalization and trustRemoteCode build nothing: they are not in.
    ``model.revision`` is in for a remote source only (hf://, s3://, https://), whose text
    can name other bytes tomorrow: the revision prepare resolved (see
    :mod:`tritonop.artifacts.resolve`); a local source keeps the fingerprint it had.
    ``search.index`` is in only for an approximate index: its kind, quantization and graph
    settings (efSearch and rescoreFactor too: the recall prepare measures and reports is
    that of these; rescoreFactor as resolved, so an unset one is its quantization's default
    and int8 versions built when 4 was everyone's default keep their fingerprints);
    ``search.minRecall`` is not (it builds nothing: prepare checks it against the version's
    measured recall, also when the version exists).
    ``model.precision`` is in only for int8 (another encoder, and corpus vectors made with
    it; float32 keeps the versions made before precision existed).
    ``rerank.model`` is in only with a reranker (its source, format and sha256); a moving
    remote source of it (a hub branch) is not pinned: name a commit to roll a new one out.
    """
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    model, corpus = spec.model, spec.corpus
    inputs = {
        "layout": LAYOUT,
        "model.source": model.source,
        "model.format": model.format,
        "model.pooling": model.pooling or "auto",
        "model.maxSequenceLength": str(model.max_sequence_length or "auto"),
        "corpus.source": corpus.source,
        "corpus.textField": corpus.text_field,
        "corpus.sha256": corpus_sha256(resource),
    }
    if model.document_prompt is not None:
        inputs["model.documentPrompt"] = json.dumps(model.document_prompt)
    if model.precision != "float32":
        inputs["model.precision"] = model.precision
    if corpus.fields:  # the columns kept for filters; none keeps the versions made before
        inputs["corpus.fields"] = json.dumps([[f.name, f.type] for f in corpus.fields])
    revision = model_revision(resource)
    if revision is not None:
        inputs["model.revision"] = revision
    if spec.search.index != "exact":  # the graph, and the recall measured with these
        hnsw = spec.search.hnsw
        rescore = HnswSettings(quantization=spec.search.quantization,  # resolves unset
                               rescore_factor=hnsw.rescore_factor).rescore_factor
        inputs["search.index"] = json.dumps(
            [spec.search.index, spec.search.quantization, hnsw.connectivity,
             hnsw.ef_construction, hnsw.ef_search, rescore])
    if spec.rerank is not None:  # the exported cross-encoder; none keeps earlier versions
        rerank = spec.rerank.model
        inputs["rerank.model"] = json.dumps(
            [rerank.source, rerank.format, rerank.sha256 or "",
             (rerank.s3.endpoint or "") if rerank.s3 else ""])
    return inputs


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
