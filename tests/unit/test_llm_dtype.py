"""Which dtype the LLM loads with on a CPU: float32 unless bfloat16 is asked and native."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tritonop_backend.llm.loading import cpu_has_native_bf16, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_and_float32_stay_float32_on_a_cpu(native: bool) -> None:
    """Greedy output must equal generate whatever shares the batch: only float32 does."""
    assert resolve_dtype("auto", CPU, native_bf16=native) == (torch.float32, None)
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
def test_bfloat16_alone_equals_generate_in_bfloat16(smol_dir: Path) -> None:
    """The opt-in dtype is checked like float32, against generate in that same dtype.

    Alone, a request sees the same rounding as generate's single row; in a mixed batch it
    may not (see ``resolve_dtype``), which is why bfloat16 is not what "auto" picks.
    """
    from tritonop_backend.llm.engine import LLMEngine
    from tritonop_backend.llm.loading import load_causal_lm
    from tritonop_backend.llm.params import GenerationPolicy, parse_request

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_causal_lm(smol_dir, "bfloat16", "cpu")
        assert loaded.dtype == torch.bfloat16 and loaded.note is None
        policy = GenerationPolicy(default_max_tokens=24, max_tokens_limit=64,
                                  default_temperature=0.0, max_context_tokens=256)
        engine = LLMEngine(loaded.model, loaded.tokenizer, policy, max_sequences=2)
        for i, prompt in enumerate(["What is the capital of France?", "Name three colors."]):
            engine.add(i, parse_request({"text_input": prompt}, policy))
            tokens: list[int] = []
            while engine.has_work():
                for event in engine.step():
                    tokens += event.token_ids
            ids = torch.tensor([engine.encode_prompt(prompt)])
            expected = loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                pad_token_id=loaded.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
            assert tokens == expected
    finally:
        torch.set_num_threads(before)
