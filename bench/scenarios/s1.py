"""S1: single-query latency of one client over 1000 real queries, three protocols."""

from __future__ import annotations

import asyncio
from typing import Any

from bench import servers
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import (
    Client,
    GenerateClient,
    GrpcInferClient,
    HttpInferClient,
    Run,
    closed_loop,
)
from bench.targets import at_most

# The Candle service this project replaces reported a 100 ms average per query. It is
# a constant from its documentation, not measured here: it cannot run on this machine.
CANDLE_MEAN_MS = 100.0
P50_TARGET_MS = 10.0
ROUND = 100  # queries per protocol before moving to the next, so drift hits all alike


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.prepared_resource()
    texts = ctx.queries()[: ctx.sizes.s1_queries]
    with servers.triton([resource], ctx.artifacts_root, ctx.scratch("s1")) as server:
        runs = asyncio.run(_measure(server.http_url, server.grpc_url, resource.name, texts,
                                    ctx.sizes.s1_warmup))
        stages = servers.model_stats(server)
        version = servers.triton_version(server)
    protocols = {name: run.summary() for name, run in runs.items()}
    targets = []
    for name, summary in protocols.items():
        latency = summary["latency_ms"] or {}
        summary["vs_candle_mean"] = (round(CANDLE_MEAN_MS / latency["mean"], 2)
                                     if latency else None)
        targets.append(at_most(f"S1.p50.{name}", f"p50 latency, {name}", latency.get("p50"),
                               P50_TARGET_MS, "ms"))
        log.info("S1 %s: %s", name, latency)
    return {
        "queries": len(texts),
        "num_results": NUM_RESULTS,
        "baseline": {"name": "Candle service (reported average, a constant)",
                     "mean_ms": CANDLE_MEAN_MS},
        "protocols": protocols,
        "triton_version": version,
        "stages_ms": _stage_times(stages),
        "targets": targets,
    }


def _stage_times(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean milliseconds per request in each model, from Triton's own statistics."""
    return {name: {k: v for k, v in s.items() if k.endswith("_ms")} for name, s in stats.items()}


async def _measure(http_url: str, grpc_url: str, model: str, texts: list[str],
                   warmup: int) -> dict[str, Run]:
    clients: list[Client] = [
        GenerateClient(f"http://{http_url}/v2/models/{model}/generate", NUM_RESULTS),
        HttpInferClient(http_url, model, NUM_RESULTS),
        GrpcInferClient(grpc_url, model, NUM_RESULTS),
    ]
    runs = {client.name: Run() for client in clients}
    for client in clients:
        await client.__aenter__()
    try:
        for client in clients:
            await closed_loop(client, texts[-warmup:], 1, count=warmup)
        for start in range(0, len(texts), ROUND):
            chunk = texts[start : start + ROUND]
            for client in clients:
                part = await closed_loop(client, chunk, 1, count=len(chunk))
                whole = runs[client.name]
                offset = whole.window[1]
                whole.samples += [type(s)(s.start + offset, s.latency, s.status)
                                  for s in part.samples]
                whole.window = (0.0, offset + part.window[1])
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    return runs
