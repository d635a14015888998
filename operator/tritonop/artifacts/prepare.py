"""Making sure everything a resource serves exists under an artifacts root.

Used by ``tritonop serve`` and ``tritonop prepare`` locally and by the "prepare" init
container in a cluster. Every step is skipped when its manifest says the result is
already there and current, so a warm start takes seconds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tritonop.artifacts.export import export_model
from tritonop.artifacts.index import build_index
from tritonop.artifacts.llm import prepare_llm
from tritonop.artifacts.sources import inspect
from tritonop.render.repository import artifact_dirs
from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.artifacts import ArtifactError

log = logging.getLogger(__name__)


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
    exported = export_model(source, spec.model.format, model_dir)
    if exported.skipped:
        log.info("%s: %s encoder already exported in %s", resource.name, spec.model.format,
                 model_dir)
    else:
        log.info("%s: exported %s to %s in %s (max |difference| to the source model: %.2e)",
                 resource.name, source.source, spec.model.format, model_dir,
                 exported.manifest.max_abs_diff)
    built = build_index(
        corpus, model_dir, index_dir,
        text_field=spec.corpus.text_field, pooling=spec.model.pooling,
        max_length=spec.model.max_sequence_length,
        threads=os.cpu_count() or 1, progress=progress,  # before the server: all cores
    )
    verb = "index already built" if built.skipped else "built index"
    log.info("%s: %s in %s (%d texts, %s pooling)", resource.name, verb, index_dir,
             built.manifest.count, built.manifest.pooling)


def prepare(resources: list[Resource], artifacts_root: Path, *, progress: bool = True) -> None:
    """Prepare the artifacts of every resource."""
    for resource in resources:
        if isinstance(resource.spec, EmbeddingSearchSpec):
            prepare_embedding_search(resource, artifacts_root, progress=progress)
        else:
            prepare_llm(resource, artifacts_root)
