"""The CPU bfloat16 fast path: linear layers packed for oneDNN at load, and decode
attention with each group's query heads packed together; the same numbers as stock.

The engine's own output against ``generate`` on a stock copy of the model is checked in
``test_llm_dtype.py`` (alone: equal; in a mixed batch: vLLM's closeness check).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from tritonop_backend.llm.attention import NAME, decode_attention, use_decode_attention
from tritonop_backend.llm.loading import cpu_has_native_bf16
from tritonop_backend.llm.packing import PackedLinear, can_pack, pack_linear_layers

ONEDNN = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
CPU = torch.device("cpu")


def _linear(inputs: int, outputs: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs, bias=bias).to(torch.bfloat16).eval()


@ONEDNN
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (2, 5, 96), (42, 96)])
def test_a_packed_layer_gives_f_linear_bit_for_bit(bias: bool, shape: tuple[int, ...]) -> None:
    linear = _linear(96, 160, bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        expected = linear(x)
        got = PackedLinear(linear)(x)
    assert got.shape == expected.shape == (*shape[:-1], 160)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_packing_applies_to_bfloat16_on_a_cpu_only() -> None:
    assert can_pack(torch.bfloat16, CPU) is torch.backends.mkldnn.is_available()
    assert not can_pack(torch.float32, CPU)
    assert not can_pack(torch.bfloat16, torch.device("cuda"))


@ONEDNN
def test_every_linear_layer_is_replaced_and_the_model_gives_the_same_output() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(64, 16))
    ).to(torch.bfloat16).eval()
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.inference_mode():
        expected = model(x)
    assert pack_linear_layers(model) == 2
    assert not any(type(module) is torch.nn.Linear for module in model.modules())
    assert "packed" in repr(model)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


@ONEDNN
def test_a_build_whose_packed_product_differs_keeps_the_model_as_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = torch.nn.Sequential(_linear(16, 16, True)).eval()
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: torch.zeros(3, 16))
    with caplog.at_level(logging.WARNING, logger="tritonop_backend.llm.packing"):
        assert pack_linear_layers(model) == 0
    assert type(model[0]) is torch.nn.Linear
    assert "differs from F.linear" in caplog.text


@ONEDNN
def test_a_build_without_the_packed_op_keeps_the_model_as_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(*args: object) -> None:
        raise RuntimeError("mkldnn::_reorder_linear_weight is not available")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    model = torch.nn.Sequential(_linear(16, 16, False)).eval()
    with caplog.at_level(logging.WARNING, logger="tritonop_backend.llm.packing"):
        assert pack_linear_layers(model) == 0
    assert type(model[0]) is torch.nn.Linear
    assert "not available" in caplog.text


class _Attention(torch.nn.Module):
    """What ``transformers`` hands an attention function: the module's group count."""

    num_key_value_groups = 3
    is_causal = True


def _qkv(rows: int, length: int, columns: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(rows * 1000 + columns)
    query = torch.randn(rows, 9, length, 64).to(torch.bfloat16)
    key = torch.randn(rows, 3, columns, 64).to(torch.bfloat16)
    value = torch.randn(rows, 3, columns, 64).to(torch.bfloat16)
    return query, key, value


@pytest.mark.parametrize("rows, columns", [(1, 37), (1, 300), (8, 100)])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_decode_attention_gives_sdpa_bit_for_bit(
    rows: int, columns: int, masked: bool
) -> None:
    """With no mask ``transformers`` takes the slow ``enable_gqa`` kernel; we fold the groups."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = _qkv(rows, 1, columns)
    mask = None
    if masked:  # left padding: row r skips its first r columns
        mask = torch.arange(columns)[None, :] >= torch.arange(rows)[:, None]
        mask = mask[:, None, None, :]
    module = _Attention()
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    got, weights = decode_attention(module, query, key, value, mask, scaling=0.125)
    assert weights is None
    assert got.shape == expected.shape == (rows, 1, 9, 64)
    assert torch.equal(got, expected)


def test_prefill_attention_is_transformers_own() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = _qkv(2, 12, 12)
    module = _Attention()
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.125)
    got, _ = decode_attention(module, query, key, value, None, scaling=0.125)
    assert torch.equal(got, expected)


def test_only_a_model_on_sdpa_attention_is_switched(smol_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(str(smol_dir), attn_implementation="eager")
    assert use_decode_attention(eager) is False
    assert eager.config._attn_implementation == "eager"


def test_a_transformers_that_refuses_the_switch_keeps_its_own_attention(
    smol_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smol_dir))
    assert model.config._attn_implementation == "sdpa"

    def refuse(self: object, implementation: str) -> None:
        raise ValueError(f"{implementation!r} is not a known attention implementation")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    with caplog.at_level(logging.WARNING, logger="tritonop_backend.llm.attention"):
        assert use_decode_attention(model) is False
    assert model.config._attn_implementation == "sdpa"
    assert "not a known attention implementation" in caplog.text


def test_float32_loads_stock(smol: object) -> None:
    """float32 keeps MKL's product and SDPA's own kernels, on which its exact equality with
    generate rests (packing would change the last bits)."""
    assert smol.dtype == torch.float32  # type: ignore[attr-defined]
    assert smol.packed_layers == 0  # type: ignore[attr-defined]
    assert smol.model.config._attn_implementation == "sdpa"  # type: ignore[attr-defined]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
@ONEDNN
def test_smollm2_in_bfloat16_loads_with_every_linear_layer_packed(
    smol_bf16: Any, smol_bf16_stock: Any
) -> None:
    """Seven projections in each of 30 layers, and the output layer (tied to the embedding,
    which keeps its own unpacked weight)."""
    loaded, stock = smol_bf16, smol_bf16_stock
    assert loaded.packed_layers == 30 * 7 + 1
    assert isinstance(loaded.model.lm_head, PackedLinear)
    assert loaded.model.config._attn_implementation == NAME
    embedding = loaded.model.get_input_embeddings().weight
    assert embedding.dtype == torch.bfloat16 and embedding.layout == torch.strided
    assert stock.packed_layers == 0 and stock.model.config._attn_implementation == "sdpa"
    ids = torch.tensor([stock.tokenizer("The capital of France is")["input_ids"]])
    with torch.inference_mode():
        got = loaded.model(input_ids=ids).logits
        expected = stock.model(input_ids=ids).logits
    assert torch.equal(got, expected)
