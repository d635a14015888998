"""Which dtype the LLM loads with on a CPU, and how close bfloat16 stays to ``generate``.

"auto" is bfloat16 where the CPU has native bfloat16, float32 elsewhere. Greedy output
equals ``generate`` in the same dtype exactly for float32 (``test_llm_engine``) and for a
bfloat16 request alone; in a mixed bfloat16 batch it is held to vLLM's closeness check
(``tests.support.llm.greedy_mismatch``), which must also catch a broken engine.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.llm import capture_logits, greedy_mismatch, run
from tritonop_backend.llm.loading import LoadedModel, cpu_has_native_bf16, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_only_where_the_cpu_has_it(native: bool) -> None:
    """Half the weight bytes per step where products are native; float32 stays exact."""
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", CPU, native_bf16=native) == (expected, None)
    assert resolve_dtype("float32", CPU, native_bf16=native) == (torch.float32, None)


def test_bfloat16_is_honoured_only_where_the_cpu_has_it() -> None:
    assert resolve_dtype("bfloat16", CPU, native_bf16=True) == (torch.bfloat16, None)
    dtype, note = resolve_dtype("bfloat16", CPU, native_bf16=False)
    assert dtype == torch.float32
    assert note is not None and "bfloat16" in note and "float32" in note


def test_float16_on_a_cpu_falls_back_with_a_note() -> None:
    dtype, note = resolve_dtype("float16", CPU, native_bf16=True)
    assert dtype == torch.float32 and note is not None and "float16" in note


def test_an_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16; got 'int4'"):
        resolve_dtype("int4", CPU)


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse avx2 avx512f avx512_bf16", True),
    ("fpu sse avx2 amx_tile amx_bf16", True),
    ("fpu sse avx2 avx512f avx512_vnni", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_alone_equals_generate_in_bfloat16(
    smol_bf16: LoadedModel, smol_bf16_stock: LoadedModel
) -> None:
    """The opt-in dtype is checked like float32, against generate in that same dtype.

    The engine runs the model as served (linear layers packed for oneDNN); generate runs a
    second copy loaded with stock ``nn.Linear`` layers, the independent reference. Alone,
    a request sees the same rounding as generate's single row; in a mixed batch it may not
    (see ``resolve_dtype`` and the closeness tests below).
    """
    from tritonop_backend.llm.engine import LLMEngine
    from tritonop_backend.llm.params import GenerationPolicy, parse_request

    assert smol_bf16.packed_layers > 0
    policy = GenerationPolicy(default_max_tokens=24, max_tokens_limit=64,
                              default_temperature=0.0, max_context_tokens=256)
    engine = LLMEngine(smol_bf16.model, smol_bf16.tokenizer, policy, max_sequences=2)
    for i, prompt in enumerate(["What is the capital of France?", "Name three colors."]):
        engine.add(i, parse_request({"text_input": prompt}, policy))
        tokens: list[int] = []
        while engine.has_work():
            for event in engine.step():
                tokens += event.token_ids
        ids = torch.tensor([engine.encode_prompt(prompt)])
        expected = smol_bf16_stock.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
            pad_token_id=smol_bf16.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        assert tokens == expected


NATIVE_BF16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bfloat16")
MIXED_PROMPTS = ["What is the capital of France?", "Write a haiku about batching.",
                 "List three colours of the rainbow.", "Why is the sky blue? Explain briefly.",
                 "Name three colors.", "Write one sentence about the sea.", "Count to ten."]
MIXED_TOKENS = 40

References = dict[str, tuple[list[int], list[torch.Tensor]]]
"""Per prompt: generate's greedy tokens and the logits it chose each from."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bf16_references(
    smol_bf16: LoadedModel, smol_bf16_stock: LoadedModel, one_torch_thread: None
) -> References:
    """Greedy tokens and the logits they came from, one per prompt, from generate in
    bfloat16 on a copy loaded with stock ``nn.Linear`` layers (the independent reference)."""
    from tritonop_backend.llm.engine import LLMEngine

    engine = LLMEngine(smol_bf16.model, smol_bf16.tokenizer, _mixed_policy(), max_sequences=1)
    references = {}
    for prompt in MIXED_PROMPTS:
        ids = torch.tensor([engine.encode_prompt(prompt)])
        output = smol_bf16_stock.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MIXED_TOKENS,
            do_sample=False, pad_token_id=smol_bf16.tokenizer.eos_token_id,
            output_logits=True, return_dict_in_generate=True)
        tokens = output.sequences[0, ids.shape[1]:].tolist()
        references[prompt] = (tokens, [row[0].float() for row in output.logits])
    return references


def _mixed_policy() -> Any:
    from tritonop_backend.llm.params import GenerationPolicy

    return GenerationPolicy(default_max_tokens=MIXED_TOKENS, max_tokens_limit=256,
                            default_temperature=0.0, max_context_tokens=512)


def _mixed_batch_mismatches(
    smol_bf16: LoadedModel,
    references: References,
    shift_positions: int = 0,
) -> dict[Hashable, str | None]:
    """Seven greedy prompts and a sampled one in one bfloat16 batch, each checked."""
    from tritonop_backend.llm.engine import LLMEngine
    from tritonop_backend.llm.params import parse_request

    policy = _mixed_policy()
    engine = LLMEngine(smol_bf16.model, smol_bf16.tokenizer, policy, max_sequences=8)
    if shift_positions:  # a deliberately broken engine: decode steps at wrong positions
        forward = engine._forward

        def shifted(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> Any:
            return forward(ids, mask, positions + (shift_positions if ids.shape[1] == 1 else 0))

        engine._forward = shifted  # type: ignore[method-assign]
        if engine._lean is not None:  # the decode pass it serves with (lean.py)
            lean = engine._lean.forward

            def lean_shifted(last: torch.Tensor, lengths: torch.Tensor, *rest: int) -> Any:
                return lean(last, lengths + shift_positions, *rest)

            engine._lean.forward = lean_shifted  # type: ignore[method-assign]
    logits = capture_logits(engine)
    requests = {i: parse_request({"text_input": p}, policy) for i, p in enumerate(MIXED_PROMPTS)}
    requests["sampled"] = parse_request({"text_input": "Tell me a long story about a dragon.",
                                         "temperature": 0.9, "seed": 7}, policy)
    outcomes = run(engine, requests)
    return {
        i: greedy_mismatch(outcomes[i].tokens, logits[i], *references[prompt], torch.bfloat16)
        for i, prompt in enumerate(MIXED_PROMPTS)
    }


@NATIVE_BF16
def test_bfloat16_in_a_mixed_batch_stays_close_to_generate(
    smol_bf16: LoadedModel, bf16_references: References
) -> None:
    """Equal up to a first difference, which must be a rounding tie (``greedy_mismatch``)."""
    mismatches = _mixed_batch_mismatches(smol_bf16, bf16_references)
    assert all(reason is None for reason in mismatches.values()), mismatches


@NATIVE_BF16
def test_the_closeness_check_fails_an_engine_with_wrong_positions(
    smol_bf16: LoadedModel, bf16_references: References
) -> None:
    """Decode positions one too far (RoPE is relative, so the damage is subtle) fail it.

    Measured: all 7 prompts fail, on logits of a shared prefix 2.1-9.6 apart (the bound is
    2.0 there; healthy batches stay within ~1); by tokens alone (top 5 and the tie) only 2.
    """
    mismatches = _mixed_batch_mismatches(smol_bf16, bf16_references, shift_positions=1)
    failed = [reason for reason in mismatches.values() if reason is not None]
    assert len(failed) >= 4, mismatches
