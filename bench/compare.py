"""Compare settings of the example side by side: the tool behind the recommended spec.

    python -m bench.compare --variant --variant spec.stages.encoder.instances=2 \\
        --concurrency 1 16 64

Each ``--variant`` (zero or more ``PATH=VALUE`` overrides of the example, on top of
``--set``) gets its own Triton server, one running at a time: each is started, measured
at every concurrency and stopped, in turn, ``--alternations`` times (the S2 method,
``bench.alternation``). Prints the median alternation's queries/s and latency per
concurrency, each variant's ratio to the first (median and min-max) and whether the
machine was quiet, and writes them as JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import servers
from bench.alternation import alternate, ratio
from bench.context import Context, Sizes
from bench.run import DEFAULT_EXAMPLE, bench_artifacts_root
from bench.scenarios.s2 import QPS, closed_loops, search_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="*", action="append", required=True,
                        metavar="PATH=VALUE", help="one variant's overrides (repeat the flag)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="overrides shared by every variant")
    parser.add_argument("--example", type=Path, default=DEFAULT_EXAMPLE)
    parser.add_argument("--artifacts-root", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=9.0,
                        help="per variant and level, split over the alternations")
    parser.add_argument("--alternations", type=int, default=Sizes.alternations)
    parser.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = servers.parse_overrides(args.set)
    artifacts = args.artifacts_root or bench_artifacts_root(False)
    variants = {(" ".join(v) or "as is"): servers.deep_merge(shared, servers.parse_overrides(v))
                for v in args.variant}
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        ctx = Context(example=args.example.resolve(), overrides=shared,
                      artifacts_root=artifacts, workdir=scratch, sizes=Sizes())
        ctx.prepared_resource()
        sides = {name: _variant(name, servers.bench_resource(ctx.example, overrides),
                                artifacts, scratch / str(i))
                 for i, (name, overrides) in enumerate(variants.items())}
        levels = [str(c) for c in args.concurrency]
        series, quiet = alternate(
            sides, levels, args.alternations,
            closed_loops(ctx.queries(), args.seconds / args.alternations, 0.7), key=QPS,
            settle_s=ctx.sizes.settle_seconds)
    first = next(iter(variants))
    ratios = {name: {c: ratio(series, name, first, c, lambda f: f[QPS]) for c in levels}
              for name in variants if name != first}
    print(format_table(series))
    for name, by_level in ratios.items():
        print(f"{name} / {first}, q/s: " + ", ".join(
            f"c={c} {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
            for c, r in by_level.items() if r))
    print("noisy: " + "; ".join(quiet["why"]) if quiet["noisy"] else "quiet")
    if args.output:
        args.output.write_text(json.dumps({"variants": variants, "series": series,
                                           "ratios": ratios, "quiet": quiet}, indent=1))
    return 0


def _variant(name: str, resource: Any, artifacts: Path, workdir: Path) -> Callable[[], Any]:
    @contextmanager
    def side() -> Iterator[dict[str, Any]]:
        with servers.triton([resource], artifacts, workdir) as server:
            url = f"http://{server.http_url}/v2/models/{resource.name}/generate"
            yield {name: search_client(url, name)}
    return side


def format_table(series: dict[str, dict[str, Any]]) -> str:
    levels = sorted({int(c) for points in series.values() for c in points})
    lines = ["variant | " + " | ".join(f"c={c} q/s (p50/p99 ms)" for c in levels)]
    for name, points in series.items():
        cells = []
        for c in levels:
            s = points[str(c)]
            latency = s["latency_ms"] or {}
            cells.append(f"{s['throughput_qps']:.1f} ({latency.get('p50')}/{latency.get('p99')})")
        lines.append(f"{name} | " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
