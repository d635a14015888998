"""The approximate (hnsw) index against numpy's exact search: recall, quantization with
rescoring, filters, memory-mapped loading, the recall report of prepare, and the spec.

Recall bounds are stated per test and hold with a wide margin on these clustered synthetic
vectors (measured when written: 0.98-1.0 where the bound is 0.95); the graph is built
with several threads, so its exact edges vary from run to run, its recall barely.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.crd_schema import validation_errors
from tritonop import crd
from tritonop.artifacts import approximate
from tritonop.artifacts.approximate import build_approximate, check_recall, index_report
from tritonop.artifacts.index import build_index
from tritonop.artifacts.versions import fingerprint_inputs, resource_fingerprint
from tritonop.resources import ResourceError, parse_resource
from tritonop_backend import ann
from tritonop_backend.ann import ANN_FILE, HnswSearcher, HnswSettings, build_graph
from tritonop_backend.artifacts import MANIFEST_FILE, ArtifactError, IndexManifest
from tritonop_backend.search import ApproximateIndex, load_index, write_index
from tritonop_backend.stages import SearchStage

DIM = 96


def clustered(count: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around ``clusters`` centres, like embeddings of texts on some topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    x = centres[rng.integers(0, clusters, count)] + 0.9 * rng.standard_normal((count, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


VECTORS = clustered(4200)
CORPUS, QUERIES = VECTORS[:4000], VECTORS[4000:]  # held-out queries from the same topics


def numpy_top_k(queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row ids by cosine, the reference (rows: the ids searched)."""
    scores = queries @ CORPUS[rows].T
    return rows[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t)
                          for f, t in zip(found, truth, strict=True)]))


def searcher(tmp_path: Path, **settings) -> HnswSearcher:
    chosen = HnswSettings(**settings)
    build_graph(CORPUS, chosen, tmp_path / ANN_FILE, threads=2)
    return HnswSearcher(tmp_path / ANN_FILE, CORPUS, chosen)


@pytest.mark.parametrize(("quantization", "rescore_factor", "bound"), [
    ("none", 1, 0.95), ("int8", 4, 0.95), ("binary", 10, 0.95)])
def test_hnsw_finds_what_numpy_finds(tmp_path, quantization, rescore_factor, bound):
    index = searcher(tmp_path, quantization=quantization, rescore_factor=rescore_factor)
    ids, scores = index.search(QUERIES, 10)
    truth = numpy_top_k(QUERIES, np.arange(len(CORPUS)), 10)
    assert recall(ids, truth) >= bound
    one_by_one = [index.search(query[None], 10) for query in QUERIES[:20]]  # usearch: Matches
    assert [found[0][0].tolist() for found in one_by_one] == [f.tolist() for f in ids[:20]]
    for query, found, score in zip(QUERIES, ids, scores, strict=True):
        # Rescored in float32: the exact cosine of each row returned, best first.
        np.testing.assert_allclose(score, CORPUS[found] @ query, atol=1e-5)
        assert np.all(np.diff(score) <= 0) and len(set(found.tolist())) == 10


def test_rescoring_is_what_makes_binary_usable(tmp_path):
    truth = numpy_top_k(QUERIES, np.arange(len(CORPUS)), 10)
    bare = searcher(tmp_path, quantization="binary", rescore_factor=1).search(QUERIES, 10)[0]
    rescored = searcher(tmp_path, quantization="binary", rescore_factor=10).search(
        QUERIES, 10)[0]
    assert recall(bare, truth) < 0.8 < 0.95 <= recall(rescored, truth)


def test_binary_with_its_default_rescore_factor_finds_what_numpy_finds(tmp_path):
    found = searcher(tmp_path, quantization="binary").search(QUERIES, 10)[0]
    assert recall(found, numpy_top_k(QUERIES, np.arange(len(CORPUS)), 10)) >= 0.95


def test_a_binary_graph_builds_from_a_transposed_view(tmp_path):
    """Rows read as the transpose of a column-major file (an index loaded from disk) build
    a binary graph as contiguous rows do (usearch refuses rows that are not contiguous)."""
    chosen = HnswSettings(quantization="binary", rescore_factor=10)
    build_graph(np.asfortranarray(CORPUS.T).T, chosen, tmp_path / ANN_FILE, threads=2)
    found = HnswSearcher(tmp_path / ANN_FILE, CORPUS, chosen).search(QUERIES, 10)[0]
    assert recall(found, numpy_top_k(QUERIES, np.arange(len(CORPUS)), 10)) >= 0.95


