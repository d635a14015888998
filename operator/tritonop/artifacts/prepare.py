"""Making sure everything a resource serves exists under an artifacts root.

Used by ``tritonop serve`` and ``tritonop prepare`` locally and by the "prepare" init
container in a cluster. Every step is skipped when its manifest says the result is
already there and current, so a warm start takes seconds.

Several pods may prepare into one shared volume at once (replicas on a
PersistentVolumeClaim or a hostPath). Each resource is prepared under an exclusive lock
on ``<root>/.<name>.lock``, so one pod builds while the others wait and then find the
result current; and each directory is built in a staging folder beside its final place
and renamed into it, so a pod killed mid-way never leaves a half-written directory that
a server (or the next prepare) could take for a finished one.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tritonop.artifacts.export import export_model
from tritonop.artifacts.index import build_index
from tritonop.artifacts.llm import prepare_llm
from tritonop.artifacts.sources import inspect
from tritonop.render.repository import artifact_dirs
from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.artifacts import MANIFEST_FILE, ArtifactError
from tritonop_backend.cpus import available_cpus

log = logging.getLogger(__name__)
Result = TypeVar("Result")


@contextmanager
def locked(artifacts_root: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock on one resource's artifacts (blocks while another holds it).

    ``flock`` is released by the kernel when its holder dies, so a killed pod never
    leaves a stale lock behind.
    """
    artifacts_root.mkdir(parents=True, exist_ok=True)
    with open(artifacts_root / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def staged(target: Path, build: Callable[[Path], Result]) -> Result:
    """Run ``build`` on a staging folder beside ``target`` and rename the result into place.

    The staging folder starts with ``target``'s manifest, so that a build which finds the
    result current returns at once (and the staging folder is dropped). Stale staging
    folders of killed pods are removed first (they are only ever left by a dead holder
    of the lock that the caller now holds).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        if (target / MANIFEST_FILE).is_file():
            shutil.copyfile(target / MANIFEST_FILE, staging / MANIFEST_FILE)
        result = build(staging)
        if getattr(result, "skipped", False):
            return result
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-old-",
                                            dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_embedding_search(
    resource: Resource, artifacts_root: Path, *, progress: bool = True
) -> None:
    """Export the encoder and build the corpus index of an EmbeddingSearch."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    model_dir, index_dir = (Path(d) for d in artifact_dirs(resource, str(artifacts_root)))
    corpus = resource.resolve_path(spec.corpus.source)
    if not corpus.is_file():  # say so before minutes of export, not after
        raise ArtifactError(f"{resource.name}: spec.corpus.source: {corpus} does not exist")
    source = inspect(spec.model.source, resource.base_dir)
    exported = staged(model_dir, lambda into: export_model(source, spec.model.format, into))
    if exported.skipped:
        log.info("%s: %s encoder already exported in %s", resource.name, spec.model.format,
                 model_dir)
    else:
        log.info("%s: exported %s to %s in %s (max |difference| to the source model: %.2e)",
                 resource.name, source.source, spec.model.format, model_dir,
                 exported.manifest.max_abs_diff)
    built = staged(index_dir, lambda into: build_index(
        corpus, model_dir, into,
        text_field=spec.corpus.text_field, pooling=spec.model.pooling,
        max_length=spec.model.max_sequence_length,
        # Before the server starts: every CPU the container may use (its cgroup quota).
        threads=available_cpus(), progress=progress,
    ))
    verb = "index already built" if built.skipped else "built index"
    log.info("%s: %s in %s (%d texts, %s pooling)", resource.name, verb, index_dir,
             built.manifest.count, built.manifest.pooling)


def prepare(resources: list[Resource], artifacts_root: Path, *, progress: bool = True) -> None:
    """Prepare the artifacts of every resource."""
    for resource in resources:
        with locked(Path(artifacts_root), resource.name):
            if isinstance(resource.spec, EmbeddingSearchSpec):
                prepare_embedding_search(resource, artifacts_root, progress=progress)
            else:
                prepare_llm(resource, artifacts_root)
