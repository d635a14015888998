"""Driving ``LLMEngine`` step by step in tests, recording what each request was told."""

from __future__ import annotations

import math
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
import torch

from tritonop_backend.llm.engine import GenerationEvent, LLMEngine
from tritonop_backend.llm.params import GenerationRequest
from tritonop_backend.llm.sampling import RowParams


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


def capture_logits(engine: LLMEngine) -> dict[Hashable, list[torch.Tensor]]:
    """Record, per request, the logits each of its tokens was chosen from (float32 copies)."""
    logits: dict[Hashable, list[torch.Tensor]] = {}
    sample_and_emit = engine._sample_and_emit

    def recording(
        step_logits: torch.Tensor, rows: tuple[int, int], params: RowParams
    ) -> list[GenerationEvent]:
        for seq, row in zip(engine._running[rows[0] : rows[1]], step_logits, strict=True):
            logits.setdefault(seq.request_id, []).append(row.float().clone())
        return sample_and_emit(step_logits, rows, params)

    engine._sample_and_emit = recording  # type: ignore[method-assign]
    return logits


def ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at ``value`` (one unit in the last place)."""
    mantissa = torch.finfo(dtype).eps  # spacing at 1.0
    return float(mantissa * 2.0 ** math.floor(math.log2(max(abs(value), 1e-30))))


def greedy_mismatch(
    tokens: list[int],
    logits: list[torch.Tensor],
    expected: list[int],
    expected_logits: list[torch.Tensor],
    dtype: torch.dtype,
    top_k: int = 5,
    ulps: float = 4.0,
    drift_ulps: float = 16.0,
) -> str | None:
    """Why greedy ``tokens`` are not close to the reference ``expected``; None when they are.

    vLLM's ``check_logprobs_close``, with a bound on the tie: the two sequences must be equal
    up to their first difference; there, each side's token must be in the other side's
    ``top_k``, and the reference must rate its own token at most ``ulps`` units in the last
    place of ``dtype`` (at its largest logit) above the engine's. In bfloat16 a logit of 20
    is rounded to 0.125; the same prefix's logits move by up to ~1 between batch
    compositions (measured, SmolLM2-135M), so a flip between tokens within 4 ulps is a
    rounding tie, while wrong positions or a wrong cache row make larger gaps or
    tokens outside the top 5 (``test_llm_dtype`` shows it failing on such an engine).
    Nothing is compared after the first difference: the two continue from other prefixes.
    Up to it (and at it) both scored the same prefix, so every logit must also agree within
    ``drift_ulps`` at the scale of the largest logit (16; measured: healthy batches within
    ~1 logit, an engine decoding at positions one too far 2-10).

    Args:
        tokens: what the engine generated; ``logits`` the rows it chose them from.
        expected: what ``generate`` generated; ``expected_logits`` its ``output_logits``.
        dtype: the dtype both ran in.
    """
    first = next((i for i, (a, b) in enumerate(zip(tokens, expected, strict=False))
                  if a != b), None)
    same_prefix = min(len(tokens), len(expected)) if first is None else first + 1
    for i in range(same_prefix):
        drift = float((logits[i] - expected_logits[i]).abs().max())
        allowed = drift_ulps * ulp(float(expected_logits[i].abs().max()), dtype)
        if drift > allowed:
            return (f"token {i}: logits of the same prefix differ by {drift:.3f}; rounding "
                    f"explains at most {allowed:.3f} ({drift_ulps:g} ulps of {dtype})")
    if first is None:
        if len(tokens) != len(expected):  # one side stopped at another length limit
            return f"{len(tokens)} tokens against generate's {len(expected)}"
        return None
    ours, theirs = tokens[first], expected[first]
    mine, reference = logits[first], expected_logits[first]
    if ours not in reference.topk(top_k).indices.tolist():
        return f"token {first}: the engine's {ours} is not in generate's top {top_k}"
    if theirs not in mine.topk(top_k).indices.tolist():
        return f"token {first}: generate's {theirs} is not in the engine's top {top_k}"
    margin = float(reference[theirs] - reference[ours])
    bound = ulps * ulp(float(reference.max()), dtype)
    if margin > bound:
        return (f"token {first}: generate rates its {theirs} {margin:.3f} above the engine's "
                f"{ours}; a rounding tie is at most {bound:.3f} ({ulps:g} ulps of {dtype})")
    return None


def greedy_completions(base_url: str, model: str, prompts: list[str], max_tokens: int
                       ) -> list[dict[str, Any]]:
    """``/v1/completions`` answers to ``prompts`` sent together (temperature 0), each a 200.

    ``base_url`` ends in ``/v1``.
    """
    def complete(prompt: str) -> dict[str, Any]:
        response = requests.post(f"{base_url}/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert response.status_code == 200, response.text
        return dict(response.json())

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(complete, prompts))


class IdsEngine(LLMEngine):
    """The engine with prompts given as space-separated token ids, to place them exactly."""

    def encode_request(self, request: GenerationRequest) -> list[int]:
        return [int(token) for token in request.prompt.split()]


def generate_ids(model: Any, ids: list[int], max_tokens: int = 12) -> list[int]:
    """Greedy tokens from ``transformers``' ``generate``, the independent reference."""
    inputs = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                max_new_tokens=max_tokens, do_sample=False)
    return list(output[0, len(ids):].tolist())
