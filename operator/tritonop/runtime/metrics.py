"""Reading Triton's Prometheus page: the engine counters the LLM model exports."""

from __future__ import annotations

import re

_SERIES = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')


def model_metric(page: str, name: str, model: str) -> float:
    """Sum of metric ``name`` over every series labelled ``model="<model>"``.

    A model with several instances reports one series per instance; their sum is the
    model's value (0 when the metric is absent).
    """
    total = 0.0
    wanted = f'model="{model}"'
    for line in page.splitlines():
        match = _SERIES.match(line)
        if match and match["name"] == name and wanted in match["labels"].split(","):
            total += float(match["value"])
    return total
