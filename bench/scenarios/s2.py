"""S2: throughput at concurrency 1, 4, 16, 64 against the classic service and the floor.

tritonop and the FastAPI baseline get the very same requests from the very same
client: JSON ``{"text": ..., "num_results": 10}`` over HTTP (Triton's ``generate``
endpoint, the baseline's ``/search``), in a closed loop. All servers run at once,
idle while another is measured, and the measurements take turns concurrency by
concurrency and in several short rounds, so machine drift falls on all of them alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from bench import baselines, servers
from bench.context import NUM_RESULTS, Context, log
from bench.floor import floor_throughput
from bench.loadgen import Client, EmbeddingClient, GenerateClient, Run, closed_loop
from bench.targets import at_least, at_most
from tritonop.artifacts.sources import locate

VS_BASELINE_TARGET = 2.0
VS_FLOOR_TARGET = 0.7
TARGET_CONCURRENCY = 16
VS_INFINITY_TARGET = 1.5  # our embeddings' requests/s over Infinity's, at 16 clients
SEARCH_VS_INFINITY_TARGET = 1.0  # our whole search over Infinity's embeddings alone
EMBEDDING_DIM = 384


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.prepared_resource()
    model_dir, index_dir = ctx.dirs()
    source_dir = locate(resource.spec.model.source, resource.base_dir)  # type: ignore[union-attr]
    texts = ctx.queries()
    sizes = ctx.sizes
    with ExitStack() as stack:
        server = stack.enter_context(
            servers.triton([resource], ctx.artifacts_root, ctx.scratch("s2")))
        base = f"http://{server.http_url}/v2/models/{resource.name}"
        urls: dict[str, str | Callable[[], Client]] = {"tritonop": f"{base}/generate"}
        for workers in sizes.s2_workers:
            urls[f"fastapi-{workers}w"] = stack.enter_context(servers.fastapi_baseline(
                source_dir, index_dir, workers=workers, threads=ctx.baseline_threads,
                workdir=ctx.scratch("s2")))
        urls["tritonop-embeddings"] = _embedding_client(f"{base}_embedding/generate", None)
        infinity: dict[str, Any]
        try:
            if not ctx.baselines:
                raise baselines.BaselineUnavailable(baselines.TURNED_OFF)
            infinity = stack.enter_context(baselines.infinity(source_dir, ctx.scratch("s2")))
            urls["infinity-embeddings"] = _embedding_client(str(infinity["url"]),
                                                            str(infinity["model"]))
        except baselines.BaselineUnavailable as err:
            log.warning("S2: Infinity not measured: %s", err)
            infinity = {"error": str(err)}
        before = servers.model_stats(server)
        series = asyncio.run(measure_series(urls, texts, sizes.s2_concurrency, sizes.s2_seconds,
                                      sizes.s2_warmup, sizes.s2_rounds))
        batching = servers.stats_delta(before, servers.model_stats(server))
    # The floor runs after the servers are gone, in this process, on the same queries.
    floors = [floor_throughput(model_dir, index_dir, texts, threads=threads,
                               min_seconds=sizes.s2_floor_seconds)
              for threads in sizes.s2_floor_threads]
    for floor in floors:
        log.info("S2 floor: %s", floor)
    floor_qps = max(f["throughput_qps"] for f in floors)
    return {
        "num_results": NUM_RESULTS,
        "client": "aiohttp, JSON over HTTP, closed loop",
        "baseline_threads_per_worker": ctx.baseline_threads,
        "series": series,
        "floor": {"runs": floors, "throughput_qps": floor_qps},
        "triton_batching": batching,
        "infinity": infinity,
        "targets": (_targets(series, floor_qps, sizes.s2_concurrency)
                    + _infinity_targets(series, sizes.s2_concurrency)),
    }


def _embedding_client(url: str, model: str | None) -> Callable[[], Client]:
    return lambda: EmbeddingClient(url, EMBEDDING_DIM, model=model)


def _infinity_targets(series: dict[str, dict[str, Any]],
                      levels: tuple[int, ...]) -> list[dict[str, Any]]:
    """Ours against Infinity at 16 clients; not measured (None) when Infinity was not."""
    at = str(TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels))
    theirs = series.get("infinity-embeddings", {}).get(at)
    embed, search = series["tritonop-embeddings"][at], series["tritonop"][at]
    their_qps = theirs["throughput_qps"] if theirs else 0.0
    their_p99 = ((theirs or {}).get("latency_ms") or {}).get("p99")
    our_p99 = (embed.get("latency_ms") or {}).get("p99")
    return [
        at_least(f"S2.vs_infinity.c{at}",
                 f"tritonop embeddings / Infinity embeddings, requests/s at {at} clients",
                 _ratio(embed["throughput_qps"], their_qps), VS_INFINITY_TARGET, "x"),
        at_most(f"S2.p99_vs_infinity.c{at}",
                f"tritonop embeddings p99 / Infinity's p99 at {at} clients",
                _ratio(our_p99, their_p99) if our_p99 and their_p99 else None, 1.0, "x"),
        at_least(f"S2.search_vs_infinity.c{at}",
                 f"tritonop search / Infinity embeddings alone, requests/s at {at} clients",
                 _ratio(search["throughput_qps"], their_qps), SEARCH_VS_INFINITY_TARGET, "x"),
    ]


def _targets(series: dict[str, dict[str, Any]], floor_qps: float,
             levels: tuple[int, ...]) -> list[dict[str, Any]]:
    ours = series["tritonop"]
    fastapi = {name: s for name, s in series.items() if name.startswith("fastapi")}
    at = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels)
    targets = []
    best_name = max(fastapi, key=lambda n: fastapi[n][str(at)]["throughput_qps"])
    ratio = _ratio(ours[str(at)]["throughput_qps"], fastapi[best_name][str(at)]
                   ["throughput_qps"])
    targets.append(at_least(
        f"S2.vs_fastapi.c{at}", f"tritonop / best FastAPI ({best_name}) at concurrency {at}",
        ratio, VS_BASELINE_TARGET, "x"))
    peak = max(ours[str(c)]["throughput_qps"] for c in levels)
    targets.append(at_least(
        "S2.vs_floor", "tritonop peak throughput / in-process floor", _ratio(peak, floor_qps),
        VS_FLOOR_TARGET, goal=f">= {VS_FLOOR_TARGET:g} ({VS_FLOOR_TARGET:.0%} of the floor)"))
    return targets


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


async def measure_series(urls: dict[str, str | Callable[[], Client]], texts: list[str],
                         levels: tuple[int, ...], seconds: float, warmup: float,
                         rounds: int) -> dict[str, dict[str, Any]]:
    """Each server, each concurrency: ``rounds`` turns of ``seconds / rounds``, merged.

    A value of ``urls`` is a search URL (JSON ``generate``) or a function making a client.
    """
    series: dict[str, dict[str, Any]] = {name: {} for name in urls}
    for concurrency in levels:
        merged = {name: Run() for name in urls}
        for _ in range(rounds):
            for name, url in urls.items():
                maker = url if callable(url) else None
                async with (maker() if maker else
                            GenerateClient(str(url), NUM_RESULTS, name=name)) as client:
                    part = await closed_loop(client, texts, concurrency,
                                             duration=seconds / rounds, warmup=warmup)
                _append(merged[name], part)
        for name, run in merged.items():
            summary = run.summary()
            series[name][str(concurrency)] = summary
            log.info("S2 %s c=%d: %.1f q/s, p50 %s ms", name, concurrency,
                     summary["throughput_qps"], (summary["latency_ms"] or {}).get("p50"))
    return series


def _append(whole: Run, part: Run) -> None:
    """Lay ``part``'s measured window after ``whole``'s, dropping its warm-up."""
    offset = whole.window[1] - part.window[0]
    whole.samples += [type(s)(s.start + offset, s.latency, s.status)
                      for s in part.in_window()]
    whole.window = (0.0, whole.window[1] + part.window[1] - part.window[0])
