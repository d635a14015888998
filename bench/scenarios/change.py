"""CHANGE: a corpus with 1% of its texts changed, prepared again, against a full prepare.

The example's corpus is grown to ``sizes.change_texts`` distinct texts (its texts again,
each copy tagged with its number) and prepared into an artifacts root of its own, twice,
each corpus a new file (an absolute corpus path is fingerprinted by its name): all of it
(every text embedded: a full prepare), then with 1% of the texts changed (the new
version, the rest from the embedding cache). Both reuse the encoder exported for the
other scenarios, so what is compared is embedding and index building, not the export,
which a full prepare from nothing adds on top. One run each: the load average beside
them says how busy the machine was, and a run on a busy machine (bench/alternation.py's
quietness) never passes its target.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any

from bench import servers
from bench.alternation import Window, cores, load_per_core, quietness, settle
from bench.context import Context, log
from bench.targets import at_most
from tritonop.artifacts.corpus import read_corpus
from tritonop.artifacts.prepare import prepare
from tritonop.artifacts.resolve import link_tree
from tritonop_backend.artifacts import VersionManifest

CHANGED = 0.01
RATIO_TARGET = 0.10


def run(ctx: Context) -> dict[str, Any]:
    example = ctx.resource()
    spec = example.spec
    base = read_corpus(example.resolve_path(spec.corpus.source), spec.corpus.text_field)
    count = ctx.sizes.change_texts
    texts = [base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})")
             for i in range(count)]
    scratch = ctx.scratch("change")
    root = scratch / "artifacts"
    seed = root / example.name / "seed"  # the export, found by prepare as an older version's
    shutil.rmtree(root, ignore_errors=True)
    link_tree(ctx.dirs()[0], seed / "model")
    VersionManifest("seed", {}, "").write(seed)
    rng = random.Random(count)
    seconds: dict[str, float] = {}
    load: dict[str, float] = {}
    load_start = settle(ctx.sizes.settle_seconds)
    window = Window.open()
    for step in ("full", "1% changed"):
        if seconds:
            for i in rng.sample(range(count), int(count * CHANGED)):
                texts[i] += " (changed)"
        corpus = scratch / f"corpus-{len(seconds)}.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts),
                          encoding="utf-8")
        resource = servers.bench_resource(ctx.example, ctx.overrides, corpus=corpus)
        started = time.monotonic()
        prepare([resource], root, progress=False)
        seconds[step] = round(time.monotonic() - started, 2)
        load[step] = round(os.getloadavg()[0], 2)
        log.info("CHANGE %s: %.1f s", step, seconds[step])
    quiet = quietness(load_start, load_per_core(), [window.close()["other_cores"]], cores())
    ratio = seconds["1% changed"] / seconds["full"]
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "texts": count, "changed_texts": int(count * CHANGED), "prepare_seconds": seconds,
        "load_average_after": load, "ratio": round(ratio, 4), "quiet": quiet,
        "targets": [{**at_most("CHANGE.ratio", f"1% of {count} texts changed, time of a full "
                               "prepare", ratio, RATIO_TARGET, "x"), "noisy": quiet["noisy"]}],
    }
