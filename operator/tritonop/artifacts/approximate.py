"""The approximate index of ``spec.search.index: hnsw``: built by prepare, with its recall.

The graph is built from the corpus vectors once they exist, saved beside them
(:data:`tritonop_backend.ann.ANN_FILE`), and measured at once: recall@10 against the exact
index, with a sample of the corpus's own vectors as queries. The report goes into the index
manifest (``index``), which the served search model logs and ``tritonop prepare`` prints
(the prepare Job's termination message, from which the operator writes ``status.index``).
A graph whose recall is below ``spec.search.minRecall`` fails prepare, naming both: a
version is never served with less recall than its spec asks for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tritonop.artifacts.versions import version_dir
from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.ann import (
    ANN_FILE,
    RECALL_K,
    HnswSearcher,
    HnswSettings,
    build_graph,
    measure_recall,
)
from tritonop_backend.artifacts import ArtifactError, IndexManifest, ModelManifest

log = logging.getLogger(__name__)


def hnsw_settings(spec: EmbeddingSearchSpec) -> HnswSettings | None:
    """The graph a spec asks for; None for the exact index."""
    search = spec.search
    if search.index != "hnsw":
        return None
    return HnswSettings(connectivity=search.hnsw.connectivity,
                        ef_construction=search.hnsw.ef_construction,
                        ef_search=search.hnsw.ef_search, quantization=search.quantization,
                        rescore_factor=search.hnsw.rescore_factor)


def same_index(manifest: IndexManifest, settings: HnswSettings | None) -> bool:
    """Whether an index built earlier has the graph (or the lack of one) asked for."""
    if settings is None:
        return manifest.index_kind == "exact"
    return manifest.index_kind == "hnsw" and \
        HnswSettings.from_manifest(manifest.index) == settings


def build_approximate(directory: Path, embeddings: np.ndarray, settings: HnswSettings,
                      threads: int = 0) -> dict[str, Any]:
    """Build and save the graph of ``embeddings`` in ``directory``, and measure its recall.

    Returns:
        The manifest's ``index`` entry: the settings, the library, the build seconds,
        ``recall_at_10`` and ``recall_queries``.
    """
    from importlib.metadata import version

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seconds = build_graph(embeddings, settings, directory / ANN_FILE, threads)
    searcher = HnswSearcher(directory / ANN_FILE, embeddings, settings, threads)
    recall, queries = measure_recall(searcher, embeddings)
    report = {**settings.as_manifest(), "library": f"usearch {version('usearch')}",
              "build_seconds": round(seconds, 1), "recall_at_10": round(recall, 4),
              "recall_queries": queries}
    log.info("hnsw index (%s quantization) of %d vectors built in %.1f s: recall@%d %.4f "
             "against exact on %d corpus vectors", settings.quantization, len(embeddings),
             seconds, RECALL_K, recall, queries)
    return report


def check_recall(index: dict[str, Any], min_recall: float) -> None:
    """Fail when an approximate index's measured recall is below ``min_recall``.

    Raises:
        ArtifactError: naming the measured recall, ``spec.search.minRecall`` and the knobs.
    """
    if index.get("kind") != "hnsw":
        return
    recall = float(index.get("recall_at_10", 0.0))
    if recall < min_recall:
        raise ArtifactError(
            f"the hnsw index's recall@{RECALL_K} is {recall:.4f} (measured against the exact "
            f"index on {index.get('recall_queries', 0)} corpus texts), below "
            f"spec.search.minRecall {min_recall}: raise spec.search.hnsw.efSearch, "
            "connectivity or rescoreFactor, use quantization: none, or index: exact")


def index_report(manifest: IndexManifest) -> dict[str, Any]:
    """What ``status.index`` shows of an index manifest: kind, quantization, recall@10."""
    index = manifest.index
    if manifest.index_kind != "hnsw":
        return {"kind": "exact"}
    return {"kind": "hnsw", "quantization": index.get("quantization", "none"),
            "recallAt10": index.get("recall_at_10"),
            "recallQueries": index.get("recall_queries")}


def prepared_reports(resources: list[Resource], artifacts_root: Path) -> list[dict[str, Any]]:
    """``{"name", "version", "index"}`` per EmbeddingSearch just prepared, plus ``encoder``
    for an int8 one (its measured cosine): what ``tritonop prepare`` writes to its
    termination message, for the operator's ``status.index`` and ``status.encoder``."""
    from tritonop.artifacts.quantize import encoder_report

    reports = []
    for resource in resources:
        if isinstance(resource.spec, EmbeddingSearchSpec):
            version = Path(version_dir(resource, str(artifacts_root)))
            manifest = IndexManifest.read(version / "index")
            report = {"name": resource.name, "version": version.name,
                      "index": index_report(manifest)}
            if resource.spec.model.precision != "float32":
                report["encoder"] = encoder_report(ModelManifest.read(version / "model"))
            reports.append(report)
    return reports
