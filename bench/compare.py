"""Compare settings of the example side by side: the tool behind the recommended spec.

    python -m bench.compare --variant --variant spec.stages.encoder.instances=2 \\
        --concurrency 1 16 64

Each ``--variant`` (zero or more ``PATH=VALUE`` overrides of the example, on top of
``--set``) gets its own Triton server; all run at once, and the load runs take turns
between them in short rounds (the S2 method), so that on a shared machine the
variants are compared in the same minutes. Prints queries/s and latency per
concurrency, and writes them as JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import servers
from bench.context import Context, Sizes
from bench.run import DEFAULT_EXAMPLE, bench_artifacts_root
from bench.scenarios.s2 import measure_series


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
    parser.add_argument("--seconds", type=float, default=9.0, help="per variant and level")
    parser.add_argument("--rounds", type=int, default=3)
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
        urls = {}
        for i, (name, overrides) in enumerate(variants.items()):
            resource = servers.bench_resource(ctx.example, overrides)
            server = stack.enter_context(servers.triton([resource], artifacts, scratch / str(i)))
            urls[name] = f"http://{server.http_url}/v2/models/{resource.name}/generate"
        series = asyncio.run(measure_series(urls, ctx.queries(), tuple(args.concurrency),
                                      args.seconds, 0.7, args.rounds))
    print(format_table(series))
    if args.output:
        args.output.write_text(json.dumps({"variants": variants, "series": series}, indent=1))
    return 0


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
