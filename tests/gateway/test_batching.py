"""The search coalescer on its own: what it sends together, and what each caller gets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tritonop.gateway.batching import Coalescer
from tritonop.gateway.errors import APIError


class FakeSearch:
    """Answers each text with ``text:k``; records the calls; fails as told."""

    def __init__(self, refuse: str | None = None, fault: APIError | None = None,
                 delay: float = 0.0) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.refuse, self.fault, self.delay = refuse, fault, delay

    async def __call__(self, texts: Sequence[str], k: int) -> list[str]:
        self.calls.append((list(texts), k))
        await asyncio.sleep(self.delay)
        if self.fault is not None:
            raise self.fault
        if self.refuse in texts:
            raise APIError(400, f"text: {self.refuse!r} is refused", param="text")
        return [f"{text}:{k}" for text in texts]


def test_searches_made_together_go_as_one_request_per_k_and_each_gets_its_own_answer():
    async def main() -> None:
        search = FakeSearch()
        coalescer = Coalescer(search, max_rows=3)
        asks = [("a", 5), ("b", 5), ("c", 1), ("d", 5), ("e", 5)]
        answers = await asyncio.gather(*(coalescer.submit(t, k) for t, k in asks))
        assert answers == [f"{t}:{k}" for t, k in asks]
        assert sorted(search.calls) == [(["a", "b", "d"], 5), (["c"], 1), (["e"], 5)]

    asyncio.run(main())


def test_a_search_alone_goes_at_once_and_later_ones_do_not_wait_for_it():
    async def main() -> None:
        search = FakeSearch(delay=0.05)
        coalescer = Coalescer(search, max_rows=32)
        first = asyncio.create_task(coalescer.submit("first", 3))
        await asyncio.sleep(0.01)  # the first is in Triton when the next one comes
        assert await coalescer.submit("second", 3) == "second:3"
        assert await first == "first:3"
        assert search.calls == [(["first"], 3), (["second"], 3)]

    asyncio.run(main())


def test_a_refused_text_gets_its_400_and_the_others_their_answers():
    async def main() -> list[object]:
        search = FakeSearch(refuse="bad")
        coalescer = Coalescer(search, max_rows=8)
        return await asyncio.gather(*(coalescer.submit(t, 2) for t in ("x", "bad", "y")),
                                    return_exceptions=True)

    x, bad, y = asyncio.run(main())
    assert (x, y) == ("x:2", "y:2")
    assert isinstance(bad, APIError) and bad.status == 400 and bad.param == "text"


def test_a_server_fault_reaches_every_caller_of_the_batch():
    busy = APIError(503, "the model is at capacity", code="model_busy", retry_after=1)

    async def main() -> list[object]:
        coalescer = Coalescer(FakeSearch(fault=busy), max_rows=8)
        return await asyncio.gather(*(coalescer.submit(t, 2) for t in "abc"),
                                    return_exceptions=True)

    assert asyncio.run(main()) == [busy, busy, busy]


def test_a_caller_that_leaves_does_not_disturb_the_others():
    async def main() -> None:
        search = FakeSearch(delay=0.05)
        coalescer = Coalescer(search, max_rows=8)
        leaving = asyncio.create_task(coalescer.submit("leaving", 1))
        staying = asyncio.create_task(coalescer.submit("staying", 1))
        await asyncio.sleep(0.01)
        leaving.cancel()
        assert await staying == "staying:1"
        with pytest.raises(asyncio.CancelledError):
            await leaving
        # Cancelled before it was sent: it is not sent at all.
        gone = asyncio.create_task(coalescer.submit("gone", 1))
        await asyncio.sleep(0)
        gone.cancel()
        assert await coalescer.submit("next", 1) == "next:1"
        assert all("gone" not in texts for texts, _ in search.calls)
        assert (["next"], 1) in search.calls

    asyncio.run(main())
