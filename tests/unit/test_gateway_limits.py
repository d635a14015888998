"""Per-client limits of one model, on a fake clock: each limit refuses the client beyond it
with the seconds until it frees, never another client, and frees as the minute slides."""

from __future__ import annotations

import pytest

from tritonop.gateway.config import ClientLimits
from tritonop.gateway.limits import ClientLimiter, Limited, TooWide


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(every: ClientLimits, named: dict[str, ClientLimits] | None = None,
            max_in_flight: int = 8) -> tuple[ClientLimiter, Clock]:
    clock = Clock()
    return ClientLimiter(every, named or {}, max_in_flight, clock), clock


def refused(limits: ClientLimiter, client: str, places: int = 1) -> Limited:
    with pytest.raises(Limited) as caught:
        limits.admit(client, places)
    return caught.value


def test_requests_per_minute_refuse_the_next_until_the_oldest_is_a_minute_old():
    limits, clock = limiter(ClientLimits(requests_per_minute=3))
    for step in range(3):
        clock.now = 1000.0 + step * 10
        limits.admit("alice")
        limits.leave("alice")
    clock.now = 1025.0
    err = refused(limits, "alice")
    assert err.limits == ["requestsPerMinute"]
    assert err.retry_after == 36  # the first request (second 1000) leaves the window at 1061
    assert "3 requests per minute" in err.message
    limits.admit("bob")  # another client is not counted with alice
    clock.now = 1061.0
    limits.admit("alice")


def test_tokens_per_minute_refuse_once_the_budget_is_used_and_free_as_usage_ages():
    limits, clock = limiter(ClientLimits(tokens_per_minute=100))
    limits.admit("alice")
    limits.used("alice", 60)
    limits.leave("alice")
    clock.now = 1030.0
    limits.admit("alice")  # 60 of 100 used: still under the budget
    limits.used("alice", 60)
    limits.leave("alice")
    err = refused(limits, "alice")
    assert err.limits == ["tokensPerMinute"]
    assert "120 used" in err.message
    assert err.retry_after == 31  # 1000's 60 tokens leave at 1061: 60 < 100
    limits.admit("bob")
    clock.now = 1061.0
    limits.admit("alice")


def test_the_share_counts_held_requests_and_frees_when_one_ends():
    limits, _ = limiter(ClientLimits(max_in_flight_share=0.25), max_in_flight=6)
    assert limits.places_of("alice") == 2  # ceil(0.25 * 6)
    limits.admit("alice")
    limits.admit("alice")
    err = refused(limits, "alice")
    assert err.limits == ["maxInFlightShare"] and err.retry_after == 1
    limits.admit("bob")
    limits.admit("bob")
    limits.leave("alice")
    limits.admit("alice")


def test_a_request_of_several_choices_holds_a_place_of_the_share_for_each():
    """``n: 4`` takes four of the model's places: four of the client's share as well (it
    used to count one, so a key allowed one place could hold the whole model)."""
    limits, _ = limiter(ClientLimits(max_in_flight_share=0.5), max_in_flight=6)
    assert limits.places_of("alice") == 3
    limits.admit("alice", 2)
    assert refused(limits, "alice", 2).limits == ["maxInFlightShare"]
    limits.admit("alice", 1)
    limits.leave("alice", 2)
    limits.admit("alice", 2)
    with pytest.raises(TooWide) as wide:  # more than the share alone: never admitted
        limits.admit("bob", 4)
    assert wide.value.share == 3


def test_a_named_client_has_its_own_limits_instead_of_every_clients():
    limits, _ = limiter(ClientLimits(requests_per_minute=1),
                        {"batch": ClientLimits(requests_per_minute=3)})
    for _ in range(3):
        limits.admit("batch")
    refused(limits, "batch")
    limits.admit("alice")
    refused(limits, "alice")


def test_every_limit_beyond_is_named_with_the_longest_wait():
    limits, clock = limiter(ClientLimits(requests_per_minute=1, tokens_per_minute=10,
                                         max_in_flight_share=0.1))
    limits.admit("alice")
    limits.used("alice", 50)
    clock.now = 1020.0
    err = refused(limits, "alice")
    assert err.limits == ["requestsPerMinute", "tokensPerMinute", "maxInFlightShare"]
    assert err.retry_after == 41


def test_without_limits_nothing_is_counted():
    limits, _ = limiter(ClientLimits())
    assert not limits.active
    for _ in range(10_000):
        limits.admit("alice")
    limits.used("alice", 10**9)
    limits.admit("alice")
