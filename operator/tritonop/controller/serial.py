"""One reconcile at a time per resource, and never an older spec over a newer one.

kopf runs the change handlers of one object one after another, but its timers run
beside them, each in its own worker thread, with a body that kopf keeps updating as
events arrive. Without a lock a resync that read generation 1 could apply it after the
update handler applied generation 2. So every handler of a resource takes the
resource's lock, reads the body once inside it, and gives up when a newer generation
was already applied.

A generation the API server refused is not applied at every resync (the same request
gets the same answer, and a storm of them helps no one), but it is not given up either:
the cause may lie outside the spec (RBAC granted later, a webhook fixed), so
:class:`Rejections` lets it be tried again after a long, growing pause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator


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


@dataclasses.dataclass
class _Refused:
    generation: int
    attempts: int
    next_at: float


class Rejections:
    """When a generation the API server refused may be applied again, per resource.

    The pause after the n-th refusal of one generation is ``first * 2**(n-1)`` seconds,
    at most ``most``: 30 s, 1, 2, 4, 8 and then every 10 minutes by default.
    """

    def __init__(self, first: float, most: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first = first
        self.most = most
        self._clock = clock
        self._guard = threading.Lock()
        self._refused: dict[str, _Refused] = {}

    def pause(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th refusal of a generation."""
        return min(self.first * 2.0 ** min(max(attempts - 1, 0), 32), self.most)

    def refused(self, uid: str, generation: int) -> float:
        """The API server refused ``generation`` once more; the pause before the next try."""
        with self._guard:
            entry = self._refused.get(uid)
            attempts = entry.attempts + 1 if entry and entry.generation == generation else 1
            pause = self.pause(attempts)
            self._refused[uid] = _Refused(generation, attempts, self._clock() + pause)
            return pause

    def due(self, uid: str, generation: int) -> bool:
        """Whether the refused ``generation`` may be applied again now.

        A refusal this process did not see (its status was written before a restart)
        counts as seen now: the first try waits one pause.
        """
        with self._guard:
            entry = self._refused.get(uid)
            if entry is None or entry.generation != generation:
                self._refused[uid] = _Refused(generation, 1, self._clock() + self.pause(1))
                return False
            return self._clock() >= entry.next_at

    def forget(self, uid: str) -> None:
        """Applied at last, or deleted."""
        with self._guard:
            self._refused.pop(uid, None)
