"""Per-client limits on one model: requests and tokens per minute, a share of its places.

The admission bound protects the model from the sum of all clients; these limits keep one
client from taking all of it. They are checked before the client's request takes or waits
for an admission place, so that a client beyond its limits is answered 429 at once and
never stands in the line the other clients wait in.

Counting is per gateway (one pod) and in memory: a minute is a sliding window of sixty
one-second buckets per client and limit, so memory does not grow with the request rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tritonop.gateway.config import ClientLimits

WINDOW_SECONDS = 60


class TooWide(Exception):
    """A request needs more places at once than its client's share holds (``n`` choices)."""

    def __init__(self, share: int) -> None:
        super().__init__(f"the share is {share} places")
        self.share = share


class Limited(Exception):
    """A client is beyond one of its limits.

    Args:
        limits: the names of the limits it is beyond, as the spec spells them.
        retry_after: whole seconds until a retry can pass (at least 1).
        message: what was exceeded, by how much, for the client.
    """

    def __init__(self, limits: list[str], retry_after: int, message: str) -> None:
        super().__init__(message)
        self.limits = limits
        self.retry_after = retry_after
        self.message = message


class SlidingMinute:
    """Amounts counted over the last 60 seconds, in one-second buckets."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [second, amount], oldest first

    def add(self, now: float, amount: int) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([second, amount])

    def total(self, now: float) -> int:
        self._expire(now)
        return sum(amount for _, amount in self._buckets)

    def seconds_until_below(self, now: float, budget: int) -> float:
        """How long until the total falls below ``budget`` as old buckets leave the window."""
        total = self.total(now)
        wait = 0.0
        for second, amount in self._buckets:
            if total < budget:
                break
            total -= amount
            wait = _expiry(second) - now
        return wait

    def _expire(self, now: float) -> None:
        while self._buckets and _expiry(self._buckets[0][0]) <= now:
            self._buckets.popleft()


@dataclass
class ClientUsage:
    """What one client used of one model."""

    requests: SlidingMinute = field(default_factory=SlidingMinute)
    tokens: SlidingMinute = field(default_factory=SlidingMinute)
    held: int = 0  # places of requests admitted past the limits, not yet finished


class ClientLimiter:
    """The limits of every client on one model.

    Args:
        every: the limits of a client that ``named`` does not list.
        named: limits of named clients, replacing ``every`` for them.
        max_in_flight: the model's in-flight places, which ``max_in_flight_share`` divides.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, every: ClientLimits, named: dict[str, ClientLimits],
                 max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.named = named
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.active = any(_limits_set(x) for x in (every, *named.values()))
        self._usage: dict[str, ClientUsage] = {}

    def limits_of(self, client: str) -> ClientLimits:
        return self.named.get(client, self.every)

    def places_of(self, client: str) -> int | None:
        """The most requests ``client`` may hold at once, or None without a share."""
        share = self.limits_of(client).max_in_flight_share
        if share is None:
            return None
        return max(1, math.ceil(share * self.max_in_flight))

    def admit(self, client: str, places: int = 1) -> None:
        """Count one request of ``client`` holding ``places`` (one per choice), or refuse it.

        A request's places count against the share from here until :meth:`leave`, waiting
        or in flight: a client at its share cannot fill the model's waiting line either.

        Raises:
            Limited: naming every limit the client is beyond, with the longest wait.
            TooWide: the request alone needs more places than the client's share.
        """
        if not self.active:
            return
        limits = self.limits_of(client)
        usage = self._usage.setdefault(client, ClientUsage())
        now = self.clock()
        beyond: list[tuple[str, float, str]] = []
        rpm = limits.requests_per_minute
        if rpm is not None and usage.requests.total(now) >= rpm:
            beyond.append(("requestsPerMinute", usage.requests.seconds_until_below(now, rpm),
                           f"{rpm} requests per minute (requestsPerMinute)"))
        tpm = limits.tokens_per_minute
        if tpm is not None and (used := usage.tokens.total(now)) >= tpm:
            beyond.append(("tokensPerMinute", usage.tokens.seconds_until_below(now, tpm),
                           f"{tpm} tokens per minute (tokensPerMinute; {used} used in the "
                           "last minute)"))
        share = self.places_of(client)
        if share is not None and places > share:
            raise TooWide(share)
        if share is not None and usage.held + places > share:
            # A place frees when one of the client's requests ends; when is not known.
            beyond.append(("maxInFlightShare", 1.0,
                           f"{share} places at once (maxInFlightShare "
                           f"{limits.max_in_flight_share} of the model's {self.max_in_flight} "
                           "in-flight places; a request holds one per choice)"))
        if beyond:
            retry = max(1, math.ceil(max(wait for _, wait, _ in beyond)))
            raise Limited([name for name, _, _ in beyond], retry,
                          "this API key is beyond its limit of " +
                          " and ".join(what for _, _, what in beyond))
        usage.requests.add(now, 1)
        usage.held += places

    def leave(self, client: str, places: int = 1) -> None:
        """The request :meth:`admit` counted has ended (answered, refused later, or gone)."""
        usage = self._usage.get(client)
        if usage is not None:
            usage.held = max(0, usage.held - places)

    def used(self, client: str, tokens: int) -> None:
        """Tokens one answer of ``client`` cost (prompt and generated)."""
        if self.active and tokens > 0:
            self._usage.setdefault(client, ClientUsage()).tokens.add(self.clock(), tokens)


def _expiry(second: int) -> int:
    """When every amount counted in the bucket ``[second, second + 1)`` is a minute old."""
    return second + 1 + WINDOW_SECONDS


def _limits_set(limits: ClientLimits) -> bool:
    return any(value is not None for value in (limits.requests_per_minute,
                                               limits.tokens_per_minute,
                                               limits.max_in_flight_share))
