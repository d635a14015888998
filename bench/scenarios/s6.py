"""S6: the OpenAI-compatible gateway's overhead on search, against Triton direct, same run.

One tritonserver serves the example; the gateway (``tritonop gateway``, its own process,
as in a pod) stands in front of it. The same aiohttp client sends the same JSON queries
to Triton's ``/v2/models/<m>/generate`` and to the gateway's ``/v1/search`` (which adds
only ``model``), taking turns, so drift falls on both alike: first one query at a time
(p50), then a closed loop at each concurrency (peak throughput).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import servers
from bench.context import NUM_RESULTS, Context, log
from bench.loadgen import BAD_PAYLOAD, OK, GenerateClient, Run, closed_loop
from bench.scenarios.s2 import _append
from bench.targets import at_least, at_most
from tritonop.gateway.config import gateway_config
from tritonop.resources import Resource
from tritonop.runtime.local import TritonServer

P50_RATIO_TARGET = 1.2
THROUGHPUT_RATIO_TARGET = 0.9
ROUND = 50  # single queries per client before the other takes its turn


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
    levels = tuple(c for c in sizes.s2_concurrency if c >= 4) or sizes.s2_concurrency
    with servers.triton([resource], ctx.artifacts_root, ctx.scratch("s6")) as server, \
            gateway(resource, server, ctx.scratch("s6")) as process:
        base = process.url
        clients = {
            "triton": lambda: GenerateClient(
                f"http://{server.http_url}/v2/models/{resource.name}/generate", NUM_RESULTS,
                name="triton"),
            "gateway": lambda: GatewaySearchClient(f"{base}/v1/search", resource.name,
                                                   NUM_RESULTS),
        }
        single = asyncio.run(_single(clients, texts[: sizes.s1_queries], sizes.s1_warmup))
        series = asyncio.run(_series(clients, texts, levels, sizes.s2_seconds,
                                     sizes.s2_warmup, sizes.s2_rounds, process))
        metrics = _gateway_metrics(base)
    p50 = {name: (run["latency_ms"] or {}).get("p50") for name, run in single.items()}
    peak = {name: max(points[str(c)]["throughput_qps"] for c in levels)
            for name, points in series.items()}
    p50_ratio = p50["gateway"] / p50["triton"] if p50["triton"] and p50["gateway"] else None
    qps_ratio = peak["gateway"] / peak["triton"] if peak["triton"] else None
    log.info("S6 p50 %s ms, peak %s q/s: ratios %.3f, %.3f", p50, peak, p50_ratio or 0,
             qps_ratio or 0)
    return {
        "num_results": NUM_RESULTS,
        "client": "aiohttp, JSON over HTTP; Triton direct is /v2/models/<m>/generate",
        "single": single,
        "series": series,
        "peak_qps": peak,
        "gateway_metrics": metrics,
        "targets": [
            at_most("S6.p50_ratio", "gateway / Triton direct, single-query p50", p50_ratio,
                    P50_RATIO_TARGET, "x"),
            at_least("S6.throughput_ratio", "gateway / Triton direct, peak throughput",
                     qps_ratio, THROUGHPUT_RATIO_TARGET, "x"),
        ],
    }


async def _single(clients: dict[str, Any], texts: list[str], warmup: int) -> dict[str, Any]:
    """One query at a time, ``ROUND`` per client in turn, all queries through both."""
    runs = {name: Run() for name in clients}
    opened = {name: await make().__aenter__() for name, make in clients.items()}
    try:
        for client in opened.values():
            await closed_loop(client, texts[-warmup:], 1, count=warmup)
        for start in range(0, len(texts), ROUND):
            chunk = texts[start : start + ROUND]
            for name, client in opened.items():
                part = await closed_loop(client, chunk, 1, count=len(chunk))
                whole = runs[name]
                offset = whole.window[1]
                whole.samples += [type(s)(s.start + offset, s.latency, s.status)
                                  for s in part.samples]
                whole.window = (0.0, offset + part.window[1])
    finally:
        for client in opened.values():
            await client.__aexit__(None, None, None)
    return {name: run.summary() for name, run in runs.items()}


async def _series(clients: dict[str, Any], texts: list[str], levels: tuple[int, ...],
                  seconds: float, warmup: float, rounds: int,
                  process: GatewayProcess) -> dict[str, dict[str, Any]]:
    """Closed loops at each concurrency, the clients taking turns; the gateway's points also
    carry its CPU time per request (warm-up requests included in both counts)."""
    series: dict[str, dict[str, Any]] = {name: {} for name in clients}
    for concurrency in levels:
        merged = {name: Run() for name in clients}
        cpu, requests = 0.0, 0
        for _ in range(rounds):
            for name, make in clients.items():
                before = process.cpu_seconds()
                async with make() as client:
                    part = await closed_loop(client, texts, concurrency,
                                             duration=seconds / rounds, warmup=warmup)
                if name == "gateway":
                    cpu += process.cpu_seconds() - before
                    requests += len(part.samples)
                _append(merged[name], part)
        for name, whole in merged.items():
            series[name][str(concurrency)] = whole.summary()
            log.info("S6 %s c=%d: %.1f q/s", name, concurrency,
                     series[name][str(concurrency)]["throughput_qps"])
        if requests:
            series["gateway"][str(concurrency)]["gateway_cpu_ms_per_request"] = round(
                1000 * cpu / requests, 3)
    return series


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


