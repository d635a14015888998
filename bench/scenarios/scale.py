"""SCALE and FILTER: search at millions of vectors, approximate indexes, and filters.

SCALE. Synthetic clustered vectors (bench/synthetic.py; 10M by default, ``--vectors``) are
written once into a memory-mapped index file; each index of the issue is then built by
the project's own code (``build_approximate``, the prepare step's: hnsw, hnsw+int8,
hnsw+binary, each rescoring its candidates in float32, with efSearch raised as prepare
raises it, here to the issue's recall target) over links to that one file, and
served by a real ``tritonserver`` from a repository rendered from the example resource
with ``spec.search`` set, one index at a time. Per index: the search step (a query vector
over gRPC to ``<name>_search``, the served search model alone), end to end (a query text
over HTTP ``generate`` through the whole ``<name>`` ensemble: tokenizer, encoder, pooling,
search), recall@10 of the served results against an exact streaming scan, the search
model's resident memory, the index's files and build time. The exact index is served
only while its in-memory copy (the search model keeps a transposed float32 matrix) fits
in half of the available memory. The same three hnsw indexes are built over the
example's real embeddings (its corpus: the largest real one here) for their recall.

FILTER. An exact index of ``--filter-vectors`` (1M by default) clustered vectors with a
``tenant`` field of 100 values: each query is sent unfiltered and with a filter keeping
one tenant (about 1%), alternating, and every filtered answer is compared with a numpy
brute-force scan of the tenant's rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import servers, synthetic
from bench.alternation import Window, cores, load_per_core, quietness, settle
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import GenerateClient, closed_loop, percentiles
from bench.scenarios.s3 import label
from bench.targets import at_least, at_most
from tritonop.artifacts.approximate import build_approximate
from tritonop.artifacts.versions import fingerprint_inputs, resource_fingerprint, version_dir
from tritonop.render.repository import artifact_dirs, render_repository, write_repository
from tritonop_backend.ann import ANN_FILE, HnswSettings, kth_best_scores
from tritonop_backend.artifacts import (
    EMBEDDINGS_FILE,
    IndexManifest,
    ModelManifest,
    VersionManifest,
)
from tritonop_backend.filters import write_columns
from tritonop_backend.search import load_index

SEED = 2020
# The approximate indexes: the spec's defaults, and for binary (1 bit a dimension: its
# Hamming ranking is coarse) 20 x k candidates rescored (4: recall@10 0.58 at 50K vectors,
# 10: 0.86, 20: 0.996, 40: 1.0).
VARIANTS = {"hnsw": HnswSettings(), "hnsw+int8": HnswSettings(quantization="int8"),
            "hnsw+binary": HnswSettings(quantization="binary", rescore_factor=20)}
E2E_TARGET_MS = 15.0
RECALL_TARGET = 0.98
REAL_RECALL_TARGET = 0.99
MEMORY_TARGET_GB = 6.0
EXACT_MEMORY_SHARE = 0.5  # of the available memory, for the exact index's in-memory copy
TENANTS = 100  # one tenant's filter keeps ~1% of the rows
FILTER_RATIO_TARGET = 2.0
E2E_WARMUP = 5


def run_scale(ctx: Context) -> dict[str, Any]:
    count = ctx.sizes.scale_vectors
    model_dir, real_dir = ctx.dirs()
    model = ModelManifest.read(model_dir)
    root = ctx.scratch("scale")
    try:
        started = time.monotonic()
        vectors = _synthetic_corpus(root / "vectors", count, model.dimension)
        generated = time.monotonic() - started
        queries = synthetic.clustered_queries(SEED, ctx.sizes.scale_queries, count,
                                              model.dimension)
        started = time.monotonic()
        kth = kth_best_scores(vectors, queries, NUM_RESULTS)
        log.info("SCALE: %d vectors written in %.0f s, exact top-%d of %d queries in %.0f s",
                 count, generated, NUM_RESULTS, len(queries), time.monotonic() - started)
        indexes, windows, load_start = {}, [], None
        for variant in ("exact", *VARIANTS):
            if variant not in ctx.sizes.scale_indexes:
                indexes[variant] = {"skipped": "not run (`--indexes` left it out)"}
                continue
            try:
                found = _one_index(ctx, root, variant, vectors, model, model_dir, queries, kth)
            except Exception as err:  # one index failing (memory, a timeout) spares the rest
                log.exception("SCALE %s failed", variant)
                found = {"skipped": f"failed: {type(err).__name__}: {err}"[:500]}
            if "window" in found:
                windows.append(found.pop("window"))
                load_start = found.pop("load_start") if load_start is None else load_start
            indexes[variant] = found
        real = _real_recall(real_dir, root / "real")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    quiet = quietness(load_start or load_per_core(), load_per_core(),
                      [w["other_cores"] for w in windows], cores())
    name = headline(indexes)
    best, size = indexes.get(name, {}), label(count)
    e2e = (best.get("end_to_end_ms") or {}).get("p50")
    memory = _memory_mb(best) if best.get("end_to_end_ms") else None
    targets = [
        {**at_most("SCALE.e2e_p50", f"end-to-end search p50, {name}, {size} vectors", e2e,
                   E2E_TARGET_MS, "ms"), "noisy": quiet["noisy"]},
        at_least("SCALE.recall", f"recall@10 against exact, {name}, {size} vectors",
                 best.get("recall_at_10"), RECALL_TARGET),
        at_most("SCALE.memory", f"index memory (graph and float32 rows resident), {name}, "
                f"{size} vectors", None if memory is None else memory / 1024,
                MEMORY_TARGET_GB, "GB"),
        at_least("SCALE.real_recall", f"recall@10 against exact, {name}, {real['vectors']} "
                 "real embeddings", (real["indexes"].get(name) or {}).get("recall_at_10"),
                 REAL_RECALL_TARGET),
    ]
    return {"vectors": count, "dimension": model.dimension, "queries": len(queries),
            "clusters": synthetic.cluster_count(count), "generator": synthetic.GENERATOR,
            "generate_seconds": round(generated, 1),
            "num_results": NUM_RESULTS, "headline": name, "indexes": indexes, "real": real,
            "quiet": quiet, "targets": targets}


def headline(indexes: dict[str, dict[str, Any]]) -> str:
    """The approximate index the targets are read from: the fastest end to end among those
    meeting the recall and memory targets; else the one with the best recall."""
    served = {k: v for k, v in indexes.items() if k != "exact" and v.get("end_to_end_ms")}
    meeting = [k for k, v in served.items() if v["recall_at_10"] >= RECALL_TARGET
               and _memory_mb(v) / 1024 <= MEMORY_TARGET_GB]
    if meeting:
        return min(meeting, key=lambda k: served[k]["end_to_end_ms"]["p50"])
    if served:
        return max(served, key=lambda k: served[k]["recall_at_10"])
    return "hnsw+int8"


def _memory_mb(index: dict[str, Any]) -> float:
    """The index's resident memory (runs before 2026-12-07 measured only the whole
    search model's)."""
    return float(index.get("index_memory_mb", index["search_model_rss_mb"]))


