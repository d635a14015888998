"""Serve a CRD installed after the operator started, even when discovery lags behind it.

kopf 1.45 watches CustomResourceDefinitions and, on each event of one, re-reads the API
discovery (``/apis/<group>/...``) for that CRD's group and serves what it lists *at that
moment*. kube-apiserver adds a new CRD's resource to discovery asynchronously, after the
CRD is Established: all of the CRD's events (ADDED, NamesAccepted, Established) can come
before discovery lists the plural, and then no later event makes kopf look again, so the
resource is never served until a restart. Seen on the real control plane
(tests/cluster/test_lifecycle.py): three rescans within 50 ms of the CRD's creation all
found no ``llmservices``; the API server initialized its storage 240 ms later.

The fix wraps kopf's CRD-event processor: after kopf's own rescan, if the CRD is one of
ours, Established and serving our version, and kopf still serves no such resource, it
rescans again (backing off, for at most ``TRITONOP_DISCOVERY_WAIT_SECONDS``, 120 s) until
discovery lists it. Nothing else changes: other groups' CRDs, deletions and CRDs already
served go straight through.

kopf exposes no public hook for this (its resource observer and ``Insights`` are
internal), so this replaces ``kopf._core.reactor.observation.
process_discovered_resource_event``; kopf is pinned to 1.45.2 in pyproject.toml, and
:func:`install` fails loudly if that function is not there with the expected arguments.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kopf._core.reactor import observation

from tritonop import API_GROUP, API_VERSION

WAIT_SECONDS = float(os.environ.get("TRITONOP_DISCOVERY_WAIT_SECONDS", "120"))
FIRST_DELAY = 0.25
MAX_DELAY = 5.0
PLURALS = frozenset({"embeddingsearches", "llmservices"})
_EXPECTED_ARGUMENTS = {"raw_event", "settings", "registry", "insights"}

logger = logging.getLogger(__name__)
Processor = Callable[..., Awaitable[None]]


def awaited_plural(crd: Mapping[str, Any]) -> str | None:
    """The plural that discovery must list for this CRD, if it is ours and ready to serve.

    Returns:
        None for another group's CRD, a CRD being deleted, one not yet Established, or
        one that does not serve the version the operator handles.
    """
    spec = crd.get("spec") or {}
    plural = (spec.get("names") or {}).get("plural")
    if spec.get("group") != API_GROUP or plural not in PLURALS:
        return None
    if (crd.get("metadata") or {}).get("deletionTimestamp"):
        return None
    conditions = (crd.get("status") or {}).get("conditions") or []
    if not any(c.get("type") == "Established" and c.get("status") == "True"
               for c in conditions):
        return None
    if not any(v.get("name") == API_VERSION and v.get("served")
               for v in spec.get("versions") or []):
        return None
    return str(plural)


def served(insights: Any, plural: str) -> bool:
    """Whether kopf serves ``plural`` of our group and version now."""
    return any(r.group == API_GROUP and r.version == API_VERSION and r.plural == plural
               for r in insights.watched_resources)


def waiting_for_discovery(original: Processor, wait_seconds: float = WAIT_SECONDS
                          ) -> Processor:
    """``original`` (kopf's CRD-event processor), rescanning until our plural is served."""

    async def process(*, raw_event: Mapping[str, Any], insights: Any, **kwargs: Any) -> None:
        await original(raw_event=raw_event, insights=insights, **kwargs)
        if raw_event.get("type") in (None, "DELETED"):
            return
        plural = awaited_plural(raw_event.get("object") or {})
        if plural is None or served(insights, plural):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        delay = FIRST_DELAY
        while not served(insights, plural):
            if loop.time() >= deadline:
                logger.warning("The API server's discovery does not list %s.%s/%s %.0f s "
                               "after its CRD was Established; it is served from the next "
                               "event of that CRD, or a restart.", plural, API_GROUP,
                               API_VERSION, wait_seconds)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
            await original(raw_event=raw_event, insights=insights, **kwargs)
        logger.info("Discovery lists %s.%s now: serving it.", plural, API_GROUP)

    process.__wrapped__ = original  # type: ignore[attr-defined]
    return process


def install() -> None:
    """Replace kopf's CRD-event processor with :func:`waiting_for_discovery` (once)."""
    original = observation.process_discovered_resource_event
    if hasattr(original, "__wrapped__"):
        return
    arguments = set(inspect.signature(original).parameters)
    if not _EXPECTED_ARGUMENTS <= arguments:
        raise RuntimeError("kopf's process_discovered_resource_event changed "
                           f"(arguments {sorted(arguments)}); tritonop pins kopf==1.45.2")
    observation.process_discovered_resource_event = waiting_for_discovery(original)
