"""S4: LLM streaming: tokens/s, time to first token and inter-token latency at 1-16 streams.

The LLMService of ``Context.llm_example`` (``examples/chat.yaml``: SmolLM2-135M-Instruct)
on a local Triton, driven over HTTP ``generate_stream`` (server-sent events) by closed
loops of 1, 4, 8 and 16 streams: each stream sends its next request as soon as the last
one ended. Every request is one of the same corpus prompts ("Describe: <text>"), with a
fixed ``max_tokens``, temperature 0.7 and its own seed, and no stop strings; the other
sampling parameters are the service's defaults (top-p). The same streams run greedy
(temperature 0) at ``s4_greedy_concurrency``: what agents, evaluations and structured
output use, and where a sampler's cost no longer hides the decode step's.

Per level, after a warm-up, a window of ``s4_seconds`` is measured: tokens that reached
the client in it (aggregate tokens/s), first tokens that arrived in it (time to first
token, from sending the request; a request waiting for a free slot waits here), gaps
between a stream's events that ended in it (inter-token latency), and from the server's
own counters, generated tokens per engine step (the batching factor: how many sequences
one forward pass served). Streams still open when the window closes are cut; the server
cancels them, and the next level starts once the engine is idle.

The baseline, in the same run: ``model.generate`` on the same model, one request after
the other, with the same prompts, ``max_tokens``, sampling parameters and seeds, the chat
template applied, the same torch thread count and environment as the server's model
process (``bench.llm_baseline``, a child process; half of its requests before the server
starts, half after it stopped, so that drift shows and the two never compete).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import baselines, servers
from bench.alternation import alternate, p, ratio
from bench.context import Context, log
from bench.loadgen import (
    OK,
    ChatStreamClient,
    GenerateStreamClient,
    Stream,
    StreamRun,
    percentiles,
    stream_closed_loop,
)
from bench.queries import PROMPT_TEMPLATE
from bench.targets import at_least, at_most, held
from tritonop.artifacts.llm import llm_model_dir, locate_llm
from tritonop.artifacts.prepare import prepare
from tritonop.resources import Resource
from tritonop.runtime.local import server_environment, triton_home
from tritonop.runtime.metrics import model_metric
from tritonop.spec import LLMServiceSpec

TEMPERATURE = 0.7
SEED = 1000  # request i carries seed SEED + i
TARGET_LEVEL = 8
TARGET_RATIO = 4.0
IDLE_TIMEOUT_S = 120.0
VS_VLLM_TOKENS_TARGET = 1.0  # aggregate tokens/s at 8 streams over vLLM-CPU's
VS_VLLM_TTFT_TARGET = 1.5  # time to first token p50 at 8 streams, ours over vLLM-CPU's
GREEDY = "greedy-"  # the level names of greedy decoding: greedy-1, greedy-8, ...


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.llm_resource()
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec), f"{ctx.llm_example} is not an LLMService"
    started = time.monotonic()
    prepare([resource], ctx.artifacts_root, progress=False)
    log.info("S4: model ready in %.1f s", time.monotonic() - started)
    sizes = ctx.sizes
    prompts = ctx.prompts()
    threads = spec.engine.threads or os.cpu_count() or 1
    defaults = spec.generation.defaults

    def body(i: int) -> dict[str, Any]:
        return {"text_input": prompts[i % len(prompts)], "max_tokens": sizes.s4_max_tokens,
                "temperature": TEMPERATURE, "seed": SEED + i, "stream": True}

    def greedy_body(i: int) -> dict[str, Any]:
        return {**body(i), "temperature": 0.0}

    requests = [{**body(i), "top_p": defaults.top_p, "top_k": defaults.top_k}
                for i in range(sizes.s4_baseline_requests)]
    half = (len(requests) + 1) // 2
    baseline_runs = [_baseline(ctx, resource, threads, requests[:half], "before")]
    log.info("S4: sequential generate, first half: %.1f tok/s", _tokens_per_s(baseline_runs[0]))
    # One server at a time: ours, then vLLM-CPU, started, measured at every level and
    # stopped, ``alternations`` times (bench.alternation).
    vllm: dict[str, Any] = {}
    version: list[str] = []

    @contextmanager
    def ours() -> Iterator[tuple[str, Any]]:
        with servers.triton([resource], ctx.artifacts_root, ctx.scratch("s4")) as server:
            version[:] = [servers.triton_version(server)]
            url = f"http://{server.http_url}/v2/models/{resource.name}/generate_stream"
            asyncio.run(_warm_up(GenerateStreamClient(url), body, max(sizes.s4_concurrency)))
            yield ("tritonop", server)

    @contextmanager
    def theirs() -> Iterator[tuple[str, Any]]:
        model_dir = Path(llm_model_dir(resource, str(ctx.artifacts_root)))
        with baselines.vllm(model_dir, ctx.scratch("s4")) as info:
            vllm.update(info)
            asyncio.run(_warm_up(_vllm_client(ctx, info), body, max(sizes.s4_concurrency)))
            yield ("vllm", info)

    def measure(target: tuple[str, Any], level: str) -> dict[str, Any]:
        name, handle = target
        streams = int(level.removeprefix(GREEDY))
        make = greedy_body if level.startswith(GREEDY) else body
        if name == "tritonop":
            return {name: asyncio.run(_measure(handle, resource.name, make, ctx, streams))}
        return {name: asyncio.run(_measure_vllm(_vllm_client(ctx, handle), make, streams,
                                                ctx, str(handle["url"])))}

    unavailable: dict[str, str] = {}
    sides: dict[str, Any] = {"tritonop": ours}
    if ctx.baselines:
        sides["vllm"] = theirs
    else:
        unavailable["vllm"] = baselines.TURNED_OFF
    level_names = [str(c) for c in sizes.s4_concurrency] + [
        f"{GREEDY}{c}" for c in sizes.s4_greedy_concurrency]
    series, quiet = alternate(sides, level_names, sizes.alternations, measure,
                              key="tokens_per_s", settle_s=sizes.settle_seconds,
                              unavailable=unavailable)
    if "vllm" in unavailable:
        log.warning("S4: vLLM-CPU not measured: %s", unavailable["vllm"])
        vllm = {"error": unavailable["vllm"]}
    levels, greedy = _split(series["tritonop"])
    vllm_levels, vllm_greedy = _split(series.get("vllm", {}))
    if requests[half:]:
        baseline_runs.append(_baseline(ctx, resource, threads, requests[half:], "after"))
    baseline = _baseline_summary(baseline_runs)
    for level in levels.values():
        level["vs_generate"] = round(level["tokens_per_s"] / baseline["tokens_per_s"], 2)
    target_level = TARGET_LEVEL if str(TARGET_LEVEL) in levels else max(map(int, levels))
    vs_generate = levels[str(target_level)]["vs_generate"]
    comparisons = []
    for c, level in {**levels, **{GREEDY + c: v for c, v in greedy.items()}}.items():
        for what, key, value in (("tokens/s", "vs_vllm", _tokens_per_s_of),
                                 ("TTFT p50", "ttft_p50_vs_vllm", p("p50", "ttft_ms")),
                                 ("TTFT p99", "ttft_p99_vs_vllm", p("p99", "ttft_ms")),
                                 ("inter-token p99", "itl_p99_vs_vllm", p("p99", "itl_ms"))):
            found = ratio(series, "tritonop", "vllm", c, value)
            if found:
                level[key] = found["median"]
                comparisons.append({"ours": "tritonop", "theirs": "vllm", "what": what,
                                    "level": c, **found})
    log.info("S4: generate %.1f tok/s; %s", baseline["tokens_per_s"], ", ".join(
        f"c={c}: {v['tokens_per_s']:.1f} tok/s ({v['vs_generate']:.2f}x)"
        for c, v in levels.items()))
    return {
        "protocol": "http-generate-stream",
        "example": _relative(ctx.llm_example),
        "overrides": ctx.llm_overrides,
        "model_source": locate_llm(resource).name,
        "engine": json.loads(spec.engine.model_dump_json(by_alias=True)),
        "torch_threads": threads,
        "device": baseline["device"],
        "cuda_available": baseline["cuda_available"],
        "max_tokens": sizes.s4_max_tokens,
        "temperature": TEMPERATURE,
        "service_defaults": {"top_p": defaults.top_p, "top_k": defaults.top_k,
                             "repetition_penalty": defaults.repetition_penalty},
        "prompt_template": PROMPT_TEMPLATE,
        "prompts": len(prompts),
        "window_seconds": sizes.s4_seconds,
        "warmup_seconds": sizes.s4_warmup,
        "triton_version": version[0] if version else None,
        "quiet": quiet,
        "comparisons": comparisons,
        "baseline": baseline,
        "levels": levels,
        "greedy_levels": greedy,
        "vllm": {**vllm, "levels": vllm_levels, "greedy_levels": vllm_greedy},
        "target_ratio": TARGET_RATIO,
        "targets": [at_least(
            "S4.vs_generate",
            f"aggregate tokens/s at {target_level} streams / sequential generate",
            vs_generate, TARGET_RATIO, "x"),
            held(
            at_least, "S4.vs_vllm",
            f"aggregate tokens/s at {target_level} streams / vLLM-CPU's",
            _compared(comparisons, "tokens/s", str(target_level)), VS_VLLM_TOKENS_TARGET,
            quiet),
            held(
            at_most, "S4.ttft_vs_vllm",
            f"time to first token p50 at {target_level} streams / vLLM-CPU's",
            _compared(comparisons, "TTFT p50", str(target_level)), VS_VLLM_TTFT_TARGET,
            quiet),
            *_issue_targets(comparisons, quiet)],
    }


# Issue 23's goals against vLLM-CPU, each checked where its level was measured.
GREEDY_VS_VLLM_LEVELS = (1, 8, 16)
LOADED_LEVEL = 16


def _issue_targets(comparisons: list[dict[str, Any]], quiet: dict[str, Any]
                   ) -> list[dict[str, Any]]:
    found = []
    for c in GREEDY_VS_VLLM_LEVELS:
        if _compared(comparisons, "tokens/s", f"{GREEDY}{c}"):
            found.append(held(at_least, f"S4.greedy_vs_vllm_{c}",
                              f"greedy tokens/s at {c} stream(s) / vLLM-CPU's",
                              _compared(comparisons, "tokens/s", f"{GREEDY}{c}"), 1.0, quiet))
    for what, key in (("inter-token p99", "itl_p99"), ("TTFT p99", "ttft_p99")):
        compared = _compared(comparisons, what, str(LOADED_LEVEL))
        if compared:
            found.append(held(at_most, f"S4.{key}_vs_vllm_{LOADED_LEVEL}",
                              f"{what} at {LOADED_LEVEL} streams (top-p) / vLLM-CPU's",
                              compared, 1.0, quiet))
    if _compared(comparisons, "TTFT p50", "1"):
        found.append(held(at_most, "S4.ttft_vs_vllm_1", "time to first token p50 at 1 "
                          "stream (top-p) / vLLM-CPU's", _compared(comparisons, "TTFT p50", "1"),
                          1.0, quiet))
    return found


def _split(levels: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A series' levels as (top-p levels, greedy levels), each keyed by its stream count."""
    return ({c: v for c, v in levels.items() if not c.startswith(GREEDY)},
            {c.removeprefix(GREEDY): v for c, v in levels.items() if c.startswith(GREEDY)})


