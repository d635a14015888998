"""The README's Kubernetes quickstart times, from a cluster-tier run's JUnit XML.

The quickstart tests (tests/cluster/test_quickstart*.py) record, as test-suite properties,
the time from `kubectl apply -f examples/news-search.yaml` to the first answered search
(``<figure>_seconds``) and the machine's 1-minute load average when it started and ended
(``<figure>_load_average``, "start end"), and the no-drop tests their request counts
(``no_drop_<case>_<count>``: sent, answered, failed, to_stopping). This copies them into a
results file for ``python -m bench.report``:

    pytest tests/cluster/test_quickstart.py tests/cluster/test_quickstart_namespaced.py \\
        --junitxml=/tmp/quickstart.xml
    python -m bench.quickstart /tmp/quickstart.xml     # bench/results/quickstart-<UTC>.json
    python -m bench.report
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too
RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "quickstart_"
NO_DROP = "no_drop_"
COUNTS = ("sent", "answered", "failed", "to_stopping")


def figures(junit: Path) -> dict[str, dict[str, Any]]:
    """``{figure: {"seconds": s, "load_average": [start, end] or None}}`` from the XML."""
    found: dict[str, dict[str, Any]] = {}
    for prop in ET.parse(junit).getroot().iter("property"):
        name, value = prop.get("name") or "", prop.get("value") or ""
        if not name.startswith(PREFIX):
            continue
        if name.endswith("_seconds"):
            found.setdefault(name.removesuffix("_seconds"), {})["seconds"] = float(value)
        elif name.endswith("_load_average"):
            found.setdefault(name.removesuffix("_load_average"), {})["load_average"] = [
                float(v) for v in value.split()]
    return {k: {"load_average": None, **v} for k, v in found.items() if "seconds" in v}


def no_drop_counts(junit: Path) -> dict[str, dict[str, int]]:
    """``{case: {"sent": n, "answered": n, "failed": n, "to_stopping": n}}`` from the XML."""
    found: dict[str, dict[str, int]] = {}
    for prop in ET.parse(junit).getroot().iter("property"):
        name = prop.get("name") or ""
        if name.startswith(NO_DROP):
            case, _, count = name.removeprefix(NO_DROP).rpartition("_")
            if count == "stopping":
                case, count = case.removesuffix("_to"), "to_stopping"
            if count in COUNTS:
                found.setdefault(case, {})[count] = int(prop.get("value") or 0)
    return {case: counts for case, counts in found.items() if set(counts) == set(COUNTS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quickstart",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("junit", type=Path, help="the JUnit XML of the cluster-tier run")
    parser.add_argument("--out", type=Path, help="write here instead of "
                        "bench/results/quickstart-<timestamp>.json")
    args = parser.parse_args(argv)
    from bench.run import machine

    found = figures(args.junit)
    if not found:
        print(f"no {PREFIX}*_seconds property in {args.junit}", file=sys.stderr)
        return 1
    stamp = datetime.fromtimestamp(args.junit.stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%SZ")
    body = {"kind": "quickstart", "junit_written": stamp, "figures": found,
            "no_drop": no_drop_counts(args.junit), "machine": machine()}
    out = args.out or RESULTS / f"quickstart-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
