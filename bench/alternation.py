"""Comparisons whose figures hold when run again: one server at a time, alternated, noise.

A comparison has sides (ours, theirs), each a function that starts its server(s) and
yields what the scenario measures. Per alternation every side in turn is started,
measured at every level and stopped, so the server measured never shares the machine
with an idle rival; ``alternations`` rounds give each level as many ratios, reported as
their median with the spread (min-max).

Noise. The run is *noisy* when the machine was not quiet:

* the 1-minute load average at its start is above :data:`LOAD_PER_CORE_LIMIT` per core.
  A quiet machine sits below 0.1 per core (issue 22's quiet rerun: 0.1 on 2 cores); the
  page's figures came from 3.8-6.2 on 2 cores (1.9-3.1 per core). At 0.5, half of every
  core was wanted by something else over the last minute on average. Our own previous
  scenario also raises it, so the comparison first waits (``settle_s``) for that tail to
  decay below the limit;
* the load rose during it, or other processes took CPU time: the load average cannot tell
  our load from others' (16 clients in a closed loop put it above 2 on 2 cores by
  themselves), so a rise is measured by what it costs us: per measured window, the CPU
  time the machine spent (/proc/stat: user, nice, system, irq, softirq, steal) minus that
  of this process and its descendants (/proc/<pid>/stat: utime, stime and their reaped
  children's), over wall time. Any other runnable process gets its share of the CPUs and
  shows here; above :data:`OTHER_CPU_LIMIT` of the cores (0.1 core of 2: a quiet machine's
  daemons and kernel threads take a few hundredths) it could move a ratio by more than
  the few per cent a quiet run's alternations spread over.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import baselines
from bench.context import log

LOAD_PER_CORE_LIMIT = 0.5
OTHER_CPU_LIMIT = 0.05  # of the machine's cores
SETTLE_POLL_S = 5.0
_BUSY = (0, 1, 2, 5, 6, 7)  # /proc/stat's cpu line: user nice system irq softirq steal

Side = Callable[[], AbstractContextManager[Any]]
# What a side yielded, and a level -> the figures of each series measured at that level.
Measure = Callable[[Any, str], Mapping[str, dict[str, Any]]]


def cores() -> int:
    return os.cpu_count() or 1


def load_per_core() -> float:
    return os.getloadavg()[0] / cores()


def busy_ticks() -> int:
    """Clock ticks every CPU of the machine spent busy so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in _BUSY)


def tree_ticks(root: int | None = None) -> int:
    """Clock ticks used so far by ``root`` (this process) and its descendants, with the
    children they reaped (a process that ends moves its time to its parent's)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(fields[i]) for i in (11, 12, 13, 14))
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, [root or os.getpid()]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total


@dataclass(frozen=True)
class Window:
    """One measured window's start: what share of the machine other processes took."""

    started: float
    busy: int
    ours: int
    load: float

    @classmethod
    def open(cls) -> Window:
        return cls(time.monotonic(), busy_ticks(), tree_ticks(), load_per_core())

    def close(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.started, 1e-9)
        other = (busy_ticks() - self.busy - (tree_ticks() - self.ours)) / os.sysconf(
            "SC_CLK_TCK") / wall
        return {"other_cores": round(max(other, 0.0), 3), "load_per_core": round(self.load, 2)}


def settle(limit_s: float) -> float:
    """Wait up to ``limit_s`` for the load per core to fall to the limit; it, then."""
    deadline = time.monotonic() + limit_s
    load = load_per_core()
    if load > LOAD_PER_CORE_LIMIT and limit_s > 0:
        log.info("load %.2f per core: waiting up to %.0f s for it to settle", load, limit_s)
    while load > LOAD_PER_CORE_LIMIT and time.monotonic() < deadline:
        time.sleep(min(SETTLE_POLL_S, max(deadline - time.monotonic(), 0.0)))
        load = load_per_core()
    return load


