"""Targets: a figure, the goal it is held to, and whether it met it.

Benchmarks never assert: a missed target is reported (PASS/MISS in the results file
and on the docs page), with an explanation written from profiling.
"""

from __future__ import annotations

from typing import Any


def target(key: str, what: str, value: float | None, goal: str, met: bool | None,
           unit: str = "") -> dict[str, Any]:
    """One target's outcome; ``met`` is None when the figure could not be measured."""
    return {"id": key, "what": what, "value": None if value is None else round(value, 3),
            "unit": unit, "goal": goal, "met": met}


def at_most(key: str, what: str, value: float | None, limit: float, unit: str = "",
            goal: str | None = None) -> dict[str, Any]:
    return target(key, what, value, goal or f"<= {limit:g}{unit and ' ' + unit}",
                  None if value is None else value <= limit, unit)


def at_least(key: str, what: str, value: float | None, limit: float, unit: str = "",
             goal: str | None = None) -> dict[str, Any]:
    return target(key, what, value, goal or f">= {limit:g}{unit and ' ' + unit}",
                  None if value is None else value >= limit, unit)


# Targets measured by alternating ours and theirs (bench/alternation.py); results written
# before alternations have no spread for them.
ALTERNATED = ("S2.vs_fastapi", "S2.vs_infinity", "S2.p99_vs_infinity", "S2.search_vs_infinity",
              "S4.vs_vllm", "S4.ttft_vs_vllm", "S4.greedy_vs_vllm", "S4.itl_p99_vs_vllm",
              "S4.ttft_p99_vs_vllm", "S6.p50_ratio", "S6.throughput_ratio")


def held(check: Any, key: str, what: str, ratio: dict[str, Any] | None, limit: float,
         quiet: dict[str, Any]) -> dict[str, Any]:
    """A comparison's target (``check`` is :func:`at_least` or :func:`at_most`): its figure
    is the median of the alternations' ratios; their spread and the run's quietness go
    beside it (see :func:`outcome`)."""
    found = check(key, what, ratio and ratio["median"], limit, "x")
    return {**found, "spread": ratio and [ratio["min"], ratio["max"]],
            "noisy": quiet["noisy"], "load_per_core": quiet["load_per_core_start"],
            "other_cores": quiet["other_cores_max"]}


def outcome(found: dict[str, Any]) -> str:
    """PASS, MISS or n/a; a target met on a noisy run is "noisy", never PASS."""
    if found.get("noisy") and found["met"]:
        return "noisy"
    return {True: "PASS", False: "MISS", None: "n/a"}[found["met"]]
