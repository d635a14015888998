"""S6: the OpenAI-compatible gateway's overhead on search, against Triton direct, same run.

One tritonserver serves the example; the gateway (``tritonop gateway``, its own process,
as in a pod) stands in front of it. The same aiohttp client sends the same JSON queries
to Triton's ``/v2/models/<m>/generate`` and to the gateway's ``/v1/search`` (which adds
only ``model``): first one query at a time (p50), then a closed loop at each concurrency
(peak throughput). The gateway runs only while it is measured: Triton direct is measured
with it stopped, then the gateway is started, measured and stopped, ``alternations``
times (``bench.alternation``); each ratio is the median of the alternations' with its
spread.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import servers
from bench.alternation import Measure, alternate, p, ratio, spread
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import BAD_PAYLOAD, OK, Client, GenerateClient, closed_loop
from bench.targets import at_least, at_most, held
from tritonop.gateway.config import gateway_config
from tritonop.resources import Resource
from tritonop.runtime.local import TritonServer

P50_RATIO_TARGET = 1.2
THROUGHPUT_RATIO_TARGET = 0.9
SINGLE = "single"  # the level of one query at a time


class GatewaySearchClient(GenerateClient):
    """The seed's JSON plus ``model``, to the gateway's ``/v1/search``."""

    def __init__(self, url: str, model: str, num_results: int) -> None:
        super().__init__(url, num_results, name="gateway")
        self.model = model

    async def send(self, text: str) -> int:
        body = {"model": self.model, "text": text, "num_results": self.num_results}
        async with self._session.post(self.url, json=body) as response:
            if response.status != OK:
                await response.read()
                return response.status
            answer = await response.json(content_type=None)
        return OK if len(answer.get("data", ())) == self.num_results else BAD_PAYLOAD


@dataclass(frozen=True)
class GatewayProcess:
    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far (from /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def gateway(resource: Resource, server: TritonServer, workdir: Path,
            timeout: float = 60.0) -> Iterator[GatewayProcess]:
    """``tritonop gateway`` in its own process, yielded once Triton is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gateway.json"
    config.write_text(gateway_config([resource]).to_json())
    port = servers.free_port()
    log_path = workdir / "gateway.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tritonop.cli", "gateway", "--config", str(config),
             "--triton", server.grpc_url, "--triton-http", server.http_url,
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health/ready", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway was not ready in {timeout:.0f} s") from None
                time.sleep(0.2)
        yield GatewayProcess(url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.prepared_resource()
    texts = ctx.queries()
    sizes = ctx.sizes
    levels = [str(c) for c in sizes.s2_concurrency if c >= 4] or [
        str(c) for c in sizes.s2_concurrency]
    statuses: dict[str, float] = {}
    with servers.triton([resource], ctx.artifacts_root, ctx.scratch("s6")) as server:
        direct = f"http://{server.http_url}/v2/models/{resource.name}/generate"

        @contextmanager
        def through_gateway() -> Iterator[tuple[str, Callable[[], Client], GatewayProcess]]:
            with gateway(resource, server, ctx.scratch("s6")) as process:
                yield ("gateway", lambda: GatewaySearchClient(
                    f"{process.url}/v1/search", resource.name, NUM_RESULTS), process)
                counts = _gateway_metrics(process.url)["requests_by_status"]
                for status, count in counts.items():
                    statuses[status] = statuses.get(status, 0.0) + count

        sides = {"triton": lambda: nullcontext(("triton", lambda: GenerateClient(
                     direct, NUM_RESULTS, name="triton"), None)),
                 "gateway": through_gateway}
        series, quiet = alternate(sides, [SINGLE, *levels], sizes.alternations,
                                  _measure(texts, sizes.s1_queries, sizes.s1_warmup,
                                           sizes.s2_seconds / sizes.alternations,
                                           sizes.s2_warmup),
                                  key="throughput_qps", settle_s=sizes.settle_seconds)
    single = {name: points.pop(SINGLE) for name, points in series.items()}
    peak = {name: max(points[c]["throughput_qps"] for c in levels)
            for name, points in series.items()}
    p50 = ratio({n: {SINGLE: s} for n, s in single.items()}, "gateway", "triton", SINGLE,
                p("p50"))
    qps = spread(*(_peaks(series[name], levels) for name in ("gateway", "triton")))
    log.info("S6 p50 ratio %s, peak throughput ratio %s; %s", p50, qps, quiet)
    return {
        "num_results": NUM_RESULTS,
        "client": "aiohttp, JSON over HTTP; Triton direct is /v2/models/<m>/generate",
        "single": single,
        "series": series,
        "peak_qps": peak,
        "quiet": quiet,
        "comparisons": [{"ours": "gateway", "theirs": "triton", "what": what, "level": level,
                         **found} for what, level, found in
                        (("p50", "1 (one at a time)", p50), ("peak requests/s", "peak", qps))
                        if found],
        "gateway_metrics": {"requests_by_status": statuses},
        "targets": [
            held(at_most, "S6.p50_ratio", "gateway / Triton direct, single-query p50", p50,
                 P50_RATIO_TARGET, quiet),
            held(at_least, "S6.throughput_ratio", "gateway / Triton direct, peak throughput",
                 qps, THROUGHPUT_RATIO_TARGET, quiet),
        ],
    }


def _peaks(points: dict[str, Any], levels: list[str]) -> list[float]:
    """Each alternation's peak throughput over the levels."""
    turns = len(points[levels[0]]["alternations"])
    return [max(points[c]["alternations"][k]["throughput_qps"] for c in levels)
            for k in range(turns)]


def _measure(texts: list[str], queries: int, warmup: int, seconds: float,
             loop_warmup: float) -> Measure:
    """One side's figures at a level: one query at a time over ``queries`` texts (after
    ``warmup``), or a closed loop; through the gateway, also its CPU time per request
    (warm-up requests included in both counts)."""
    def measure(target: tuple[str, Callable[[], Client], GatewayProcess | None],
                level: str) -> dict[str, Any]:
        name, make, process = target

        async def one() -> dict[str, Any]:
            async with make() as client:
                if level == SINGLE:
                    await closed_loop(client, texts[-warmup:], 1, count=warmup)
                    return (await closed_loop(client, texts[:queries], 1,
                                              count=queries)).summary()
                before = process.cpu_seconds() if process else 0.0
                found = await closed_loop(client, texts, int(level), duration=seconds,
                                          warmup=loop_warmup)
            summary = found.summary()
            if process and found.samples:
                summary["gateway_cpu_ms_per_request"] = round(
                    1000 * (process.cpu_seconds() - before) / len(found.samples), 3)
            return summary

        summary = asyncio.run(one())
        log.info("S6 %s %s: %.1f q/s, p50 %s ms", name, level, summary["throughput_qps"],
                 (summary["latency_ms"] or {}).get("p50"))
        return {name: summary}

    return measure


def _gateway_metrics(base: str) -> dict[str, float]:
    """The gateway's own count of answers by status: every query should be a 200."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tritonop_gateway_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            status = labels.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0.0) + float(value)
    return {"requests_by_status": counts}