@pytest.mark.parametrize("exact_below", [ann.EXACT_FILTER_ROWS, 10])
def test_filtered_results_always_satisfy_the_filter(tmp_path, monkeypatch, exact_below):
    """Small filters scan their rows exactly; large ones (exact_below=10 sends every filter
    here through the graph) drop the candidates outside and fall back when too few stay."""
    monkeypatch.setattr(ann, "EXACT_FILTER_ROWS", exact_below)
    index = searcher(tmp_path, quantization="int8")
    rng = np.random.default_rng(3)
    for share in (0.005, 0.1, 0.5, 0.9):
        rows = np.sort(rng.choice(len(CORPUS), int(share * len(CORPUS)), replace=False))
        ids, _ = index.search(QUERIES, 10, rows)
        truth = numpy_top_k(QUERIES, rows, 10)
        assert all(np.isin(found, rows).all() and len(found) == 10 for found in ids)
        if exact_below > len(rows) or len(rows) * ann.MAX_OVERSAMPLE < len(CORPUS):
            assert [f.tolist() for f in ids] == truth.tolist()  # the exact scan
        else:
            assert recall(ids, truth) >= 0.95
    few = np.array([7, 4000 - 1])
    ids, _ = index.search(QUERIES[:3], 10, few)
    assert [f.tolist() for f in ids] == numpy_top_k(QUERIES[:3], few, 10).tolist()
    ids, _ = index.search(QUERIES[:3], 10, np.array([], dtype=np.int64))
    assert [len(f) for f in ids] == [0, 0, 0]


def test_measured_recall_is_numpys_recall(tmp_path):
    """A deliberately poor graph, so that the figure is not just 1.0."""
    index = searcher(tmp_path, quantization="binary", rescore_factor=1, connectivity=4,
                     ef_search=8)
    measured, queries = ann.measure_recall(index, CORPUS, sample=300, seed=5)
    chosen = np.sort(np.random.default_rng(5).choice(len(CORPUS), 300, replace=False))
    found, _ = index.search(CORPUS[chosen], 10)
    assert queries == 300
    assert measured == pytest.approx(recall(found, numpy_top_k(CORPUS[chosen],
                                                               np.arange(len(CORPUS)), 10)))
    assert measured < 0.9


def test_an_hnsw_index_loads_memory_mapped(tmp_path):
    texts = [f"text {i}" for i in range(len(CORPUS))]
    settings = HnswSettings(quantization="int8")
    report = build_approximate(tmp_path, CORPUS, settings, threads=2)
    manifest = IndexManifest(model_source="m", model_fingerprint="f", pooling="mean",
                             max_sequence_length=16, dimension=DIM, count=len(CORPUS),
                             corpus_sha256="x", index=report)
    write_index(tmp_path, CORPUS, texts, manifest)
    index, read = load_index(tmp_path)
    assert isinstance(index, ApproximateIndex) and read.index == report
    assert report["recall_at_10"] >= 0.95 and report["recall_queries"] == 1000
    # Neither the vectors nor the graph are read into the process: both are mappings.
    assert isinstance(index.embeddings, np.memmap)
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / ANN_FILE) in maps
    found = index.search(QUERIES[:5], 3)
    assert found.ids.shape == (5, 3) and index.texts[found.ids[0, 0]].startswith(b"text ")


def test_recall_below_min_recall_fails_naming_both():
    check_recall({"kind": "hnsw", "recall_at_10": 0.96, "recall_queries": 1000}, 0.95)
    check_recall({}, 1.0)  # the exact index has nothing to check
    with pytest.raises(ArtifactError, match=r"recall@10 is 0\.9012 \(measured against the "
                       r"exact index on 1000 corpus texts\), below spec\.search\.minRecall "
                       r"0\.95"):
        check_recall({"kind": "hnsw", "recall_at_10": 0.9012, "recall_queries": 1000}, 0.95)


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory, corpus) -> Path:
    """The demo corpus's texts (real embeddings, real near-duplicates)."""
    return corpus


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    """An embedding cache for the builds below, as prepare keeps one: the corpus is embedded
    once, not at every build."""
    return tmp_path_factory.mktemp("vectors")


