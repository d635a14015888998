"""Driving ``LLMEngine`` step by step in tests, recording what each request was told."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from tritonop_backend.llm.engine import GenerationEvent, LLMEngine
from tritonop_backend.llm.params import GenerationRequest


@dataclass
class Outcome:
    """Everything the events told about one request."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    events: list[GenerationEvent] = field(default_factory=list)
    finished_at: int | None = None

    @property
    def last(self) -> GenerationEvent:
        return self.events[-1]


def record(outcomes: dict[Hashable, Outcome], events: list[GenerationEvent], step: int) -> None:
    """Add ``events`` to ``outcomes``; a request that finishes is marked at ``step``."""
    for event in events:
        outcome = outcomes.setdefault(event.request_id, Outcome())
        assert outcome.finished_at is None, "no event after the last one"
        outcome.text += event.text
        outcome.tokens += event.token_ids
        outcome.events.append(event)
        if event.finish_reason is not None:
            outcome.finished_at = step


def run(
    engine: LLMEngine,
    requests: dict[Hashable, GenerationRequest],
    joining: dict[int, dict[Hashable, GenerationRequest]] | None = None,
    max_steps: int = 500,
) -> dict[Hashable, Outcome]:
    """Drive the engine until idle; ``joining[n]`` is added after step ``n``."""
    outcomes: dict[Hashable, Outcome] = {}
    pending = dict(joining or {})
    for request_id, item in requests.items():
        engine.add(request_id, item)
    for step in range(1, max_steps + 1):
        record(outcomes, engine.step(), step)
        for request_id, item in pending.pop(step, {}).items():
            engine.add(request_id, item)
        if not engine.has_work() and not pending:
            return outcomes
    raise AssertionError("engine did not finish")


def decoded(engine: LLMEngine, tokens: list[int]) -> str:
    return str(engine.tokenizer.decode(tokens, skip_special_tokens=True))