def quietness(load_start: float, load_end: float, other_cores: Sequence[float],
              machine_cores: int) -> dict[str, Any]:
    """Whether a comparison ran on a quiet machine, and if not, why (see the module)."""
    other = max(other_cores, default=0.0)
    limit = OTHER_CPU_LIMIT * machine_cores
    why = []
    if load_start > LOAD_PER_CORE_LIMIT:
        why.append(f"load average {load_start:.2f} per core at the start "
                   f"(limit {LOAD_PER_CORE_LIMIT:g})")
    if other > limit:
        why.append(f"other processes took {other:.2f} cores in a measured window "
                   f"(limit {limit:.2f})")
    return {"cores": machine_cores, "load_per_core_start": round(load_start, 2),
            "load_per_core_end": round(load_end, 2), "other_cores_max": round(other, 3),
            "limits": {"load_per_core": LOAD_PER_CORE_LIMIT, "other_cores": round(limit, 3)},
            "noisy": bool(why), "why": why}


def spread(ours: Sequence[float | None], theirs: Sequence[float | None]) -> dict[str, Any] | None:
    """Per-alternation ratios ours / theirs, their median and min-max; None when one of
    the alternations lacks a figure."""
    if not ours or len(ours) != len(theirs) or any(
            a is None or not b for a, b in zip(ours, theirs, strict=True)):
        return None
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]  # type: ignore[operator]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "ratios": [round(r, 3) for r in ratios]}


def ratio(series: Mapping[str, Mapping[str, Any]], ours: str, theirs: str, level: str,
          value: Callable[[dict[str, Any]], float | None]) -> dict[str, Any] | None:
    """:func:`spread` of ``value`` between two series of :func:`alternate` at ``level``."""
    a, b = series.get(ours, {}).get(level), series.get(theirs, {}).get(level)
    if not a or not b:
        return None
    return spread([value(x) for x in a["alternations"]], [value(x) for x in b["alternations"]])


def p(pct: str, key: str = "latency_ms") -> Callable[[dict[str, Any]], float | None]:
    """A figure's percentile, for :func:`ratio`: ``p("p99")``."""
    return lambda figures: (figures.get(key) or {}).get(pct)


def median_point(parts: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """One level of one series: the alternation with the median ``key`` (the lower middle
    one for an even count), with every alternation's figures under ``alternations``."""
    ranked = sorted(parts, key=lambda part: part[key])
    return {**ranked[(len(ranked) - 1) // 2], "alternations": list(parts)}


def alternate(sides: Mapping[str, Side], levels: Sequence[str], alternations: int,
              measure: Measure, *, key: str, settle_s: float,
              unavailable: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each alternation, each side in turn: start it, measure every level, stop it.

    Returns the series (name -> level -> :func:`median_point` by ``key``) and the run's
    :func:`quietness`. A side whose baseline cannot run is left out; why goes into
    ``unavailable`` under the side's name.
    """
    load_start = settle(settle_s)
    parts: dict[str, dict[str, list[dict[str, Any]]]] = {}
    active = dict(sides)
    for turn in range(alternations):
        for name, side in list(active.items()):
            log.info("alternation %d/%d: %s", turn + 1, alternations, name)
            with ExitStack() as stack:
                try:
                    target = stack.enter_context(side())
                except baselines.BaselineUnavailable as err:
                    log.warning("%s not measured: %s", name, err)
                    (unavailable if unavailable is not None else {})[name] = str(err)
                    del active[name]
                    continue
                for level in levels:
                    window = Window.open()
                    figures = measure(target, level)
                    noise = window.close()
                    for series, summary in figures.items():
                        parts.setdefault(series, {}).setdefault(level, []).append(
                            {**summary, **noise})
    windows = [part["other_cores"] for levels_ in parts.values() for runs in levels_.values()
               for part in runs]
    quiet = {"alternations": alternations,
             **quietness(load_start, load_per_core(), windows, cores())}
    log.info("quiet: %s", quiet)
    return ({series: {level: median_point(runs, key) for level, runs in by_level.items()}
             for series, by_level in parts.items()}, quiet)
