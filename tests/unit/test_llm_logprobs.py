"""Log probabilities from the engine, against the model's own logits run by ``transformers``.

Each entry must be ``log_softmax`` of the raw logits (float32) that the model gives for the
same prefix in one plain forward pass, for the chosen token and the top ones, whatever the
row's sampling; rows that did not ask share the batch and get exactly what they get alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.llm import run
from tritonop_backend.errors import RequestError
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=12, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=256)
TOLERANCE = 1e-4
"""Absolute, on log probabilities in float32: the engine's batched, cached, left-padded
passes and one plain forward pass differ by rounding only."""


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request: pytest.FixtureRequest, tiny_decoders: dict[str, Path]) -> LoadedModel:
    return load_causal_lm(tiny_decoders[request.param], "float32", "cpu")


def ask(prompt: str, **values: Any) -> GenerationRequest:
    return parse_request({"text_input": prompt, **values}, POLICY)


def reference(model: LoadedModel, prefix: list[int]) -> torch.Tensor:
    """``log_softmax`` of the model's next-token logits after ``prefix``, in float32."""
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([prefix])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


REQUESTS = {
    "greedy": ask("Describe a package for playing music.", logprobs=5),
    "sampled": ask("What is the capital of France?", temperature=0.9, top_p=0.8, top_k=40,
                   seed=11, repetition_penalty=1.3, logprobs=20),
    "count only": ask("List three colours.", temperature=0.7, seed=5, logprobs=0),
    "quiet greedy": ask("Explain batching in one line."),
    "quiet sampled": ask("Name a text editor.", temperature=1.0, seed=3),
}


def test_logprobs_are_log_softmax_of_the_models_own_logits(model: LoadedModel) -> None:
    engine = LLMEngine(model.model, model.tokenizer, POLICY, max_sequences=8, max_waiting=8)
    outcomes = run(engine, REQUESTS)
    eos = set(engine._eos)
    checked = 0
    for name, item in REQUESTS.items():
        outcome = outcomes[name]
        entries = [entry for event in outcome.events for entry in event.logprobs]
        if item.logprobs is None:
            assert entries == []
            continue
        kept = [token for token in outcome.tokens if token not in eos]
        assert [entry.token for entry in entries] == kept
        prefix = engine.encode_request(item)
        for token, entry in zip(outcome.tokens, entries, strict=False):
            expected = reference(model, prefix)
            assert abs(entry.logprob - float(expected[token])) < TOLERANCE
            values, ids = expected.topk(item.logprobs)
            assert [top for top, _ in entry.top] == ids.tolist()
            assert [value for _, value in entry.top] == pytest.approx(values.tolist(),
                                                                     abs=TOLERANCE)
            prefix.append(token)
            checked += 1
    assert checked >= 20


def test_rows_that_do_not_ask_are_unchanged(model: LoadedModel) -> None:
    engine = LLMEngine(model.model, model.tokenizer, POLICY, max_sequences=8, max_waiting=8)
    together = run(engine, REQUESTS)
    quiet = {name: item for name, item in REQUESTS.items() if item.logprobs is None}
    alone = run(engine, quiet)
    for name in quiet:
        assert together[name].tokens == alone[name].tokens
        assert together[name].text == alone[name].text
    # Asking changes what is reported, never what is generated.
    silent = {name: ask(item.prompt, **_values(item)) for name, item in REQUESTS.items()}
    for name, outcome in run(engine, silent).items():
        assert outcome.tokens == together[name].tokens


def _values(item: GenerationRequest) -> dict[str, Any]:
    params = item.params
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "repetition_penalty": params.repetition_penalty,
            **({"seed": params.seed} if params.seed is not None else {})}


def test_token_bytes_spell_the_text(tiny_decoders: dict[str, Path]) -> None:
    model = load_causal_lm(tiny_decoders["llama"], "float32", "cpu")  # byte-level BPE
    engine = LLMEngine(model.model, model.tokenizer, POLICY, max_sequences=2, max_waiting=2)
    item = ask("Describe a package for playing music.", logprobs=1, temperature=1.0, seed=2)
    outcome = run(engine, {"one": item})["one"]
    entries = [entry for event in outcome.events for entry in event.logprobs]
    spelled = b"".join(engine.token_bytes(entry.token) for entry in entries)
    assert entries
    # A random model writes broken UTF-8 too: the text shows it as U+FFFD, the bytes are exact.
    assert spelled.decode("utf-8", "replace") == outcome.text


@pytest.mark.parametrize("value", [21, -2, 2.5, "three", True])
def test_bad_logprobs_are_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(RequestError) as caught:
        ask("hi", logprobs=value)
    assert caught.value.field == "logprobs"


def test_minus_one_means_none() -> None:
    assert ask("hi", logprobs=-1).logprobs is None
    assert ask("hi").logprobs is None