def _tokens_per_s_of(figures: dict[str, Any]) -> float:
    return float(figures["tokens_per_s"])


def _compared(comparisons: list[dict[str, Any]], what: str,
              level: str) -> dict[str, Any] | None:
    return next((c for c in comparisons if (c["what"], c["level"]) == (what, level)), None)


def _vllm_client(ctx: Context, info: dict[str, Any]) -> ChatStreamClient:
    """A client of vLLM-CPU's chat endpoint. Sampling parameters a body leaves out are our
    service's defaults; vLLM would use the model's generation_config.json instead, so they
    are sent explicitly."""
    defaults = ctx.llm_resource().spec.generation.defaults  # type: ignore[union-attr]
    return ChatStreamClient(str(info["url"]), str(info["model"]), {
        "top_p": defaults.top_p, "top_k": defaults.top_k or -1,
        "repetition_penalty": defaults.repetition_penalty})


async def _measure(server: Any, model: str, body: Any, ctx: Context,
                   concurrency: int) -> dict[str, Any]:
    """One level on ours; the next starts once the engine is idle."""
    sizes = ctx.sizes
    metrics_url = f"http://localhost:{server.ports.metrics}/metrics"
    server_cpu = servers.cpu_seconds(server)
    url = f"http://{server.http_url}/v2/models/{model}/generate_stream"
    async with GenerateStreamClient(url) as client:
        wall, ours, theirs = time.perf_counter(), servers.own_cpu_seconds(), server_cpu()
        run = await stream_closed_loop(client, body, concurrency,
                                       duration=sizes.s4_seconds / sizes.alternations,
                                       warmup=sizes.s4_warmup, metrics_url=metrics_url)
        wall = time.perf_counter() - wall
        cpu = {"load_generator": round((servers.own_cpu_seconds() - ours) / wall, 2),
               "triton": round((server_cpu() - theirs) / wall, 2)}
        await until_idle(client, metrics_url, model)
    level = {**_level_summary(run, model), "cpu_cores_used": cpu}
    log.info("S4 c=%d: %s", concurrency, {k: level[k] for k in (
        "tokens_per_s", "batching_factor", "ttft_ms", "itl_ms")})
    return level


