"""S3: search-only latency at 20K, 200K and 1M vectors against a numpy scan.

For each size, random unit vectors (384 dimensions, fixed seed) are written as a
tritonop index, and a Triton repository holding only the search model is rendered
from the resource under test (so its batching settings are the ones measured). One
client sends query vectors over gRPC to ``<name>_search``; between two Triton
queries the same query is scanned in this process with numpy (matrix product,
``argpartition``, sort of the k best) over the same matrix, so both see the same
minutes of a shared machine. The scan gets as many BLAS threads as Triton's search
model has (the local runtime starts every model with ``OMP_NUM_THREADS=1``); a scan
on all cores is timed too, to show what a multi-threaded search model would gain.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import servers
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import percentiles
from bench.targets import at_most
from tritonop.artifacts.versions import fingerprint_inputs, resource_fingerprint, version_dir
from tritonop.render.repository import artifact_dirs, render_repository, write_repository
from tritonop_backend.artifacts import IndexManifest, ModelManifest, VersionManifest
from tritonop_backend.search import write_index

DIMENSION = 384
SEED = 384
RATIO_TARGET = 1.3


def label(count: int) -> str:
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}m"
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000}k"
    return str(count)


def unit_vectors(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIMENSION), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def numpy_scan(matrix: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """What one writes by hand: scores, partial sort, then sort the k best."""
    scores = matrix @ query
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def search_blas_threads() -> int:
    """BLAS threads of the search model: what the local runtime gives every model."""
    from tritonop.runtime.local import server_environment, triton_home

    value = server_environment(triton_home()).get("OMP_NUM_THREADS")
    return int(value) if value else (os.cpu_count() or 1)


def run(ctx: Context) -> dict[str, Any]:
    model_dir, _ = ctx.dirs()
    model = ModelManifest.read(model_dir)
    if model.dimension != DIMENSION:
        raise RuntimeError(f"S3 is defined for {DIMENSION} dimensions, the model has "
                           f"{model.dimension}")
    sizes = {label(count): _one_size(ctx, count, model, model_dir)
             for count in ctx.sizes.s3_vectors}
    targets = [at_most(f"S3.ratio.{name}", f"search p50 / numpy scan p50, {name} vectors",
                       size["p50_ratio"], RATIO_TARGET, "x") for name, size in sizes.items()]
    return {"dimension": DIMENSION, "num_results": NUM_RESULTS, "protocol": "grpc-infer",
            "blas_threads": search_blas_threads(), "cpu_count": os.cpu_count(),
            "sizes": sizes, "targets": targets}


def _one_size(ctx: Context, count: int, model: ModelManifest, model_dir: Path
              ) -> dict[str, Any]:
    name = f"vec{label(count)}"
    root = ctx.scratch(f"s3/{name}")
    started = time.monotonic()
    matrix = unit_vectors(count, SEED + count)
    corpus = f"random-unit-vectors-seed-{SEED + count}"
    manifest = IndexManifest(
        model_source=model.source, model_fingerprint=model.fingerprint, pooling=model.pooling,
        max_sequence_length=model.max_sequence_length, dimension=DIMENSION, count=count,
        corpus_sha256=corpus)
    # The version folder the renderer points the search model at, found the way prepare
    # finds it, and marked complete for the fingerprint rendered into the model's config.
    resource = ctx.resource({"metadata": {"name": name}})
    artifacts = str(root / "artifacts")
    model_link, index_dir = (Path(d) for d in artifact_dirs(resource, artifacts))
    write_index(index_dir, matrix, [f"v{i}" for i in range(count)], manifest)
    if not model_link.exists():
        model_link.symlink_to(model_dir.resolve(), target_is_directory=True)
    VersionManifest(resource_fingerprint(resource), fingerprint_inputs(resource),
                    corpus).write(Path(version_dir(resource, artifacts)))
    files = {path: content
             for path, content in render_repository([resource], artifacts).items()
             if path.startswith(f"{name}_search/")}
    write_repository(files, root / "repository")
    log.info("S3 %s: index written in %.1f s", name, time.monotonic() - started)
    queries = unit_vectors(ctx.sizes.s3_queries(count), SEED)
    try:
        with servers.triton_repository(root / "repository", root / "work") as server:
            stubs = servers.stub_processes(server, f"{name}_search")
            rss = sum(p.memory_info().rss for p in stubs)
            result = _measure(server.grpc_url, f"{name}_search", matrix, queries)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    matrix_mb = matrix.nbytes / 2**20
    result.update({
        "vectors": count, "queries": len(queries),
        "memory_mb": {"matrix": round(matrix_mb, 1), "search_model_rss": round(rss / 2**20, 1),
                      "search_model_rss_over_matrix": round(rss / 2**20 - matrix_mb, 1),
                      "numpy_scan": round(matrix_mb, 1)},
    })
    log.info("S3 %s: triton p50 %.2f ms, numpy p50 %.2f ms, ratio %.2f, rss %.0f MB", name,
             result["triton_ms"]["p50"], result["numpy_ms"]["p50"], result["p50_ratio"],
             rss / 2**20)
    return result


def _measure(url: str, model: str, matrix: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    from threadpoolctl import threadpool_limits

    client = grpcclient.InferenceServerClient(url)

    def search(query: np.ndarray) -> np.ndarray:
        embedding = grpcclient.InferInput("embedding", [1, DIMENSION], "FP32")
        embedding.set_data_from_numpy(query[None, :])
        k = grpcclient.InferInput("num_results", [1, 1], "INT32")
        k.set_data_from_numpy(np.array([[NUM_RESULTS]], dtype=np.int32))
        return client.infer(model, [embedding, k]).as_numpy("ids")[0]

    triton_s, numpy_s, all_cores_s, agree = [], [], [], 0
    with threadpool_limits(limits=search_blas_threads(), user_api="blas"):
        for query in queries[:5]:
            search(query)
            numpy_scan(matrix, query, NUM_RESULTS)
        for query in queries:
            t = time.perf_counter()
            ids = search(query)
            triton_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            expected = numpy_scan(matrix, query, NUM_RESULTS)
            numpy_s.append(time.perf_counter() - t)
            agree += int(np.array_equal(ids, expected))
    client.close()
    with threadpool_limits(limits=os.cpu_count(), user_api="blas"):
        for query in queries:
            t = time.perf_counter()
            numpy_scan(matrix, query, NUM_RESULTS)
            all_cores_s.append(time.perf_counter() - t)
    ours, scan = percentiles(triton_s), percentiles(numpy_s)
    assert ours is not None and scan is not None
    return {"triton_ms": ours, "numpy_ms": scan, "numpy_all_cores_ms": percentiles(all_cores_s),
            "p50_ratio": round(ours["p50"] / scan["p50"], 3),
            "mean_ratio": round(ours["mean"] / scan["mean"], 3),
            "same_ids": round(agree / len(queries), 4)}
