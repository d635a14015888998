"""The lean decode step (``lean.py``) against ``transformers``' forward pass in the engine.

Both run inside the same engine on the same packed bfloat16 model, so the only difference
is the decode pass itself: the logits of every step must be the same bits, in a batch
that mixes prompt lengths (left padding), a request that joins later, and, for Mistral,
prompts longer than its 8-token sliding window. Greedy output against ``generate`` on a
stock copy is ``test_llm_architectures.py``'s (bfloat16 as served).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.decoders import DECODERS
from tests.support.llm import capture_logits, run
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.lean import ARCHITECTURES, LeanDecoder
from tritonop_backend.llm.loading import LoadedModel, cpu_has_native_bf16, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not cpu_has_native_bf16() or not torch.backends.mkldnn.is_available(),
                       reason="packed bfloat16 layers need a CPU with native bfloat16"),
]

POLICY = GenerationPolicy(default_max_tokens=12, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=256)
LEAN = ["mistral", "llama", "qwen2"]
PROMPTS = {
    "long": "Explain why the sky is blue, step by step, with examples from daily life.",
    "short": "Hi",
    "middle": "What is the capital of France?",
}


def request(prompt: str, **values: object) -> GenerationRequest:
    return parse_request({"text_input": prompt, **values}, POLICY)


@pytest.fixture(scope="module")
def served(tiny_decoders: dict[str, Path]) -> dict[str, LoadedModel]:
    """Each Llama-layout decoder as ``dtype: bfloat16`` serves it on this CPU: packed."""
    return {name: load_causal_lm(tiny_decoders[name], "bfloat16", "cpu") for name in LEAN}


def test_the_lean_step_covers_the_llama_layout_decoders_of_the_table() -> None:
    covered = {DECODERS[name].config[0].removesuffix("Config") + "ForCausalLM" for name in LEAN}
    assert covered == ARCHITECTURES


@pytest.mark.parametrize("name", LEAN)
def test_every_step_gives_transformers_logits_bit_for_bit(
    served: dict[str, LoadedModel], name: str
) -> None:
    loaded = served[name]
    lean = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    stock = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    assert lean._lean is not None
    stock._lean = None
    requests = {key: request(prompt) for key, prompt in PROMPTS.items()}
    late = {3: {"late": request("Write a short poem about the sea.", max_tokens=6)}}
    seen, expected = capture_logits(lean), capture_logits(stock)
    got = run(lean, dict(requests), {step: dict(r) for step, r in late.items()})
    want = run(stock, dict(requests), {step: dict(r) for step, r in late.items()})
    assert {key: outcome.tokens for key, outcome in got.items()} == {
        key: outcome.tokens for key, outcome in want.items()}
    assert set(seen) == set(expected) == {*PROMPTS, "late"}
    for key in seen:
        assert len(seen[key]) == len(expected[key]) > 1
        for step, (a, b) in enumerate(zip(seen[key], expected[key], strict=True)):
            assert torch.equal(a, b), f"{name} {key} step {step}"


def test_mistral_prompts_pass_its_sliding_window(served: dict[str, LoadedModel]) -> None:
    """The bit-for-bit test above is only a window test if rows outgrow the window."""
    loaded = served["mistral"]
    window = loaded.model.config.sliding_window
    assert window == 8
    assert len(loaded.tokenizer(PROMPTS["long"])["input_ids"]) > 2 * window


def test_sampled_output_is_the_same_with_the_same_seeds(served: dict[str, LoadedModel]) -> None:
    loaded = served["llama"]
    sampled = {key: request(prompt, temperature=0.8, top_p=0.9, seed=7 + i)
               for i, (key, prompt) in enumerate(PROMPTS.items())}
    lean = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    stock = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    stock._lean = None
    got, want = run(lean, dict(sampled)), run(stock, dict(sampled))
    assert {k: o.tokens for k, o in got.items()} == {k: o.tokens for k, o in want.items()}


def test_other_models_and_float32_keep_transformers_pass(tiny_decoders: dict[str, Path]) -> None:
    """Unpacked (float32, where the engine promises generate's bits) and other layouts."""
    float32 = load_causal_lm(tiny_decoders["llama"], "float32", "cpu")
    engine = LLMEngine(float32.model, float32.tokenizer, POLICY, max_sequences=2)
    assert engine._lean is None
    for name in ("qwen3", "gemma2", "phi3"):
        loaded = load_causal_lm(tiny_decoders[name], "bfloat16", "cpu")
        assert loaded.packed_layers > 0
        assert LeanDecoder.build(loaded.model, engine._kv) is None, name


def test_a_fixed_shape_engine_has_no_lean_step(served: dict[str, LoadedModel]) -> None:
    loaded = served["llama"]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2,
                       static_decode=True)
    assert engine._static is not None and engine._lean is None


def test_a_failing_lean_step_falls_back_to_transformers_for_good(
    served: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded = served["llama"]
    lean = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2)
    stock = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2)
    stock._lean = None

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("kernel refused")

    assert lean._lean is not None
    monkeypatch.setattr(lean._lean, "forward", broken)
    with caplog.at_level("ERROR", logger="tritonop_backend.llm.engine"):
        got = run(lean, {"a": request(PROMPTS["long"])})["a"]
    assert lean._lean is None
    assert "lean decode step failed" in caplog.text
    assert got.tokens == run(stock, {"a": request(PROMPTS["long"])})["a"].tokens