async def _measure_vllm(client: ChatStreamClient, body: Any, concurrency: int, ctx: Context,
                        base_url: str) -> dict[str, Any]:
    """One level on vLLM-CPU, measured like ours (its own counters give the batching)."""
    sizes = ctx.sizes
    metrics_url = f"{base_url}/metrics"
    async with client:
        wall, ours = time.perf_counter(), servers.own_cpu_seconds()
        run = await stream_closed_loop(client, body, concurrency,
                                       duration=sizes.s4_seconds / sizes.alternations,
                                       warmup=sizes.s4_warmup, metrics_url=metrics_url)
        wall = time.perf_counter() - wall
        await vllm_until_idle(client, metrics_url)
    summary = {**run.summary(),
               "cpu_cores_used": {"load_generator": round(
                   (servers.own_cpu_seconds() - ours) / wall, 2)}}
    log.info("S4 vLLM c=%d: %s", concurrency, {k: summary[k] for k in (
        "tokens_per_s", "ttft_ms", "itl_ms")})
    return summary


async def vllm_until_idle(client: GenerateStreamClient, metrics_url: str) -> None:
    """Until vLLM runs and queues no request: the streams cut at a level's end are gone."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        page = await client.get_text(metrics_url)
        if _vllm_metric(page, "vllm:num_requests_running") == 0 \
                and _vllm_metric(page, "vllm:num_requests_waiting") == 0:
            return
        await asyncio.sleep(0.2)


def _vllm_metric(page: str, name: str) -> float:
    """The sum of a Prometheus gauge over its label sets (0 when absent)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.M)
    return sum(float(value) for value in pattern.findall(page))