def test_build_index_writes_the_recall_of_real_embeddings(tmp_path, exported, real_corpus,
                                                          vectors):
    settings = HnswSettings(quantization="int8")
    built = build_index(real_corpus, exported["onnx"], tmp_path / "index", progress=False,
                        hnsw=settings, min_recall=0.95, embedding_cache=vectors)
    report = built.manifest.index
    assert report["kind"] == "hnsw" and report["quantization"] == "int8"
    assert report["library"].startswith("usearch ")
    assert report["recall_queries"] == 1000 and report["recall_at_10"] >= 0.95
    assert IndexManifest.read(tmp_path / "index").index == report
    assert index_report(built.manifest)["recallAt10"] == report["recall_at_10"]
    # The same settings reuse it; another quantization builds again; exact drops the graph.
    assert build_index(real_corpus, exported["onnx"], tmp_path / "index", progress=False,
                       hnsw=settings).skipped
    index, _ = load_index(tmp_path / "index")
    exact = index.embeddings @ index.embeddings[:50].T
    found = index.search(np.asarray(index.embeddings[:50]), 10)
    truth = np.argsort(-exact.T, axis=1, kind="stable")[:, :10]
    kth = np.take_along_axis(exact.T, truth, axis=1)[:, -1]
    # Near-duplicate texts tie: a found row counts when it scores as well as the 10th.
    assert np.mean(found.scores >= kth[:, None] - 1e-6) >= 0.95
    # The search model serves it, says so, and refuses a config that expects another index.
    parameters = {"model_dir": str(exported["onnx"]), "index_dir": str(tmp_path / "index"),
                  "pooling": "auto", "max_sequence_length": "auto", "index": "hnsw"}
    stage = SearchStage(parameters)
    assert stage.description.startswith(f"hnsw index of {len(index)} vectors (usearch")
    assert "quantization int8" in stage.description and "recall@10 0." in stage.description
    (served,) = stage.run([{"embedding": np.asarray(index.embeddings[:2]),
                            "num_results": np.array([[5], [5]], np.int32), "filter": None}])
    assert served["ids"][:, 0].tolist() == [0, 1] or served["scores"][:, 0].min() > 0.999
    with pytest.raises(ArtifactError, match="holds an hnsw index, but this model's config "
                       "says exact"):
        SearchStage({**parameters, "index": "exact"})
    plain = build_index(real_corpus, exported["onnx"], tmp_path / "index", progress=False,
                        embedding_cache=vectors)
    assert not plain.skipped and plain.manifest.index == {}
    assert not isinstance(load_index(tmp_path / "index")[0], ApproximateIndex)
    assert SearchStage({**parameters, "index": "exact"}).description.startswith("exact index")


def test_build_index_fails_below_min_recall_and_leaves_no_index(tmp_path, exported,
                                                                 real_corpus, vectors):
    poor = HnswSettings(quantization="binary", rescore_factor=1, connectivity=4, ef_search=8)
    with pytest.raises(ArtifactError, match=r"recall@10 is 0\.\d{4} .* below "
                       r"spec\.search\.minRecall 0\.95"):
        build_index(real_corpus, exported["onnx"], tmp_path / "index", progress=False,
                    hnsw=poor, min_recall=0.95, embedding_cache=vectors)
    assert not (tmp_path / "index" / MANIFEST_FILE).exists()


# --- the spec ---------------------------------------------------------------------------

API = "serving.tritonop.dev/v1alpha1"
CRD = crd.custom_resource_definition("EmbeddingSearch")


def resource_doc(**search) -> dict:
    return {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "x"},
            "spec": {"corpus": {"source": "/data/c.jsonl"}, "search": search}}


def test_defaults_keep_the_exact_index_and_its_fingerprint():
    plain = parse_resource(resource_doc())
    assert plain.spec.search.index == "exact" and plain.spec.search.quantization == "none"
    assert plain.spec.search.min_recall == 0.95
    assert "search.index" not in fingerprint_inputs(plain)
    assert approximate.hnsw_settings(plain.spec) is None


