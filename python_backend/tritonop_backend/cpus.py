"""How many CPUs this process may use: the container's CPU limit, not the node's cores.

In a pod with ``limits.cpu: 2`` on a 64-core node, ``os.cpu_count()`` says 64; starting 64
threads against a quota of two cores makes the kernel throttle them all, and latency
grows. The limit reaches the container as a CFS quota: ``cpu.max`` (cgroup v2) or
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (cgroup v1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_v2(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (``1.5`` for ``limits.cpu: 1500m``), None when unlimited."""
    return _quota_v2(root) or _quota_v1(root)


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs to size thread pools for: the quota rounded up, within the CPUs we may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)
