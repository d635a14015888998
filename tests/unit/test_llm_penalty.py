"""The repetition penalty inside the engine against ``transformers``' ``generate``.

Hugging Face's ``RepetitionPenaltyLogitsProcessor`` looks at every token of the sequence
(prompt and generated); the engine looks at the last ``repeat_last_n`` of them (llama.cpp's
``repeat_last_n``). With a window at least as long as the sequence, the reference is plain
``generate(repetition_penalty=...)``. With a shorter window, the reference is the same
Hugging Face processor applied to the last ``repeat_last_n`` ids of ``generate``'s input
(prompt plus tokens so far, the token just sampled included), which is what the engine's
window covers: the ids in its cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from tests.support.llm import run
from tests.unit.test_llm_engine import POLICY, reference, request
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel

PROMPTS = ["List ten fruits, one per line.", "Count from 1 to 30, separated by commas.",
           "Repeat the word banana many times."]
TOKENS = 32
SETTINGS = [(1.3, 512), (1.8, 8)]  # (penalty, window): whole sequence; the last 8 tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LastTokensPenalty:
    """Hugging Face's processor, shown only the last ``window`` ids."""

    def __init__(self, penalty: float, window: int) -> None:
        self.inner = RepetitionPenaltyLogitsProcessor(penalty)
        self.window = window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids[:, -self.window :], scores)


_generated: dict[tuple[str, float, int], list[int]] = {}


def generate(smol: LoadedModel, engine: LLMEngine, prompt: str, penalty: float,
             window: int) -> list[int]:
    """``generate``'s greedy tokens with the penalty; computed once per case in a session
    (the batched tests ask again for cases the lone test asked for)."""
    key = (prompt, penalty, window)
    if key not in _generated:
        _generated[key] = _generate(smol, engine, prompt, penalty, window)
    return _generated[key]


def _generate(smol: LoadedModel, engine: LLMEngine, prompt: str, penalty: float,
              window: int) -> list[int]:
    ids = torch.tensor([engine.encode_prompt(prompt)])
    options: dict[str, Any] = {}
    if window >= ids.shape[1] + TOKENS:
        options["repetition_penalty"] = penalty
    else:
        options["logits_processor"] = LogitsProcessorList([LastTokensPenalty(penalty, window)])
    with torch.inference_mode():
        output = smol.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=TOKENS,
                                     pad_token_id=smol.tokenizer.eos_token_id, **options)
    return list(output[0, ids.shape[1] :].tolist())


def penalised(prompt: str, penalty: float, window: int) -> Any:
    return request(prompt, max_tokens=TOKENS, temperature=0, repetition_penalty=penalty,
                   repeat_last_n=window)


@pytest.mark.parametrize(("penalty", "window"), SETTINGS, ids=["whole", "last-8"])
def test_alone_equals_generate(smol: LoadedModel, penalty: float, window: int) -> None:
    engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=4)
    for prompt in PROMPTS:
        expected = generate(smol, engine, prompt, penalty, window)
        assert expected != reference(smol, engine, prompt, TOKENS), "the penalty must matter"
        got = run(engine, {"a": penalised(prompt, penalty, window)})["a"].tokens
        assert got == expected, prompt


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
def test_batched_with_different_windows_and_an_unpenalised_row(
    smol: LoadedModel, static_decode: bool
) -> None:
    engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=4,
                       static_decode=static_decode)
    cases = {(i, s): (prompt, *setting) for i, prompt in enumerate(PROMPTS[:2])
             for s, setting in enumerate(SETTINGS)}
    requests = {key: penalised(*case) for key, case in cases.items()}
    plain = request(PROMPTS[2], max_tokens=TOKENS, temperature=0)
    outcomes = run(engine, requests, joining={3: {"plain": plain}})
    for key, (prompt, penalty, window) in cases.items():
        assert outcomes[key].tokens == generate(smol, engine, prompt, penalty, window), key
    assert outcomes["plain"].tokens == reference(smol, engine, PROMPTS[2], TOKENS)
