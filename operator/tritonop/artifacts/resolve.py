"""A resource's model source: read from its spec, its revision pinned, fetched into the cache.

A remote source (``hf://``, ``s3://``, ``https://``) can hold other bytes under the same text:
a branch moves, objects are replaced. What prepare builds from it is named by the artifacts
fingerprint (:mod:`tritonop.artifacts.versions`), and the render names the same folder, so
both must agree on the revision they mean. Hence the order: :func:`resolve` first, which
records the revision in the resource (:attr:`Resource.model_revision`), then everything else
(the fingerprint, the render, the download of the files) from that pinned resource. A
revision the source names exactly (a commit sha after ``@``, an https file's sha256) or that
the resource document carries needs no resolving, and no call at all once it is cached.

Credentials come from the process environment (``HF_TOKEN``, ``HF_ENDPOINT``, ``AWS_*``),
where the prepare step's container gets them from the resource's credentials Secret.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from tritonop.artifacts.fetch import (
    COMPLETE_MARKER,
    Fetched,
    ModelSource,
    Progress,
    console_progress,
    fetch,
    resolve_revision,
)
from tritonop.artifacts.progress import progress_lines
from tritonop.resources import Resource
from tritonop_backend.artifacts import ArtifactError

log = logging.getLogger(__name__)

UNRESOLVED = "unresolved"
"""The revision a fingerprint records for a moving remote source nobody has resolved yet (a
render without prepare): prepare resolves it and then names another version, and says so."""


def model_source(resource: Resource) -> ModelSource:
    """``spec.model`` as a :class:`ModelSource`, the resource's pinned revision applied.

    Raises:
        ArtifactError: ``spec.model.source`` is not a source that can be read.
    """
    model = resource.spec.model
    s3 = model.s3
    source = ModelSource.parse(
        model.source, s3_endpoint=s3.endpoint if s3 else None,
        s3_region=s3.region if s3 else None, sha256=model.sha256,
        allow_pickle=model.allow_pickle, trust_remote_code=model.trust_remote_code,
        base_dir=resource.base_dir)
    if resource.model_revision and source.scheme in ("hf", "s3"):
        source = dataclasses.replace(source, revision=resource.model_revision)
    return source


def source_scheme(resource: Resource) -> str | None:
    """``hf``, ``s3``, ``https``, ``pvc``, ``package`` or ``path``; None when it does not parse
    (prepare then says why, where it reads the source)."""
    try:
        return model_source(resource).scheme
    except ArtifactError:
        return None


def model_revision(resource: Resource) -> str | None:
    """The revision of a remote source that its artifacts are built from, as far as known here.

    The pinned or exactly named revision; :data:`UNRESOLVED` for a branch, tag or S3 prefix
    not resolved yet; None for a local source, whose bytes the export's own fingerprint
    covers (and whose artifacts fingerprints stay what they were before remote sources).
    """
    try:
        source = model_source(resource)
    except ArtifactError:
        return None
    if not source.remote:
        return None
    return source.exact_revision or UNRESOLVED


def current_revision(resource: Resource, env: Mapping[str, str] | None = None) -> str | None:
    """The exact revision the resource's remote source means now; None for a local source.

    What ``tritonop resolve`` (the operator's resolve Job) reports: at most one metadata call
    (none for a commit sha or an https sha256) and no download. A revision the resource
    document pinned is not taken, so a branch that moved since gives its new commit.
    Credentials come from ``env`` (default: the process environment).
    """
    source = model_source(dataclasses.replace(resource, model_revision=None))
    if not source.remote:
        return None
    return resolve_revision(source, env)


def fetch_model(resource: Resource, cache: Path, *, progress: bool = False) -> Fetched:
    """The resource's model folder (or GGUF file), downloaded into ``cache`` unless it is there.

    At the resource's pinned revision when it has one: a hub branch that has moved since, or
    an S3 prefix whose objects changed, is refused rather than served in its place.
    """
    source = model_source(resource)
    if progress and source.remote:
        with download_progress(resource, source) as report:
            fetched = fetch(source, cache, progress=report, base_dir=resource.base_dir)
    else:
        fetched = fetch(source, cache, base_dir=resource.base_dir)
    if source.remote and resource.model_revision and fetched.revision != resource.model_revision:
        raise ArtifactError(
            f"{resource.name}: model source {source.public} is revision {fetched.revision} here, "
            f"but the resource was rendered for revision {resource.model_revision}")
    if fetched.revision:
        log.info("%s: model source %s at revision %s in %s", resource.name, source.public,
                 fetched.revision, fetched.directory)
    return fetched


def download_progress(resource: Resource, source: ModelSource
                      ) -> AbstractContextManager[Progress]:
    """How a download shows its progress: a bar on a terminal; where there is none (a pod:
    the prepare Job, the prepare init container), a ``progress: ...`` line on stdout every
    few seconds and at the end, which the operator reads from the pod's log
    (:mod:`tritonop.artifacts.progress`)."""
    if sys.stderr.isatty():
        return console_progress(f"{resource.name}: {source.text}")
    return progress_lines(resource.name, source.text)


def resolve(resource: Resource, cache: Path, *,
            progress: bool = False) -> tuple[Resource, Fetched | None]:
    """The resource with its model revision pinned, and the model where resolving fetched it.

    A revision known exactly is pinned with no call and nothing fetched: an artifacts version
    already built for it needs no model. A moving one (a branch, an S3 prefix) is fetched,
    which asks the store what it holds now (one metadata call when that is cached).
    """
    revision = model_revision(resource)
    if revision is None:
        return resource, None
    if revision != UNRESOLVED:
        return dataclasses.replace(resource, model_revision=revision), None
    fetched = fetch_model(resource, cache, progress=progress)
    return dataclasses.replace(resource, model_revision=fetched.revision), fetched


def link_tree(source: Path, target: Path) -> None:
    """Hard links where the folders share a filesystem, copies where they do not."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def place_folder(fetched: Fetched, target: Path) -> bool:
    """Make ``target`` hold the fetched folder, unless it holds that revision already.

    Hard links where the cache is on the same volume (a pod's ``/artifacts/.models``), so a
    model's bytes are there once. Built beside ``target`` and renamed into place. Returns
    whether anything changed.
    """
    try:
        placed = json.loads((target / COMPLETE_MARKER).read_text()).get("revision")
    except (OSError, ValueError, AttributeError):
        placed = None
    if placed is not None and placed == fetched.revision:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        link_tree(fetched.directory, staging / target.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
