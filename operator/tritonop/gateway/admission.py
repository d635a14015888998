"""One admission bound per model: a fixed number of requests in flight, a bounded queue.

Triton queues a request in front of every step of a pipeline; under overload each of
those queues fills and an accepted request waits in all of them (S5: 32x the unloaded
p99). One bound in front of the whole pipeline keeps Triton's queues short and turns the
excess into an immediate 429, which a client or load balancer can retry elsewhere.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Overloaded(Exception):
    """Every in-flight place and every waiting place of the model is taken."""


class AdmissionBound:
    """First come, first served places for one model (one event loop, no threads).

    Args:
        max_in_flight: requests that may run at once.
        max_waiting: requests that may wait for a place; one more is refused at once.
    """

    def __init__(self, max_in_flight: int, max_waiting: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        self.in_flight = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, places: int = 1) -> None:
        """Take ``places`` places at once (a request of n choices takes n), waiting in line
        if needed; all or none, so that two such requests never hold half each.

        Raises:
            Overloaded: when the line is full too.
        """
        places = min(places, self.max_in_flight)
        if self.in_flight + places <= self.max_in_flight and not self._waiters:
            self.in_flight += places
            return
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(f"{self.in_flight} requests in flight and {len(self._waiters)} "
                             "waiting, the most this model takes")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, places)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(places)  # handed places just as the client left: pass them on
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._hand_over()
            raise

    def release(self, places: int = 1) -> None:
        """Give places back: to those first in line that they suffice for, or free them."""
        self.in_flight -= min(places, self.max_in_flight)
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters:
            waiter, places = self._waiters[0]
            if waiter.done():  # cancelled: its task takes it out of the line
                self._waiters.popleft()
                continue
            if self.in_flight + places > self.max_in_flight:
                return
            self._waiters.popleft()
            self.in_flight += places
            waiter.set_result(None)

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """``async with bound.place():`` holds a place for the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
