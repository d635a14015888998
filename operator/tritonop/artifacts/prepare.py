"""Making sure everything a resource serves exists under an artifacts root.

Used by ``tritonop serve`` and ``tritonop prepare`` locally, and in a cluster by the
operator's prepare Job (``prepare: job``) or the "prepare" init container (``perPod``).
An EmbeddingSearch is prepared into the version folder named by its artifacts
fingerprint (:mod:`tritonop.artifacts.versions`); a complete version is never built
again, so a warm start takes seconds.

A remote model source is resolved first (:mod:`tritonop.artifacts.resolve`): the revision
it stands for is pinned into the resource and named by the fingerprint, and the model is
downloaded into the models cache (``<root>/.models`` unless told otherwise) only when a
version must be built.

Several prepares may meet on one shared volume (replicas on a PersistentVolumeClaim or
a hostPath, a Job and its retry). Each resource is prepared under an exclusive lock on
``<root>/.<name>.lock``, so one builds while the others wait and then find the version
complete; and a version is built whole in a staging folder beside its final place and
renamed into it with its ``version.json`` inside, so one killed mid-way never leaves a
half-written version that a server (or the next prepare) could take for a finished one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from tritonop.artifacts.approximate import check_recall, hnsw_settings
from tritonop.artifacts.corpus import read_corpus
from tritonop.artifacts.cross_encoder import prepare_cross_encoder
from tritonop.artifacts.embedding_cache import CACHE_DIR
from tritonop.artifacts.export import export_model, serves
from tritonop.artifacts.fetch import Fetched
from tritonop.artifacts.index import build_index
from tritonop.artifacts.llm import prepare_llm
from tritonop.artifacts.quantize import quantize_encoder, sample_texts
from tritonop.artifacts.resolve import fetch_model, link_tree, model_source, resolve
from tritonop.artifacts.sources import SourceModel, inspect
from tritonop.artifacts.versions import (
    STAGING_PREFIX,
    complete_versions,
    fingerprint_inputs,
    read_corpus_sha256,
    remove_versions,
    resource_fingerprint,
    version_dir,
)
from tritonop.render.repository import DEFAULT_ARTIFACTS_ROOT as POD_ARTIFACTS_PATH
from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.artifacts import (
    ArtifactError,
    IndexManifest,
    ModelManifest,
    VersionManifest,
)
from tritonop_backend.cpus import available_cpus

log = logging.getLogger(__name__)


@contextmanager
def locked(artifacts_root: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock on one resource's artifacts (blocks while another holds it).

    ``flock`` is released by the kernel when its holder dies, so a killed pod never
    leaves a stale lock behind.
    """
    try:
        artifacts_root.mkdir(parents=True, exist_ok=True)
        lock_file = open(artifacts_root / f".{name}.lock", "a")
    except PermissionError:
        raise ArtifactError(_not_writable(artifacts_root)) from None
    with lock_file as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _not_writable(path: Path, artifacts_root: Path | None = None) -> str:
    """Why the artifacts cannot be written, in one line, with what a user needs to do.

    Names the folder that refused (``path``, or the folder of a file that does not exist
    yet), its owner and mode, and this process's uid.
    """
    folder = path if path.is_dir() or not path.parent.is_dir() else path.parent
    try:
        info = folder.stat()
        owner = f"owned by uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}"
    except OSError as err:
        owner = err.strerror or "not readable"
    if artifacts_root is None or folder == Path(artifacts_root):
        subject = f"the artifacts folder {folder}"
    else:
        subject = f"{folder} (in the artifacts folder {artifacts_root})"
    return (f"{subject} is not writable by uid {os.getuid()} ({owner}); give that user the "
            "folder (a claim gets the pod's fsGroup; a hostPath needs an owner the pods' uid, "
            "which the operator's artifacts-owner init container sets; on one machine: "
            f"chown -R {os.getuid()} {artifacts_root or folder})")


def _reusable_model(resource_dir: Path, source: SourceModel, fmt: str,
                    precision: str = "float32") -> Path | None:
    """A complete export of the same model in another version of this resource.

    A version whose corpus or pooling changed needs the same encoder: copying it (hard
    links where the volume allows) saves the export. The same model means the same bytes
    (the source's content fingerprint), not the same ``model.source`` text: a branch that
    moved names another model, and exporting that into hard links of the old version's
    files would rewrite the version a server is reading. For the same reason an export is
    reused only where :func:`~tritonop.artifacts.export.serves` keeps it: an int8 one for
    int8 (a float32 one for int8 too, which quantizing adds to under new names), never for
    float32.
    """
    for fingerprint in reversed(complete_versions(resource_dir)):
        candidate = resource_dir / fingerprint / "model"
        try:
            manifest = ModelManifest.read(candidate)
        except ArtifactError:
            continue
        if serves(manifest, source.fingerprint, fmt, precision):
            return candidate
    return None