def _synthetic_corpus(directory: Path, count: int, dim: int) -> np.ndarray:
    """Index files of ``count`` clustered vectors (embeddings and ``"v<i>"`` texts)."""
    directory.mkdir(parents=True, exist_ok=True)
    vectors = synthetic.create_embeddings(directory / EMBEDDINGS_FILE, count, dim)
    synthetic.fill_clustered(vectors, SEED)
    vectors.flush()
    synthetic.write_ids(directory, count)
    return np.memmap(directory / EMBEDDINGS_FILE, dtype="<f4", mode="r",
                     offset=vectors.offset, shape=vectors.shape)


def _serve_index(ctx: Context, root: Path, name: str, spec: dict[str, Any], source: Path,
                 model: ModelManifest, model_dir: Path, count: int,
                 build: Callable[[Path], dict[str, Any]],
                 fields: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Lay out one index version over the files in ``source`` (linked, not copied), built
    by ``build(index_dir)`` (which returns the manifest's ``index`` entry), and render the
    resource's repository for it; returns the repository and the index folder."""
    resource = ctx.resource({"metadata": {"name": name}, "spec": spec})
    artifacts = str(root / "artifacts")
    model_link, index_dir = (Path(d) for d in artifact_dirs(resource, artifacts))
    index_dir.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        (index_dir / entry.name).symlink_to(entry.resolve(), entry.is_dir())
    entry = build(index_dir)
    corpus = f"clustered-vectors-seed-{SEED}-{count}"
    IndexManifest(model_source=model.source, model_fingerprint=model.fingerprint,
                  pooling=model.pooling, max_sequence_length=model.max_sequence_length,
                  dimension=model.dimension, count=count, corpus_sha256=corpus,
                  fields=fields or {}, index=entry).write(index_dir)
    model_link.symlink_to(model_dir.resolve(), target_is_directory=True)
    VersionManifest(resource_fingerprint(resource), fingerprint_inputs(resource),
                    corpus).write(Path(version_dir(resource, artifacts)))
    write_repository(render_repository([resource], artifacts), root / "repository")
    return root / "repository", index_dir


def _one_index(ctx: Context, root: Path, variant: str, vectors: np.ndarray,
               model: ModelManifest, model_dir: Path, queries: np.ndarray, kth: np.ndarray
               ) -> dict[str, Any]:
    count = len(vectors)
    available = _available_bytes()
    if variant == "exact" and vectors.nbytes > EXACT_MEMORY_SHARE * available:
        why = (f"not served: the exact index keeps a {vectors.nbytes / 2**30:.1f} GiB float32 "
               f"copy in memory, over {EXACT_MEMORY_SHARE:.0%} of the "
               f"{available / 2**30:.1f} GiB available")
        log.info("SCALE exact: %s", why)
        return {"skipped": why}
    if variant == "hnsw" and vectors.nbytes / 2**30 > MEMORY_TARGET_GB:
        # It could not be the headline: the graph itself holds every float32 row. Building
        # it would take most of the scenario's time (3,500 vectors/s on two cores).
        why = (f"not built: its graph holds the {vectors.nbytes / 2**30:.1f} GB of float32 "
               f"vectors, over the {MEMORY_TARGET_GB:.0f} GB memory target by themselves")
        log.info("SCALE hnsw: %s", why)
        return {"skipped": why}
    if variant == "hnsw" and 1.2 * vectors.nbytes > 0.8 * available:
        why = (f"not built: usearch holds the {vectors.nbytes / 2**30:.1f} GiB of float32 "
               f"vectors in memory while building, and {available / 2**30:.1f} GiB are "
               "available")
        log.info("SCALE hnsw: %s", why)
        return {"skipped": why}
    name = "scale-" + variant.replace("hnsw+", "")
    work = root / name

    def build(index_dir: Path) -> dict[str, Any]:
        return {} if variant == "exact" else build_approximate(
            index_dir, vectors, VARIANTS[variant], min_recall=RECALL_TARGET)

    settings = VARIANTS.get(variant)
    spec = {} if settings is None else {"search": {
        "index": "hnsw", "quantization": settings.quantization,
        "hnsw": {"rescoreFactor": settings.rescore_factor}}}
    repository, index_dir = _serve_index(ctx, work, name, spec, root / "vectors", model,
                                         model_dir, count, build)
    manifest = IndexManifest.read(index_dir)
    graph = index_dir / ANN_FILE
    result: dict[str, Any] = {
        "index": manifest.index or {"kind": "exact"},
        "build_seconds": manifest.index.get("build_seconds"),  # the graph's, as prepare's
        "graph_mb": round(graph.stat().st_size / 2**20, 1) if graph.exists() else None,
        "float32_rows_mb": round(vectors.nbytes / 2**20, 1),
    }
    load_start = settle(ctx.sizes.settle_seconds)
    try:
        with servers.triton_repository(repository, work / "work") as server:
            window = Window.open()
            steps, found = _search_steps(server.grpc_url, f"{name}_search", queries)
            texts = ctx.queries()
            result["end_to_end_ms"] = _end_to_end(server.http_url, name,
                                                  texts[:ctx.sizes.scale_queries])
            result["window"] = window.close()
            stubs = servers.stub_processes(server, f"{name}_search")
            result["search_model_rss_mb"] = round(
                sum(p.memory_info().rss for p in stubs) / 2**20, 1)
            if variant != "exact":  # whose in-memory copy is the process's own memory
                result["resident_mb"] = _resident_files(
                    stubs, {"graph": graph, "float32_rows": index_dir / EMBEDDINGS_FILE})
                # The whole graph, as a search may visit any of it, and the float32 rows
                # resident after this run's queries: the rows rescoring read, and the
                # pages around them that the kernel maps on each fault (clean file pages,
                # which it may drop; more queries touch more of them).
                result["index_memory_mb"] = round(
                    result["graph_mb"] + result["resident_mb"]["float32_rows"], 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update({"load_start": load_start, "search_step_ms": percentiles(steps),
                   "recall_at_10": round(synthetic.recall_at_k(found, kth, NUM_RESULTS), 4)})
    log.info("SCALE %s: search step p50 %.2f ms, end to end p50 %.2f ms, recall@10 %.4f, "
             "rss %.0f MB", variant, result["search_step_ms"]["p50"],
             result["end_to_end_ms"]["p50"], result["recall_at_10"],
             result["search_model_rss_mb"])
    return result


def _resident_files(processes: list[Any], files: dict[str, Path]) -> dict[str, float]:
    """MB of each of ``files`` resident in ``processes``' memory (their mapped pages that
    are in memory, from /proc/<pid>/smaps): the index's own memory, apart from the
    process's runtime and the corpus texts."""
    names = {os.path.realpath(path): name for name, path in files.items()}
    found = dict.fromkeys(files, 0.0)
    for process in processes:  # instances share a file's pages: the most any one maps
        for mapping in process.memory_maps(grouped=True):
            name = names.get(os.path.realpath(mapping.path))
            if name is not None:
                found[name] = max(found[name], mapping.rss / 2**20)
    return {name: round(mb, 1) for name, mb in found.items()}


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _search_steps(url: str, model: str, queries: np.ndarray,
                  search_filter: dict[str, Any] | None = None
                  ) -> tuple[list[float], list[np.ndarray]]:
    """Each query vector once over gRPC (after a warm-up): latencies, returned scores."""
    latencies, scores = [], []
    with _Searcher(url, model) as search:
        for query in queries[:5]:
            search(query, search_filter)
        for query in queries:
            started = time.perf_counter()
            _, found = search(query, search_filter)
            latencies.append(time.perf_counter() - started)
            scores.append(found)
    return latencies, scores


class _Searcher:
    """``<name>_search`` over gRPC: a unit query vector (+ a filter) -> ids, scores."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model

    def __enter__(self) -> _Searcher:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def __call__(self, query: np.ndarray, search_filter: dict[str, Any] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        grpc = self.grpc
        inputs = [grpc.InferInput("embedding", [1, len(query)], "FP32"),
                  grpc.InferInput("num_results", [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(query[None, :].astype(np.float32))
        inputs[1].set_data_from_numpy(np.array([[NUM_RESULTS]], dtype=np.int32))
        if search_filter is not None:
            inputs.append(grpc.InferInput("filter", [1, 1], "BYTES"))
            inputs[2].set_data_from_numpy(
                np.array([[json.dumps(search_filter).encode()]], dtype=object))
        answer = self.client.infer(self.model, inputs)
        return answer.as_numpy("ids")[0], answer.as_numpy("scores")[0]


def _end_to_end(http_url: str, model: str, texts: list[str]) -> dict[str, float] | None:
    """p50/p90/p99 of one client sending each text through the ensemble's ``generate``."""
    async def measure() -> Any:
        async with GenerateClient(f"http://{http_url}/v2/models/{model}/generate",
                                  NUM_RESULTS) as client:
            await closed_loop(client, texts[:E2E_WARMUP], 1, count=E2E_WARMUP)
            return await closed_loop(client, texts, 1, count=len(texts))

    summary = asyncio.run(measure()).summary()
    if summary["statuses"].keys() - {"200"}:
        raise RuntimeError(f"end-to-end requests to {model} failed: {summary['statuses']}")
    return summary["latency_ms"]


def _real_recall(index_dir: Path, root: Path) -> dict[str, Any]:
    """The three hnsw indexes over the example's real embeddings: recall@10 measured by
    ``build_approximate`` (1,000 of the corpus's own vectors as queries), build time,
    graph size."""
    embeddings = np.ascontiguousarray(load_index(index_dir)[0].embeddings)
    indexes = {}
    for variant, settings in VARIANTS.items():
        directory = root / variant
        entry = build_approximate(directory, embeddings, settings,
                                  min_recall=REAL_RECALL_TARGET)
        indexes[variant] = {"recall_at_10": entry["recall_at_10"],
                            "recall_queries": entry["recall_queries"],
                            "build_seconds": entry["build_seconds"],
                            "graph_mb": round((directory / ANN_FILE).stat().st_size / 2**20, 2)}
        shutil.rmtree(directory, ignore_errors=True)
    return {"vectors": len(embeddings), "indexes": indexes}


def run_filter(ctx: Context) -> dict[str, Any]:
    count = ctx.sizes.filter_vectors
    model_dir, _ = ctx.dirs()
    model = ModelManifest.read(model_dir)
    root = ctx.scratch("filter")
    try:
        vectors = _synthetic_corpus(root / "vectors", count, model.dimension)
        tenants = np.random.default_rng([SEED, 3]).integers(0, TENANTS, count)
        kept = np.flatnonzero(tenants == 7)
        search_filter = {"tenant": "t7"}
        fields = {"tenant": "string"}

        def build(index_dir: Path) -> dict[str, Any]:
            write_columns(index_dir, fields, {"tenant": [f"t{t}" for t in tenants]})
            return {}

        spec = {"corpus": {"fields": [{"name": "tenant", "type": "string"}]}}
        repository, _ = _serve_index(ctx, root / "served", "filtered", spec, root / "vectors",
                                  model, model_dir, count, build, fields)
        queries = synthetic.clustered_queries(SEED, ctx.sizes.scale_queries, count,
                                              model.dimension)
        load_start = settle(ctx.sizes.settle_seconds)
        plain, filtered, equal = [], [], 0
        with servers.triton_repository(repository, root / "work") as server, \
                _Searcher(server.grpc_url, "filtered_search") as search:
            window = Window.open()
            for query in queries[:5]:
                search(query)
                search(query, search_filter)
            for query in queries:
                started = time.perf_counter()
                search(query)
                plain.append(time.perf_counter() - started)
                started = time.perf_counter()
                ids, scores = search(query, search_filter)
                filtered.append(time.perf_counter() - started)
                equal += synthetic.same_results(
                    ids, scores, *synthetic.filtered_scan(vectors, kept, query, NUM_RESULTS))
            noise = window.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    quiet = quietness(load_start, load_per_core(), [noise["other_cores"]], cores())
    unfiltered_ms, filtered_ms = percentiles(plain), percentiles(filtered)
    assert unfiltered_ms is not None and filtered_ms is not None
    ratio = filtered_ms["p50"] / unfiltered_ms["p50"]
    size = label(count)
    return {"vectors": count, "generator": synthetic.GENERATOR, "queries": len(queries),
            "kept_rows": len(kept),
            "kept_share": round(len(kept) / count, 4), "filter": search_filter,
            "unfiltered_ms": unfiltered_ms, "filtered_ms": filtered_ms,
            "p50_ratio": round(ratio, 3), "equal_to_scan": round(equal / len(queries), 4),
            "quiet": quiet, "cpu_count": os.cpu_count(),
            "targets": [
                {**at_most("FILTER.p50_ratio", f"filter keeping {len(kept) / count:.1%} of "
                           f"{size} vectors, p50 / unfiltered p50 (exact index)", ratio,
                           FILTER_RATIO_TARGET, "x"), "noisy": quiet["noisy"]},
                at_least("FILTER.equal", f"filtered results equal to a numpy filtered scan, "
                         f"{size} vectors", equal / len(queries), 1.0,
                         goal="100% of queries")]}