def test_index_settings_name_a_version_min_recall_does_not():
    base = resource_fingerprint(parse_resource(resource_doc()))
    hnsw = resource_fingerprint(parse_resource(resource_doc(index="hnsw")))
    int8 = resource_fingerprint(parse_resource(resource_doc(index="hnsw", quantization="int8")))
    ef = resource_fingerprint(parse_resource(resource_doc(index="hnsw", hnsw={"efSearch": 99})))
    strict = resource_fingerprint(parse_resource(resource_doc(index="hnsw", minRecall=0.99)))
    assert len({base, hnsw, int8, ef}) == 4 and strict == hnsw
    chosen = approximate.hnsw_settings(parse_resource(resource_doc(
        index="hnsw", quantization="binary", hnsw={"connectivity": 32, "efConstruction": 200,
                                                   "efSearch": 100, "rescoreFactor": 8})).spec)
    assert chosen == HnswSettings(32, 200, 100, "binary", 8)


@pytest.mark.parametrize(("quantization", "given", "resolved"), [
    ("int8", None, 4), ("binary", None, 20), ("none", None, 4), ("binary", 4, 4),
    ("int8", 30, 30)])
def test_an_unset_rescore_factor_is_its_quantizations_default(quantization, given, resolved):
    hnsw = {} if given is None else {"rescoreFactor": given}
    spec = parse_resource(resource_doc(index="hnsw", quantization=quantization,
                                       hnsw=hnsw)).spec
    assert spec.search.hnsw.rescore_factor == given
    chosen = approximate.hnsw_settings(spec)
    assert chosen is not None and chosen.rescore_factor == resolved
    assert chosen.candidates(10) == (10 if quantization == "none" else 10 * resolved)
    assert HnswSettings.from_manifest(chosen.as_manifest()) == chosen


def test_the_version_names_the_rescore_factor_used():
    """Unset is the resolved default: int8 versions built when 4 was everyone's default
    keep their fingerprints; binary ones are built again with 20."""
    def version(quantization: str, **hnsw) -> str:
        return resource_fingerprint(parse_resource(resource_doc(
            index="hnsw", quantization=quantization, hnsw=hnsw)))

    assert version("int8") == version("int8", rescoreFactor=4)
    assert version("binary") == version("binary", rescoreFactor=20) != version(
        "binary", rescoreFactor=4)
    # An index built before keeps the factor its manifest names.
    old = {"kind": "hnsw", "quantization": "binary", "rescore_factor": 4}
    assert HnswSettings.from_manifest(old).rescore_factor == 4


@pytest.mark.parametrize(("search", "server_says", "model_says"), [
    ({"quantization": "int8"}, "quantization needs index: hnsw",
     "spec.search: quantization needs index: hnsw"),
    ({"index": "ivf"}, "'ivf' is not one of ['exact', 'hnsw']", "spec.search.index"),
    ({"index": "hnsw", "quantization": "pq"}, "'pq' is not one of", "spec.search.quantization"),
    ({"minRecall": 1.5}, "1.5 is greater than the maximum of 1", "spec.search.minRecall"),
    ({"hnsw": {"connectivity": 2}}, "2 is less than the minimum of 4",
     "spec.search.hnsw.connectivity"),
    ({"hnsw": {"rescoreFactor": 0}}, "0 is less than the minimum of 1",
     "spec.search.hnsw.rescoreFactor"),
])
def test_bad_index_settings_are_refused_by_crd_and_model(search, server_says, model_says):
    doc = resource_doc(**search)
    assert any(server_says in error for error in validation_errors(CRD, doc)), \
        validation_errors(CRD, doc)
    with pytest.raises(ResourceError) as err:
        parse_resource(doc)
    assert model_says in str(err.value)


def test_a_good_hnsw_spec_passes_the_crd():
    doc = resource_doc(index="hnsw", quantization="binary", minRecall=0.9,
                       hnsw={"connectivity": 32, "efSearch": 128, "rescoreFactor": 10})
    assert validation_errors(CRD, doc) == []
    assert json.dumps(parse_resource(doc).spec.search.model_dump(by_alias=True))


# --- status.index: the prepare Job's termination message -> the operator's plan -----------

