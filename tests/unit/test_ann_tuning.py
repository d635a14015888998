"""Prepare raises efSearch until the graph's measured recall reaches minRecall."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_ann_index import CORPUS, DIM, QUERIES, numpy_top_k, recall
from tritonop.artifacts.approximate import (
    MAX_EF_SEARCH,
    build_approximate,
    check_recall,
    index_report,
)
from tritonop_backend.ann import HnswSettings
from tritonop_backend.artifacts import ArtifactError, IndexManifest
from tritonop_backend.search import load_index, write_index

POOR = HnswSettings(connectivity=4, ef_construction=16, ef_search=8)
"""A sparse graph searched narrowly: its recall at efSearch 8 is well below 0.97."""


def served_index(directory, report):
    manifest = IndexManifest(model_source="m", model_fingerprint="f", pooling="mean",
                             max_sequence_length=16, dimension=DIM, count=len(CORPUS),
                             corpus_sha256="x", index=report)
    write_index(directory, CORPUS, [str(i) for i in range(len(CORPUS))], manifest)
    return load_index(directory)[0]


def test_ef_search_is_raised_until_recall_reaches_min_recall(tmp_path):
    untuned = build_approximate(tmp_path / "a", CORPUS, POOR)
    assert untuned["ef_search_served"] == 8 and untuned["recall_at_10"] < 0.97

    report = build_approximate(tmp_path / "b", CORPUS, POOR, min_recall=0.97)
    served = report["ef_search_served"]
    assert report["recall_at_10"] >= 0.97
    assert 8 < served <= MAX_EF_SEARCH and served & (served - 1) == 0  # 8 doubled
    # The fingerprint's settings stay the spec's; the served search uses the raised one.
    assert HnswSettings.from_manifest(report) == POOR
    assert index_report(IndexManifest(
        model_source="m", model_fingerprint="f", pooling="mean", max_sequence_length=16,
        dimension=DIM, count=len(CORPUS), corpus_sha256="x", index=report))["efSearch"] == served
    check_recall(report, 0.97)

    # Served from its manifest, held-out queries against numpy's brute force.
    tuned = served_index(tmp_path / "b", report)
    assert tuned.searcher.settings.ef_search == served
    plain = served_index(tmp_path / "a", untuned)
    truth = numpy_top_k(QUERIES, np.arange(len(CORPUS)), 10)
    tuned_recall = recall(tuned.search(QUERIES, 10).ids, truth)
    assert tuned_recall >= 0.95
    assert tuned_recall > recall(plain.search(QUERIES, 10).ids, truth)


def test_a_graph_that_cannot_reach_min_recall_still_fails_naming_the_knobs(tmp_path):
    report = build_approximate(tmp_path, CORPUS, POOR, min_recall=1.01)
    assert report["ef_search_served"] == MAX_EF_SEARCH
    with pytest.raises(ArtifactError, match=r"efSearch 1024, raised as far as 1024\): raise "
                       r"spec\.search\.hnsw\.connectivity"):
        check_recall(report, 1.01)
