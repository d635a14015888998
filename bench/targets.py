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