def test_a_complete_prepare_job_reports_its_index_in_the_status():
    from tritonop.controller.artifacts import plan, prepared_index
    from tritonop.render.kubernetes import Images
    from tritonop.status import ResourceStatus

    resource = parse_resource({
        "apiVersion": API, "kind": "EmbeddingSearch",
        "metadata": {"name": "news", "namespace": "ml"},
        "spec": {"corpus": {"source": "/artifacts/c.jsonl"}, "artifacts": {"prepare": "job"},
                 "search": {"index": "hnsw", "quantization": "int8"}}})
    version = resource_fingerprint(resource)
    said = json.dumps({"name": "news", "version": version, "index": {
        "kind": "hnsw", "quantization": "int8", "recallAt10": 0.9871, "recallQueries": 1000}})
    pod = {"status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "prepare", "state": {"terminated": {"message": said}}}]}}
    complete = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    done = plan(resource, ResourceStatus(), lambda child: {**child, "status": complete},
                lambda child: None, Images(), pods=lambda job: [pod])
    assert done.version == version and done.index is not None
    shown = done.index.model_dump(by_alias=True, exclude_none=True)
    assert shown == {"version": version, "kind": "hnsw", "quantization": "int8",
                     "recallAt10": 0.9871, "recallQueries": 1000}
    # Once recorded, it stays with its version; a message of another version is no report.
    again = plan(resource, ResourceStatus(artifacts_version=version, index=done.index),
                 lambda child: child, lambda child: None, Images())
    assert again.index == done.index
    assert prepared_index(said, "another") is None and prepared_index("error: x", version) is None


def test_prepare_cli_writes_the_index_report(tmp_path, monkeypatch):
    """`tritonop prepare`'s termination message, with prepare itself stubbed out."""
    from tritonop import cli
    from tritonop.artifacts import prepare as prepare_module

    spec = {"corpus": {"source": str(tmp_path / "c.jsonl")},
            "search": {"index": "hnsw", "quantization": "binary"}}
    path = tmp_path / "news.yaml"
    path.write_text(json.dumps({"apiVersion": API, "kind": "EmbeddingSearch",
                                "metadata": {"name": "news"}, "spec": spec}))
    resource = parse_resource(json.loads(path.read_text()))
    index_dir = tmp_path / "root" / "news" / resource_fingerprint(resource) / "index"
    index_dir.mkdir(parents=True)
    IndexManifest(model_source="m", model_fingerprint="f", pooling="mean",
                  max_sequence_length=16, dimension=8, count=3, corpus_sha256="x",
                  index={"kind": "hnsw", "quantization": "binary", "recall_at_10": 0.97,
                         "recall_queries": 3, "ef_search": 64,
                         "ef_search_served": 128}).write(index_dir)
    monkeypatch.setattr(prepare_module, "prepare", lambda resources, *a, **k: resources)
    log = tmp_path / "termination-log"
    assert cli.main(["prepare", "-f", str(path), "--artifacts-root", str(tmp_path / "root"),
                     "--termination-log", str(log)]) == 0
    assert json.loads(log.read_text()) == {
        "name": "news", "version": resource_fingerprint(resource),
        "index": {"kind": "hnsw", "quantization": "binary", "recallAt10": 0.97,
                  "recallQueries": 3, "efSearch": 128}}


def test_the_gateway_model_card_says_which_index():
    import asyncio

    import httpx

    from tests.support.triton import free_port
    from tritonop.gateway.app import create_app
    from tritonop.gateway.backend import TritonAddress
    from tritonop.gateway.config import GatewayConfig, gateway_config

    config = gateway_config([
        parse_resource({**resource_doc(index="hnsw", quantization="int8"),
                        "metadata": {"name": "docs"}}),
        parse_resource({**resource_doc(), "metadata": {"name": "news"}})])
    config = GatewayConfig.from_json(config.to_json())  # as the ConfigMap carries it

    async def cards() -> dict:
        app = create_app(config, TritonAddress(f"localhost:{free_port()}",
                                               f"localhost:{free_port()}"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://gateway") as client:
            return (await client.get("/v1/models")).json()

    shown = {card["id"]: card.get("index") for card in asyncio.run(cards())["data"]}
    assert shown == {"docs": "hnsw+int8", "news": "exact"}
