"""S2: throughput at concurrency 1, 4, 16, 64 against the classic service and the floor.

tritonop and the FastAPI baseline get the very same requests from the very same
client: JSON ``{"text": ..., "num_results": 10}`` over HTTP (Triton's ``generate``
endpoint, the baseline's ``/search``), in a closed loop. One server runs at a time:
tritonop's, each FastAPI, Infinity, in turn, each started, measured at every
concurrency and stopped, ``alternations`` times (``bench.alternation``); each figure is
the median alternation's, and each ratio the median of the alternations' with its spread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import baselines, servers
from bench.alternation import Measure, alternate, p, ratio
from bench.context import NUM_RESULTS, Context, log
from bench.floor import floor_throughput
from bench.loadgen import Client, EmbeddingClient, GenerateClient, closed_loop
from bench.targets import at_least, at_most, held
from tritonop.artifacts.sources import locate

VS_BASELINE_TARGET = 2.0
VS_FLOOR_TARGET = 0.7
TARGET_CONCURRENCY = 16
VS_INFINITY_TARGET = 1.5  # our embeddings' requests/s over Infinity's, at 16 clients
SEARCH_VS_INFINITY_TARGET = 1.0  # our whole search over Infinity's embeddings alone
EMBEDDING_DIM = 384
QPS = "throughput_qps"


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.prepared_resource()
    model_dir, index_dir = ctx.dirs()
    source_dir = locate(resource.spec.model.source, resource.base_dir)  # type: ignore[union-attr]
    texts = ctx.queries()
    sizes = ctx.sizes
    scratch = ctx.scratch("s2")
    batching: list[dict[str, Any]] = []
    infinity: dict[str, Any] = {}

    @contextmanager
    def tritonop() -> Iterator[dict[str, Callable[[], Client]]]:
        with servers.triton([resource], ctx.artifacts_root, scratch) as server:
            base = f"http://{server.http_url}/v2/models/{resource.name}"
            before = servers.model_stats(server)
            yield {"tritonop": search_client(f"{base}/generate", "tritonop"),
                   "tritonop-embeddings": _embedding_client(f"{base}_embedding/generate", None)}
            batching[:] = [servers.stats_delta(before, servers.model_stats(server))]

    def fastapi(workers: int) -> Callable[[], Any]:
        @contextmanager
        def side() -> Iterator[dict[str, Callable[[], Client]]]:
            with servers.fastapi_baseline(source_dir, index_dir, workers=workers,
                                          threads=ctx.baseline_threads,
                                          workdir=scratch) as url:
                yield {f"fastapi-{workers}w": search_client(url, f"fastapi-{workers}w")}
        return side

    @contextmanager
    def infinity_side() -> Iterator[dict[str, Callable[[], Client]]]:
        with baselines.infinity(source_dir, scratch) as info:
            infinity.update(info)  # start_seconds: the last start's
            yield {"infinity-embeddings": _embedding_client(str(info["url"]),
                                                            str(info["model"]))}

    sides: dict[str, Any] = {"tritonop": tritonop,
                             **{f"fastapi-{w}w": fastapi(w) for w in sizes.s2_workers}}
    unavailable: dict[str, str] = {}
    if ctx.baselines:
        sides["infinity"] = infinity_side
    else:
        unavailable["infinity"] = baselines.TURNED_OFF
    levels = [str(c) for c in sizes.s2_concurrency]
    series, quiet = alternate(
        sides, levels, sizes.alternations,
        closed_loops(texts, sizes.s2_seconds / sizes.alternations, sizes.s2_warmup),
        key=QPS, settle_s=sizes.settle_seconds, unavailable=unavailable)
    if "infinity" in unavailable:
        log.warning("S2: Infinity not measured: %s", unavailable["infinity"])
        infinity = {"error": unavailable["infinity"]}
    # The floor runs after the servers are gone, in this process, on the same queries.
    floors = [floor_throughput(model_dir, index_dir, texts, threads=threads,
                               min_seconds=sizes.s2_floor_seconds)
              for threads in sizes.s2_floor_threads]
    for floor in floors:
        log.info("S2 floor: %s", floor)
    floor_qps = max(f["throughput_qps"] for f in floors)
    comparisons = _comparisons(series, levels)
    return {
        "num_results": NUM_RESULTS,
        "client": "aiohttp, JSON over HTTP, closed loop",
        "baseline_threads_per_worker": ctx.baseline_threads,
        "series": series,
        "quiet": quiet,
        "comparisons": comparisons,
        "floor": {"runs": floors, "throughput_qps": floor_qps},
        "triton_batching": batching[0] if batching else {},
        "infinity": infinity,
        "targets": (_targets(series, comparisons, floor_qps, sizes.s2_concurrency, quiet)
                    + _infinity_targets(comparisons, sizes.s2_concurrency, quiet)),
    }


def closed_loops(texts: list[str], seconds: float, warmup: float) -> Measure:
    """A measure for :func:`bench.alternation.alternate`: each client maker a side
    yielded, in a closed loop of ``level`` clients, one after the other."""
    def measure(clients: dict[str, Callable[[], Client]], level: str) -> dict[str, Any]:
        async def one(make: Callable[[], Client]) -> dict[str, Any]:
            async with make() as client:
                found = await closed_loop(client, texts, int(level), duration=seconds,
                                          warmup=warmup)
            return found.summary()

        figures = {name: asyncio.run(one(make)) for name, make in clients.items()}
        for name, summary in figures.items():
            log.info("%s c=%s: %.1f q/s, p50 %s ms", name, level, summary[QPS],
                     (summary["latency_ms"] or {}).get("p50"))
        return figures

    return measure


def search_client(url: str, name: str) -> Callable[[], Client]:
    return lambda: GenerateClient(url, NUM_RESULTS, name=name)


def _embedding_client(url: str, model: str | None) -> Callable[[], Client]:
    return lambda: EmbeddingClient(url, EMBEDDING_DIM, model=model)


def _comparisons(series: dict[str, dict[str, Any]], levels: list[str]) -> list[dict[str, Any]]:
    """Per level, each ratio the page shows: its median over the alternations, its spread."""
    pairs = [("tritonop-embeddings", "infinity-embeddings", "requests/s", _qps),
             ("tritonop-embeddings", "infinity-embeddings", "p99", p("p99")),
             ("tritonop", "infinity-embeddings", "requests/s", _qps),
             *(("tritonop", name, "requests/s", _qps) for name in series
               if name.startswith("fastapi"))]
    found = []
    for ours, theirs, what, value in pairs:
        for level in levels:
            spread = ratio(series, ours, theirs, level, value)
            if spread:
                found.append({"ours": ours, "theirs": theirs, "what": what, "level": level,
                              **spread})
    return found


def _qps(figures: dict[str, Any]) -> float:
    return float(figures[QPS])


def _find(comparisons: list[dict[str, Any]], ours: str, theirs: str, what: str,
          level: str) -> dict[str, Any] | None:
    return next((c for c in comparisons if (c["ours"], c["theirs"], c["what"], c["level"])
                 == (ours, theirs, what, level)), None)


def _infinity_targets(comparisons: list[dict[str, Any]], levels: tuple[int, ...],
                      quiet: dict[str, Any]) -> list[dict[str, Any]]:
    """Ours against Infinity at 16 clients; not measured (None) when Infinity was not."""
    at = str(TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels))
    theirs = "infinity-embeddings"
    return [
        held(at_least, f"S2.vs_infinity.c{at}",
             f"tritonop embeddings / Infinity embeddings, requests/s at {at} clients",
             _find(comparisons, "tritonop-embeddings", theirs, "requests/s", at),
             VS_INFINITY_TARGET, quiet),
        held(at_most, f"S2.p99_vs_infinity.c{at}",
             f"tritonop embeddings p99 / Infinity's p99 at {at} clients",
             _find(comparisons, "tritonop-embeddings", theirs, "p99", at), 1.0, quiet),
        held(at_least, f"S2.search_vs_infinity.c{at}",
             f"tritonop search / Infinity embeddings alone, requests/s at {at} clients",
             _find(comparisons, "tritonop", theirs, "requests/s", at),
             SEARCH_VS_INFINITY_TARGET, quiet),
    ]


def _targets(series: dict[str, dict[str, Any]], comparisons: list[dict[str, Any]],
             floor_qps: float, levels: tuple[int, ...],
             quiet: dict[str, Any]) -> list[dict[str, Any]]:
    ours = series["tritonop"]
    fastapi = {name: s for name, s in series.items() if name.startswith("fastapi")}
    at = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels)
    targets = []
    best_name = max(fastapi, key=lambda n: fastapi[n][str(at)][QPS])
    targets.append(held(
        at_least, f"S2.vs_fastapi.c{at}",
        f"tritonop / best FastAPI ({best_name}) at concurrency {at}",
        _find(comparisons, "tritonop", best_name, "requests/s", str(at)),
        VS_BASELINE_TARGET, quiet))
    peak = max(ours[str(c)][QPS] for c in levels)
    targets.append(at_least(
        "S2.vs_floor", "tritonop peak throughput / in-process floor", _ratio(peak, floor_qps),
        VS_FLOOR_TARGET, goal=f">= {VS_FLOOR_TARGET:g} ({VS_FLOOR_TARGET:.0%} of the floor)"))
    return targets


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None
