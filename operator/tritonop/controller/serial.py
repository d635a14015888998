"""One reconcile at a time per resource, and never an older spec over a newer one.

kopf runs the change handlers of one object one after another, but its timers run
beside them, each in its own worker thread, with a body that kopf keeps updating as
events arrive. Without a lock a resync that read generation 1 could apply it after the
update handler applied generation 2. So every handler of a resource takes the
resource's lock, reads the body once inside it, and gives up when a newer generation
was already applied.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class PerObject:
    """A lock per resource (by uid), and the newest generation applied to each."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._applied: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(uid, threading.Lock())
        with lock:
            yield

    def stale(self, uid: str, generation: int) -> bool:
        """Whether a newer generation than ``generation`` was applied already."""
        with self._guard:
            return generation < self._applied.get(uid, 0)

    def record(self, uid: str, generation: int) -> None:
        with self._guard:
            self._applied[uid] = max(generation, self._applied.get(uid, 0))

    def forget(self, uid: str) -> None:
        """A deleted resource: its lock and generation are not needed any more."""
        with self._guard:
            self._applied.pop(uid, None)
            self._locks.pop(uid, None)
