"""The engine under cancellations and faults, with several sequences running.

Every cancellation test runs four sequences, so that the cancelled one's row is moved
over by another (the bug this file was written for: cancelling any row but the last
raised inside the cache's row move and the cancel was lost). The survivors must still
produce exactly what ``transformers``' ``generate`` produces alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.support.llm import Outcome, record, run
from tests.unit.test_llm_engine import POLICY, reference, request
from tritonop_backend.llm.engine import (
    MAX_FAILED_STEPS,
    EngineFailedError,
    GenerationEvent,
    LLMEngine,
)
from tritonop_backend.llm.loading import LoadedModel

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "Count from 1 to 10.",
]
TOKENS = 14


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start(smol: LoadedModel, count: int = 4, **engine: Any) -> LLMEngine:
    """An engine with ``count`` greedy sequences running (one prefill step done)."""
    llm = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=4, max_waiting=4, **engine)
    for index in range(count):
        llm.add(index, request(PROMPTS[index], max_tokens=TOKENS))
    return llm


def step(engine: LLMEngine, outcomes: dict[Any, Outcome]) -> list[GenerationEvent]:
    """One step, its events added to ``outcomes``."""
    events = engine.step()
    record(outcomes, events, 1)
    return events


def drive(engine: LLMEngine, outcomes: dict[Any, Outcome], steps: int | None = None) -> None:
    """Run ``steps`` steps, or until idle, adding every event to ``outcomes``."""
    for _ in range(steps or 200):
        step(engine, outcomes)
        if not engine.has_work():
            return
    assert steps is not None, "engine did not finish"


def assert_survivors_match(smol: LoadedModel, engine: LLMEngine,
                           outcomes: dict[Any, Outcome], survivors: list[int]) -> None:
    for index in survivors:
        expected = reference(smol, engine, PROMPTS[index], TOKENS)
        assert outcomes[index].tokens == expected, index


class TestCancel:
    @pytest.mark.parametrize("row", [0, 1, 3], ids=["first", "middle", "last"])
    def test_any_row_among_four_running(self, smol: LoadedModel, row: int) -> None:
        engine = start(smol)
        outcomes: dict[Any, Outcome] = {}
        for _ in range(3):
            drive(engine, outcomes, steps=1)
        assert engine.running == 4
        assert engine.cancel(row)
        events = step(engine, outcomes)
        assert [e.finish_reason for e in events if e.request_id == row] == ["cancelled"]
        assert engine.running == 3
        drive(engine, outcomes)
        assert outcomes[row].last.finish_reason == "cancelled"
        assert_survivors_match(smol, engine, outcomes, [i for i in range(4) if i != row])
        assert not engine.has_work() and engine.running == 0 and engine.waiting == 0

    def test_two_rows_in_one_step_and_a_newcomer_takes_a_slot(self, smol: LoadedModel) -> None:
        engine = start(smol)
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes, steps=2)
        engine.cancel(0)
        engine.cancel(2)
        engine.add("late", request(PROMPTS[2], max_tokens=TOKENS))
        drive(engine, outcomes)
        assert outcomes[0].last.finish_reason == outcomes[2].last.finish_reason == "cancelled"
        assert_survivors_match(smol, engine, outcomes, [1, 3])
        assert outcomes["late"].tokens == reference(smol, engine, PROMPTS[2], TOKENS)

    def test_while_waiting_twice_and_after_finishing(self, smol: LoadedModel) -> None:
        engine = start(smol)
        engine.add("queued", request(PROMPTS[0], max_tokens=TOKENS))
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes, steps=2)
        assert engine.waiting == 1
        assert engine.cancel("queued") and engine.cancel("queued")  # twice: one final event
        assert engine.cancel(1) and engine.cancel(1)
        drive(engine, outcomes)
        assert [e.finish_reason for e in outcomes["queued"].events] == ["cancelled"]
        assert [e.finish_reason for e in outcomes[1].events][-1] == "cancelled"
        assert sum(e.finish_reason is not None for e in outcomes[1].events) == 1
        assert_survivors_match(smol, engine, outcomes, [0, 2, 3])
        assert not engine.cancel(0)  # finished: nothing to cancel, nothing sent
        assert engine.step() == []

    def test_an_id_used_again_after_a_late_cancel_is_not_cancelled(
        self, smol: LoadedModel
    ) -> None:
        engine = start(smol, count=1)
        engine.cancel(0)
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes)
        outcome = run(engine, {0: request(PROMPTS[0], max_tokens=TOKENS)})[0]
        assert outcome.tokens == reference(smol, engine, PROMPTS[0], TOKENS)


class FailingLayer:
    """Makes one decoder layer raise, after the layers before it wrote their cache."""

    def __init__(self, model: Any, index: int = 10) -> None:
        self.layer = model.model.layers[index]
        self.original = self.layer.forward
        self.failures = 0
        self.when: Any = None

    def __enter__(self) -> FailingLayer:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.when is not None and self.when(hidden):
                self.failures += 1
                raise RuntimeError("injected fault")
            return self.original(*args, **kwargs)

        self.layer.forward = forward
        return self

    def __exit__(self, *exc: object) -> None:
        self.layer.forward = self.original


class TestFaults:
    def test_a_prefill_failing_midway_ends_only_the_newcomers(self, smol: LoadedModel) -> None:
        engine = start(smol, count=2)
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes, steps=3)
        with FailingLayer(smol.model) as fault:
            fault.when = lambda hidden: hidden.shape[1] > 1  # prompts, not decode steps
            engine.add("doomed", request(PROMPTS[2], max_tokens=TOKENS))
            events = step(engine, outcomes)
        assert fault.failures == 1
        reasons = {e.request_id: e.finish_reason for e in events}
        assert reasons["doomed"] == "error" and reasons.get(0) is None
        assert "injected fault" in next(e.error or "" for e in events if e.request_id == "doomed")
        drive(engine, outcomes)
        assert_survivors_match(smol, engine, outcomes, [0, 1])
        assert engine.ready

    def test_a_decode_failing_midway_ends_its_rows_and_the_engine_carries_on(
        self, smol: LoadedModel
    ) -> None:
        engine = start(smol, count=3)
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes, steps=4)
        with FailingLayer(smol.model) as fault:
            fault.when = lambda hidden: hidden.shape[1] == 1
            events = step(engine, outcomes)
        assert {e.request_id: e.finish_reason for e in events} == {0: "error", 1: "error",
                                                                    2: "error"}
        assert engine.ready and not engine.has_work()
        fresh = run(engine, {i: request(PROMPTS[i], max_tokens=TOKENS) for i in (1, 3)})
        assert_survivors_match(smol, engine, fresh, [1, 3])

    def test_one_sequence_failing_after_its_token_ends_only_itself(
        self, smol: LoadedModel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        engine = start(smol, count=3)
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes, steps=2)
        doomed = next(seq for seq in engine._running if seq.request_id == 1)

        def broken(token_id: int) -> str:
            raise UnicodeError("broken detokenizer")

        monkeypatch.setattr(doomed.stream, "push", broken)
        drive(engine, outcomes)
        assert outcomes[1].last.finish_reason == "error"
        assert "broken detokenizer" in (outcomes[1].last.error or "")
        assert_survivors_match(smol, engine, outcomes, [0, 2])

    def test_a_fault_that_persists_fails_the_engine_for_good(self, smol: LoadedModel) -> None:
        engine = start(smol, count=0)
        outcomes: dict[Any, Outcome] = {}
        with FailingLayer(smol.model) as fault:
            fault.when = lambda hidden: True
            for attempt in range(MAX_FAILED_STEPS):
                assert engine.ready, attempt
                engine.add(f"retry{attempt}", request(PROMPTS[3], max_tokens=TOKENS))
                drive(engine, outcomes)
        assert not engine.ready and "3 model passes failed in a row" in (engine.failure or "")
        assert all(o.last.finish_reason == "error" for o in outcomes.values())
        with pytest.raises(EngineFailedError, match="injected fault"):
            engine.add("after", request(PROMPTS[0]))
        assert not engine.has_work()

    def test_a_sticky_device_error_fails_the_engine_at_once(
        self, smol: LoadedModel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        engine = start(smol, count=2)
        engine.add("queued", request(PROMPTS[0]))
        engine.add("queued2", request(PROMPTS[0]))
        engine.add("queued3", request(PROMPTS[0]))
        outcomes: dict[Any, Outcome] = {}
        drive(engine, outcomes, steps=2)
        monkeypatch.setattr(engine, "_device_works", lambda: False)
        with FailingLayer(smol.model) as fault:
            fault.when = lambda hidden: True
            drive(engine, outcomes)
        assert not engine.ready and "the device failed" in (engine.failure or "")
        assert {o.last.finish_reason for o in outcomes.values()} == {"error"}
        assert engine.running == engine.waiting == 0


def test_the_cache_is_an_inference_tensor_everywhere(smol: LoadedModel) -> None:
    """Row moves happen inside inference mode: cancelling row 0 must not raise."""
    engine = start(smol, count=2)
    engine.step()
    engine.cancel(0)
    with torch.inference_mode(False):
        events = engine.step()
    assert [e.finish_reason for e in events if e.request_id == 0] == ["cancelled"]
