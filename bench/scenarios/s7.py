"""S7: S5's overload through the gateway: one admission bound in front of the pipeline.

The same three steps as S5 (unloaded p99, capacity, an open loop at 3x capacity), sent
as ``/v1/search`` to the gateway (its own process) in front of a Triton whose queues are
left at the example's (deep) bounds. The gateway admits ``S7_ADMISSION`` requests to the
model and refuses the rest at once with 429; a refusal is counted like S5's 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import servers
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import REJECTED, closed_loop, open_loop
from bench.scenarios.s5 import P99_FACTOR_TARGET, REJECT_MS_TARGET, overload_outcome
from bench.scenarios.s6 import GatewaySearchClient, gateway
from bench.targets import at_most

S7_ADMISSION = {"maxInFlight": 2, "maxWaiting": 2}
"""One request per encoder instance of the example in flight and as many waiting: under
overload an accepted request waits behind at most 3 others. With 4 and 4 (one full-size
run, load average 4.5-10.5) accepted p99 was 11.2x the unloaded p99; with 2 and 2 (load
average 3.4-6.4) 4.1x, at 132 against 144 q/s of capacity. The defaults (64 and 64 for the
example) are sized for throughput (S6) instead; ``spec.api`` picks the trade-off."""


class RefusalAsRejected(GatewaySearchClient):
    """The gateway's 429 is S5's 503: a quick refusal a client can retry elsewhere."""

    async def send(self, text: str) -> int:
        status = await super().send(text)
        return REJECTED if status == 429 else status


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.resource({"spec": {"api": dict(S7_ADMISSION)}})
    ctx.prepared_resource()
    texts = ctx.queries()
    with servers.triton([resource], ctx.artifacts_root, ctx.scratch("s7")) as server, \
            gateway(resource, server, ctx.scratch("s7")) as process:
        phases = asyncio.run(_measure(f"{process.url}/v1/search", resource.name, texts, ctx))
    accepted, rejected, lost, factor, reject_p99 = overload_outcome(phases)
    log.info("S7: capacity %.1f q/s, %d accepted, %d refused, %d lost, p99 factor %s",
             phases["capacity"]["throughput_qps"], accepted, rejected, lost, factor)
    targets = [
        at_most("S7.reject_p99", "429 answer time through the gateway, p99",
                reject_p99, REJECT_MS_TARGET, "ms"),
        at_most("S7.accepted_p99", "accepted p99 / unloaded p99, through the gateway", factor,
                P99_FACTOR_TARGET, "x"),
        at_most("S7.lost", "accepted requests lost (not 200 with a full answer, not 429)",
                lost, 0, goal="0"),
    ]
    if not rejected:
        targets[0]["met"] = None
    return {
        "protocol": "gateway /v1/search (JSON over HTTP)",
        "admission": S7_ADMISSION,
        "overload_factor": ctx.sizes.s5_overload_factor,
        "phases": phases,
        "accepted": accepted, "rejected": rejected, "lost": lost,
        "accepted_p99_over_unloaded_p99": None if factor is None else round(factor, 3),
        "targets": targets,
    }


async def _measure(url: str, model: str, texts: list[str], ctx: Context
                   ) -> dict[str, dict[str, Any]]:
    sizes = ctx.sizes
    async with RefusalAsRejected(url, model, NUM_RESULTS) as client:
        await closed_loop(client, texts, 1, count=min(20, sizes.s5_unloaded))
        unloaded = await closed_loop(client, texts, 1, count=sizes.s5_unloaded)
        concurrency = min(sizes.s5_capacity_concurrency, sum(S7_ADMISSION.values()))
        capacity = await closed_loop(client, texts, concurrency,
                                     duration=sizes.s5_capacity_seconds, warmup=1.0,
                                     backoff=0.02)
        rate = max(1.0, capacity.summary()["throughput_qps"] * sizes.s5_overload_factor)
        overload = await open_loop(client, texts, rate, sizes.s5_overload_seconds)
    phases = {"unloaded": unloaded.summary(), "capacity": capacity.summary(),
              "overload": overload.summary()}
    phases["capacity"]["concurrency"] = concurrency
    phases["overload"]["target_rate_qps"] = round(rate, 2)
    return phases