async def _warm_up(client: GenerateStreamClient, body: Any, count: int) -> None:
    """Short requests, all at once, so that the cache is allocated (not measured)."""
    records = [Stream(0.0) for _ in range(count)]
    t0 = time.perf_counter()
    async with client:
        await asyncio.gather(*(client.stream({**body(i), "max_tokens": 4}, record, t0)
                               for i, record in enumerate(records)))
    statuses = {record.status for record in records}
    if statuses != {OK}:
        raise RuntimeError(f"the LLM answered warm-up requests with {statuses}")


def _level_summary(run: StreamRun, model: str) -> dict[str, Any]:
    summary = run.summary()
    before, after = (_counters(page, model) for page in run.scrapes)
    steps = after["steps"] - before["steps"]
    tokens = after["tokens"] - before["tokens"]
    summary.update({
        "engine_steps": int(steps),
        "engine_tokens": int(tokens),
        "server_tokens_per_s": round(tokens / summary["seconds"], 2),
        "batching_factor": round(tokens / steps, 2) if steps else None,
    })
    return summary


def _counters(page: str, model: str) -> dict[str, float]:
    return {"steps": model_metric(page, "tritonop_llm_steps_total", model),
            "tokens": model_metric(page, "tritonop_llm_generated_tokens_total", model)}


