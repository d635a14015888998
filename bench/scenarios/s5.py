"""S5: overload at 3x measured capacity against a bounded queue, over gRPC.

Measured on gRPC ``ModelInfer`` (HTTP ``/infer`` behaves alike): Triton 2.51's
``/generate`` endpoint answers a full queue with HTTP 400 "Exceeds maximum queue
size" instead of 503, so a client of ``generate`` cannot tell overload from a bad
request.

Steps, all on one server whose stages have the queue bounds of ``Context.s5_queues``:
1. unloaded: one client, one query at a time: the p99 that loaded latency is held to;
2. capacity: completed queries/s of a closed loop whose concurrency fits the smallest
   queue bound (at most ``s5_capacity_concurrency``), so that no request is refused:
   the load the bounded server sustains without shedding (a refused client would
   wait 20 ms before its next request);
3. overload: an open loop offering ``s5_overload_factor`` x capacity; each request is
   followed to its end: 200 (checked to be a whole answer), 503, or lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import servers
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import OK, REJECTED, GrpcInferClient, closed_loop, open_loop
from bench.targets import at_most

REJECT_MS_TARGET = 50.0
P99_FACTOR_TARGET = 5.0


def run(ctx: Context) -> dict[str, Any]:
    queues = ctx.s5_queues
    resource = ctx.resource({"spec": {"stages": {
        stage: {"maxQueueSize": size} for stage, size in queues.items()}}})
    ctx.prepared_resource()
    texts = ctx.queries()
    with servers.triton([resource], ctx.artifacts_root, ctx.scratch("s5")) as server:
        snapshots: list[dict[str, Any]] = []
        phases = asyncio.run(_measure(server.grpc_url, resource.name, texts, ctx,
                                      servers.cpu_seconds(server),
                                      lambda: snapshots.append(servers.model_stats(server))))
        batching = servers.stats_delta(*snapshots)
    capacity, overload = phases["capacity"], phases["overload"]
    accepted, rejected, lost, factor, reject_p99 = overload_outcome(phases)
    log.info("S5: capacity %.1f q/s, offered %.1f q/s, %d accepted, %d rejected, %d lost",
             capacity["throughput_qps"], overload.get("offered_rate_qps", 0), accepted,
             rejected, lost)
    targets = [
        at_most("S5.reject_p99", "503 answer time, p99", reject_p99, REJECT_MS_TARGET,
                "ms"),
        at_most("S5.accepted_p99", "accepted p99 / unloaded p99", factor, P99_FACTOR_TARGET,
                "x"),
        at_most("S5.lost", "accepted requests lost (not 200 with a full answer, not 503)",
                lost, 0, goal="0"),
    ]
    if not rejected:
        targets[0]["met"] = None  # nothing was rejected: the queue bound was never reached
    return {
        "protocol": "grpc-infer",
        "max_queue_size": queues,
        "overload_factor": ctx.sizes.s5_overload_factor,
        "phases": phases,
        "accepted": accepted, "rejected": rejected, "lost": lost,
        "accepted_p99_over_unloaded_p99": None if factor is None else round(factor, 3),
        "overload_stages": batching,
        "targets": targets,
    }


def overload_outcome(phases: dict[str, dict[str, Any]]
                     ) -> tuple[int, int, int, float | None, float | None]:
    """What the overload phase did to requests, shared by S5 and S7 (S5 through the gateway).

    Returns:
        Accepted, rejected and lost requests (neither a full 200 nor a refusal), the
        accepted p99 over the unloaded p99 (None without both), and the refusals' p99.
    """
    unloaded, overload = phases["unloaded"], phases["overload"]
    statuses = overload["statuses"]
    accepted = statuses.get(str(OK), 0)
    rejected = statuses.get(str(REJECTED), 0)
    lost = overload["requests"] - accepted - rejected
    unloaded_p99 = (unloaded["latency_ms"] or {}).get("p99")
    loaded_p99 = (overload["latency_ms"] or {}).get("p99")
    factor = loaded_p99 / unloaded_p99 if loaded_p99 and unloaded_p99 else None
    return accepted, rejected, lost, factor, (overload["reject_latency_ms"] or {}).get("p99")


async def _measure(url: str, model: str, texts: list[str], ctx: Context, server_cpu: Any,
                   snapshot: Any) -> dict[str, dict[str, Any]]:
    sizes = ctx.sizes
    async with GrpcInferClient(url, model, NUM_RESULTS) as client:
        await closed_loop(client, texts, 1, count=min(20, sizes.s5_unloaded))
        unloaded = await closed_loop(client, texts, 1, count=sizes.s5_unloaded)
        concurrency = min(sizes.s5_capacity_concurrency, *ctx.s5_queues.values())
        capacity = await closed_loop(client, texts, concurrency,
                                     duration=sizes.s5_capacity_seconds, warmup=1.0,
                                     backoff=0.02)
        rate = max(1.0, capacity.summary()["throughput_qps"] * sizes.s5_overload_factor)
        snapshot()
        wall, ours, theirs = time.perf_counter(), servers.own_cpu_seconds(), server_cpu()
        overload = await open_loop(client, texts, rate, sizes.s5_overload_seconds)
        wall = time.perf_counter() - wall
        snapshot()
        cpu = {"load_generator": round((servers.own_cpu_seconds() - ours) / wall, 2),
               "triton": round((server_cpu() - theirs) / wall, 2)}
    phases = {"unloaded": unloaded.summary(), "capacity": capacity.summary(),
              "overload": overload.summary()}
    phases["capacity"]["concurrency"] = concurrency
    phases["overload"]["target_rate_qps"] = round(rate, 2)
    phases["overload"]["cpu_cores_used"] = cpu
    return phases

