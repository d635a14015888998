"""The approximate index of ``spec.search.index: hnsw``: built by prepare, with its recall.

The graph is built from the corpus vectors once they exist, saved beside them
(:data:`tritonop_backend.ann.ANN_FILE`), and measured at once: recall@10 against the exact
index, with a sample of the corpus's own vectors as queries. The report goes into the index
manifest (``index``), which the served search model logs and ``tritonop prepare`` prints
(the prepare Job's termination message, from which the operator writes ``status.index``).
Below ``spec.search.minRecall``, prepare first raises ``efSearch`` (a search-time setting,
doubled up to :data:`MAX_EF_SEARCH`; the graph stays); a graph whose recall is still below
fails prepare, naming both: a version is never served with less recall than its spec asks
for.
"""

from __future__ import annotations

import dataclasses
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
    RecallProbe,
    build_graph,
)
from tritonop_backend.artifacts import ArtifactError, IndexManifest, ModelManifest

log = logging.getLogger(__name__)

MAX_EF_SEARCH = 1024
"""The furthest prepare raises ``efSearch`` to reach ``minRecall``. At 1M clustered
synthetic vectors (``bench/synthetic.py``, graph defaults) the spec's default 64 measured
recall@10 0.858."""


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
                      threads: int = 0, min_recall: float = 0.0) -> dict[str, Any]:
    """Build and save the graph of ``embeddings`` in ``directory``, and measure its recall.

    Where the recall at the spec's ``ef_search`` is below ``min_recall``, ``ef_search`` is
    doubled (up to :data:`MAX_EF_SEARCH`) until it is not: a search-time setting, so the
    graph is not built again. The one reached is served (``ef_search_served``).

    Returns:
        The manifest's ``index`` entry: the settings, the library, the build seconds,
        ``recall_at_10``, ``recall_queries`` and ``ef_search_served``.
    """
    from importlib.metadata import version

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seconds = build_graph(embeddings, settings, directory / ANN_FILE, threads)
    searcher = HnswSearcher(directory / ANN_FILE, embeddings, settings, threads)
    probe = RecallProbe(embeddings)
    recall = probe.recall(searcher)
    served = settings.ef_search
    while recall < min_recall and served < MAX_EF_SEARCH:
        served = min(2 * served, MAX_EF_SEARCH)
        searcher.settings = dataclasses.replace(settings, ef_search=served)
        recall = probe.recall(searcher)
        log.info("hnsw index: efSearch %d gives recall@%d %.4f", served, RECALL_K, recall)
    report = {**settings.as_manifest(), "library": f"usearch {version('usearch')}",
              "build_seconds": round(seconds, 1), "recall_at_10": round(recall, 4),
              "recall_queries": len(probe.queries), "ef_search_served": served}
    log.info("hnsw index (%s quantization) of %d vectors built in %.1f s: recall@%d %.4f "
             "against exact on %d corpus vectors, efSearch %d", settings.quantization,
             len(embeddings), seconds, RECALL_K, recall, len(probe.queries), served)
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
            f"spec.search.minRecall {min_recall} (efSearch {index.get('ef_search_served', '?')}, "
            f"raised as far as {MAX_EF_SEARCH}): raise spec.search.hnsw.connectivity, "
            "efConstruction or rescoreFactor, use quantization: none, or index: exact")


def index_report(manifest: IndexManifest) -> dict[str, Any]:
    """What ``status.index`` shows of an index manifest: kind, quantization, recall@10."""
    index = manifest.index
    if manifest.index_kind != "hnsw":
        return {"kind": "exact"}
    report = {"kind": "hnsw", "quantization": index.get("quantization", "none"),
              "recallAt10": index.get("recall_at_10"),
              "recallQueries": index.get("recall_queries")}
    served = index.get("ef_search_served", index.get("ef_search"))
    return report if served is None else {**report, "efSearch": served}


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
