"""The hnsw index served by a real tritonserver, against numpy's exact search of the same
vectors: recall, exact scores, filters always satisfied, and the config saying which index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.support.triton import get_json
from tritonop.render.repository import artifact_dirs
from tritonop_backend.artifacts import IndexManifest

pytestmark = pytest.mark.triton

QUERIES = ["europe climate change storm", "text editor for programmers", "Zürich weather",
           "library for parsing JSON", "real-time strategy game", "firmware flasher",
           "python web framework", "font for terminals", "video player", "database server"]


@pytest.fixture(scope="module")
def hn(triton):
    index_dir = artifact_dirs(triton.resources["hn"], str(triton.artifacts_root))[1]
    matrix = load_file(f"{index_dir}/embeddings.safetensors")["embeddings"]
    return matrix, IndexManifest.read(index_dir)


def query_vector(triton, text: str) -> np.ndarray:
    status, body = triton.generate("hn_embedding", {"text": text})
    assert status == 200, body
    query = np.array(body["embedding"], dtype=np.float32)
    return query / np.linalg.norm(query)


def test_the_config_and_manifest_say_which_index(triton, hn):
    config = get_json(f"{triton.http}/v2/models/hn_search/config")
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert parameters["index"] == "hnsw" and parameters["quantization"] == "int8"
    _, manifest = hn
    assert manifest.index["kind"] == "hnsw" and manifest.index["recall_at_10"] >= 0.95


def test_served_hnsw_results_are_numpys_within_recall(triton, hn):
    matrix, _ = hn
    found = total = 0
    for text in QUERIES:
        status, body = triton.generate("hn", {"text": text, "num_results": 10})
        assert status == 200, body
        scores = matrix @ query_vector(triton, text)
        kth = np.sort(scores)[-10]
        # Rescored in float32: each served score is the exact cosine of its row.
        np.testing.assert_allclose(body["scores"], scores[body["ids"]], atol=1e-5)
        assert body["scores"] == sorted(body["scores"], reverse=True)
        found += int((np.array(body["scores"]) >= kth - 1e-6).sum())
        total += 10
    assert found / total >= 0.95


def test_filtered_hnsw_results_satisfy_the_filter(triton, hn, corpus):
    matrix, _ = hn
    packages = [json.loads(line)["package"] for line in corpus.read_text().splitlines()[:1500]]
    wanted = packages[::40]  # 38 packages: an exact scan of their rows
    rows = np.flatnonzero(np.isin(packages + [None] * (len(matrix) - len(packages)), wanted))
    text = "packaging system"
    status, body = triton.generate("hn", {"text": text, "num_results": 5,
                                          "filter": json.dumps({"package": {"in": wanted}})})
    assert status == 200, body
    scores = matrix[rows] @ query_vector(triton, text)
    assert body["ids"] == rows[np.argsort(-scores, kind="stable")[:5]].tolist()