async def until_idle(client: GenerateStreamClient, metrics_url: str, model: str) -> None:
    """Until no sequence runs or waits: the streams cut at the end of a level are gone."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        page = await client.get_text(metrics_url)
        if (model_metric(page, "tritonop_llm_running_sequences", model) == 0
                and model_metric(page, "tritonop_llm_waiting_requests", model) == 0):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the LLM was still busy {IDLE_TIMEOUT_S:.0f} s after its clients left")


def _baseline(ctx: Context, resource: Resource, threads: int, requests: list[dict[str, Any]],
              when: str) -> dict[str, Any]:
    """Sequential ``model.generate`` in a child process with the model process's settings."""
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    scratch = ctx.scratch("s4")
    request_file = scratch / f"baseline-{when}.json"
    out = scratch / f"baseline-{when}-figures.json"
    request_file.write_text(json.dumps(requests))
    model_dir = Path(llm_model_dir(resource, str(ctx.artifacts_root)))
    command = [sys.executable, "-m", "bench.llm_baseline", "--model-dir", str(model_dir),
               "--threads", str(threads), "--requests", str(request_file), "--out", str(out),
               "--device", spec.model.device, "--dtype", spec.model.dtype]
    if not spec.generation.chat_template:
        command.append("--no-chat-template")
    env = server_environment(triton_home())
    env["PYTHONPATH"] = os.pathsep.join([str(servers.ROOT), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    done = subprocess.run(command, cwd=servers.ROOT, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.llm_baseline failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["when"] = when
    figures["process_seconds"] = round(time.monotonic() - started, 1)
    return figures


def _baseline_summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for part in parts for r in part["runs"]]
    tokens = sum(r["completion_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        "name": "sequential model.generate",
        "requests": len(runs),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "parts": {part["when"]: _tokens_per_s(part) for part in parts},
        "ttft_ms": percentiles([r["ttft_s"] for r in runs if r["ttft_s"] is not None]),
        "itl_ms": percentiles([gap for r in runs for gap in r["itl_s"]]),
        "completion_tokens_mean": round(tokens / max(len(runs), 1), 1),
        "threads": parts[0]["threads"],
        "device": parts[0]["device"],
        "cuda_available": parts[0]["cuda_available"],
        "omp_wait_policy": parts[0]["omp_wait_policy"],
        "dtype": parts[0].get("dtype"),
        "packed_layers": parts[0].get("packed_layers"),
    }


def _tokens_per_s(part: dict[str, Any]) -> float:
    runs = part["runs"]
    return round(sum(r["completion_tokens"] for r in runs) / sum(r["seconds"] for r in runs), 2)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(servers.ROOT))
    except ValueError:
        return str(path)