def on_volume(path: Path, artifacts_root: Path) -> Path:
    """A pod's ``/artifacts/...`` path as seen from a machine mounting the volume elsewhere.

    A corpus on the artifacts volume is named by its path in the pods; ``tritonop prepare
    --artifacts-root /mnt/volume`` run beside the cluster finds it under that root.
    """
    pod_root = PurePosixPath(POD_ARTIFACTS_PATH)
    if Path(artifacts_root) == Path(pod_root) or not PurePosixPath(path).is_relative_to(pod_root):
        return path
    return Path(artifacts_root) / PurePosixPath(path).relative_to(pod_root)


def prepare_embedding_search(
    resource: Resource, artifacts_root: Path, *, progress: bool = True,
    expect: str | None = None, models_cache: Path | None = None,
    fetched: Fetched | None = None,
) -> Path:
    """Build the resource's artifacts version (encoder and corpus index) unless it exists.

    The version folder is built whole in a staging folder beside it and renamed into
    place with ``version.json`` already inside, so a reader sees a complete version or
    none; a finished version is never touched again. Call under :func:`locked`.

    Args:
        expect: the fingerprint the operator rendered; preparing fails at once, naming
            both, when this spec hashes to another (the operator and this image read
            different corpora), instead of building a version no pod will load.
        models_cache: where a remote model source is downloaded (default
            ``<artifacts_root>/.models``); the resource's model revision must be pinned
            (:func:`tritonop.artifacts.resolve.resolve`) for a remote source.
        fetched: the model, where resolving the revision already fetched it.
    """
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    fingerprint = resource_fingerprint(resource)
    if expect and expect != fingerprint:
        inputs = fingerprint_inputs(resource)
        revision = (" and render with the model revision resolved here (model.revision)"
                    if "model.revision" in inputs else "")
        raise ArtifactError(
            f"{resource.name}: this spec's artifacts fingerprint is {fingerprint}, but the "
            f"operator rendered {expect} (inputs here: {inputs}); "
            f"the operator and prepare images must ship the same corpus{revision}"
        )
    target = Path(version_dir(resource, str(artifacts_root)))
    try:
        complete = VersionManifest.read(target).fingerprint == fingerprint
    except ArtifactError:
        complete = False
    if complete:
        # minRecall builds nothing: a complete version is checked against today's.
        check_recall(IndexManifest.read(target / "index").index, spec.search.min_recall)
        log.info("%s: artifacts version %s already complete in %s", resource.name,
                 fingerprint, target)
        return target
    corpus = on_volume(resource.resolve_path(spec.corpus.source), Path(artifacts_root))
    if not corpus.is_file():  # say so before minutes of export, not after
        raise ArtifactError(f"{resource.name}: spec.corpus.source: {corpus} does not exist")
    actual = read_corpus_sha256(resource)
    if resource.corpus_sha256 and actual and actual != resource.corpus_sha256:
        raise ArtifactError(
            f"{resource.name}: the corpus {corpus} has sha256 {actual} here, but the operator "
            f"rendered this version from one with sha256 {resource.corpus_sha256}: the "
            "operator and prepare images must ship the same corpus"
        )
    if fetched is None and model_source(resource).scheme not in ("package", "path"):
        fetched = fetch_model(resource, models_cache or Path(artifacts_root) / ".models",
                              progress=progress)
    source = inspect(spec.model.source, resource.base_dir,
                     trust_remote_code=spec.model.trust_remote_code,
                     directory=fetched.directory if fetched is not None else None)
    if (spec.model.max_sequence_length or 0) > source.max_positions:
        raise ArtifactError(
            f"{resource.name}: spec.model.maxSequenceLength {spec.model.max_sequence_length} "
            f"is more than model source {spec.model.source} has positions for "
            f"({source.max_positions} tokens)")
    resource_dir = target.parent
    resource_dir.mkdir(parents=True, exist_ok=True)
    # Only a dead holder of the lock (which the caller now holds) leaves staging folders.
    for stale in resource_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{fingerprint}-", dir=resource_dir))
    try:
        precision = spec.model.precision
        reusable = _reusable_model(resource_dir, source, spec.model.format, precision)
        if reusable is None and (target / "model").is_dir():  # seeded, or a torn version
            reusable = target / "model"
        if reusable is not None:
            link_tree(reusable, staging / "model")
        exported = export_model(source, spec.model.format, staging / "model",
                                precision=precision)
        log.info("%s: %s encoder %s", resource.name, spec.model.format,
                 "reused" if exported.skipped else
                 f"exported (max |difference| to the source model: "
                 f"{exported.manifest.max_abs_diff:.2e})")
        if precision == "int8" and exported.manifest.precision != "int8":
            quantize_encoder(staging / "model",
                             sample_texts(read_corpus(corpus, spec.corpus.text_field)),
                             pooling=spec.model.pooling,
                             max_length=spec.model.max_sequence_length,
                             prompt=spec.model.document_prompt, threads=available_cpus())
        built = build_index(
            corpus, staging / "model", staging / "index",
            text_field=spec.corpus.text_field, pooling=spec.model.pooling,
            fields={field.name: field.type for field in spec.corpus.fields},
            max_length=spec.model.max_sequence_length,
            document_prompt=spec.model.document_prompt,
            # Before the server starts: every CPU the container may use (its cgroup quota).
            threads=available_cpus(), progress=progress,
            # Vectors of texts an earlier version embedded with the same model and settings.
            embedding_cache=resource_dir / CACHE_DIR,
            hnsw=hnsw_settings(spec), min_recall=spec.search.min_recall,
        )
        prepare_cross_encoder(resource, staging, models_cache or Path(artifacts_root) / ".models",
                              progress=progress)
        VersionManifest(fingerprint, fingerprint_inputs(resource),
                        built.manifest.corpus_sha256).write(staging)
        # mkdtemp makes it 0700: readable by the pods' uid only if it is the writer's.
        staging.chmod(0o755)
        if target.exists():  # a torn or seeded folder without version.json: replace it
            retired = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=resource_dir))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
        log.info("%s: artifacts version %s complete in %s (%d texts, %s pooling)",
                 resource.name, fingerprint, target, built.manifest.count,
                 built.manifest.pooling)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(resources: list[Resource], artifacts_root: Path, *, progress: bool = True,
            expect: str | None = None, keep_only: bool = False,
            models_cache: Path | None = None) -> list[Resource]:
    """Prepare the artifacts of every resource.

    Args:
        expect: the artifacts fingerprint the operator rendered (one resource only).
        keep_only: afterwards, remove the resource's other versions (the operator's
            clean-up step after a rollout, which passes the version its pods now use).
        models_cache: where remote model sources are downloaded (default
            ``<artifacts_root>/.models``).

    Returns:
        The resources with their model revisions pinned: render these, so that the
        repository names the versions just built.
    """
    if expect and len(resources) != 1:
        raise ArtifactError("an expected fingerprint needs exactly one resource")
    cache = models_cache or Path(artifacts_root) / ".models"
    prepared = []
    for resource in resources:
        try:
            prepared.append(_prepare_one(resource, Path(artifacts_root), cache,
                                         progress=progress, expect=expect, keep_only=keep_only))
        except PermissionError as err:
            # A folder under the root that another user made (a tritonop prepare run as
            # root on the node, say): one line naming it, not a traceback.
            raise ArtifactError(_not_writable(Path(err.filename or artifacts_root),
                                              artifacts_root)) from None
    return prepared


def _prepare_one(resource: Resource, artifacts_root: Path, cache: Path, *, progress: bool,
                 expect: str | None, keep_only: bool) -> Resource:
    """Prepare one resource under its lock; the resource with its revision pinned."""
    with locked(artifacts_root, resource.name):
        resource, fetched = resolve(resource, cache, progress=progress)
        if isinstance(resource.spec, EmbeddingSearchSpec):
            target = prepare_embedding_search(resource, artifacts_root, progress=progress,
                                              expect=expect, models_cache=cache,
                                              fetched=fetched)
            if keep_only:
                removed = remove_versions(target.parent, {target.name})
                log.info("%s: removed old artifacts versions %s", resource.name,
                         removed or "(none)")
        else:
            prepare_llm(resource, artifacts_root, models_cache=cache, progress=progress,
                        fetched=fetched)
    return resource
