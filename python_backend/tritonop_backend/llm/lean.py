"""A decode step for Llama-layout models written against the engine's buffer (CPU, bfloat16).

A decode step of a small model on a CPU is the read of its weights plus the host's work
between the products. ``transformers``' forward pass spends host time on what a decode
step does not need: module hooks and output records, a cache object called per layer, a
4D mask built from the 2D one each step (and converted again by each attention call).
This step runs the same operations on the same tensors without them:

- the packed linear layers (``packing.py``) are called directly;
- rotary embeddings come from the model's own rotary module (so any scaling its config
  names applies) and are applied as ``apply_rotary_pos_emb`` does;
- the new keys and values go straight into the buffer's column, and attention reads the
  live window with each group's query heads folded into one kernel call, as
  ``attention.py`` does;
- one additive mask (padding, and a sliding window where the config has one) serves every
  layer of the step.

The norms, products, attention and residual sums are ``transformers``' own, in the same
order and dtype, so the logits are the same bits (``tests/unit/test_llm_lean.py``).
Measured on SmolLM2-135M, one thread of this project's Intel Xeon, the engine's decode
steps took 1.12-1.18x less time at 1, 8 and 16 rows (the two engines alternating step by
step in one process). It serves the Llama layout (Llama, Mistral, Qwen2, SmolLM2:
pre-norm, rotary, grouped-query attention, SiLU-gated MLP) where the linear layers are
packed (bfloat16 on a CPU); other models, float32 (where the engine promises
``generate``'s bits, which packing would change) and fixed-shape CUDA steps keep
``transformers``' pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tritonop_backend.llm.graphs import layer_windows
from tritonop_backend.llm.kv import KVBuffer
from tritonop_backend.llm.packing import PackedLinear

LOGGER = logging.getLogger(__name__)

ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
"""Models whose decoder layers are the Llama layout this step reproduces."""


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: in float32, the weight applied in the input's dtype."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` for one tensor: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


@dataclass
class _Layer:
    norm_in: torch.Tensor
    q: PackedLinear
    k: PackedLinear
    v: PackedLinear
    out: PackedLinear
    norm_post: torch.Tensor
    gate: PackedLinear
    up: PackedLinear
    down: PackedLinear


class LeanDecoder:
    """The decode pass of :class:`~tritonop_backend.llm.engine.LLMEngine` for Llama-layout
    models whose linear layers are packed; build it with :meth:`build`."""

    def __init__(self, model: Any, kv: KVBuffer) -> None:
        config = model.config
        inner = model.model
        self.kv = kv
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.lm_head: PackedLinear = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        (self.window,) = layer_windows(config).values()
        self.layers = [self._layer(layer) for layer in inner.layers]

    @staticmethod
    def build(model: Any, kv: KVBuffer) -> LeanDecoder | None:
        """A lean step for ``model``, or None where it keeps ``transformers``' pass (and why,
        in the log at debug level)."""
        reason = _unsupported(model, kv)
        if reason is not None:
            LOGGER.debug("decoding with transformers' forward pass: %s", reason)
            return None
        with torch.inference_mode():
            return LeanDecoder(model, kv)

    def _layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(layer.input_layernorm.weight, attn.q_proj, attn.k_proj, attn.v_proj,
                      attn.o_proj, layer.post_attention_layernorm.weight, mlp.gate_proj,
                      mlp.up_proj, mlp.down_proj)

    def forward(self, last: torch.Tensor, lengths: torch.Tensor, rows: int, read_from: int,
                end: int) -> torch.Tensor:
        """Next-token logits of rows ``0..rows`` after feeding each its ``last`` token.

        Args:
            last: ``[rows]`` the token each row feeds in.
            lengths: ``[rows]`` tokens each row holds before this step (its position).
            rows: the running rows (``0..rows`` of the buffer).
            read_from: the buffer's first live column.
            end: the column this step's keys and values go to.

        Returns:
            ``[rows, vocab]`` logits in the model's dtype.
        """
        kv = self.kv
        width = end - read_from + 1
        columns = torch.arange(width)
        first = width - 1 - lengths  # each row's oldest token, in window columns
        if self.window is not None:
            first = torch.clamp(first, min=width - self.window)
        seen = (columns[None, :] >= first[:, None])[:, None, None, :]
        # Additive, built once for every layer (a boolean mask is converted in each call).
        mask = torch.zeros(seen.shape, dtype=kv.shape.dtype).masked_fill_(~seen, float("-inf"))
        hidden = self.embed(last)  # [rows, hidden]
        cos, sin = self.rotary(hidden, lengths[None, :])  # [1, rows, head_dim]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # per row, shared by its heads
        q_size = self.heads * self.head_dim
        groups = self.heads // self.kv_heads
        for index, layer in enumerate(self.layers):
            x = _norm(hidden, layer.norm_in, self.eps)
            q, k, v = layer.q(x), layer.k(x), layer.v(x)
            q = _rotate(q.view(rows, self.heads, self.head_dim), cos, sin)
            k = _rotate(k.view(rows, self.kv_heads, self.head_dim), cos, sin)
            keys, values = kv.keys[index], kv.values[index]
            keys[:rows, :, end] = k
            values[:rows, :, end] = v.view(rows, self.kv_heads, self.head_dim)
            attended = torch.nn.functional.scaled_dot_product_attention(
                q.view(rows, self.kv_heads, groups, self.head_dim),
                keys[:rows, :, read_from : end + 1], values[:rows, :, read_from : end + 1],
                attn_mask=mask, scale=self.scaling)
            hidden = hidden + layer.out(attended.reshape(rows, q_size))
            x = _norm(hidden, layer.norm_post, self.eps)
            hidden = hidden + layer.down(torch.nn.functional.silu(layer.gate(x)) * layer.up(x))
        logits: torch.Tensor = self.lm_head(_norm(hidden, self.final_norm, self.eps))
        return logits


def _unsupported(model: Any, kv: KVBuffer) -> str | None:
    """Why :class:`LeanDecoder` cannot serve ``model``; None when it can."""
    config = model.config
    if type(model).__name__ not in ARCHITECTURES:
        return f"{type(model).__name__} is not a Llama-layout model"
    if kv.device.type != "cpu":
        return "not on a CPU"
    if len(layer_windows(config)) != 1:
        return "its layers mix kinds of attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"its MLP's activation is {config.hidden_act}, not SiLU"
    inner = model.model
    linears = [model.lm_head]
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                    mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not all(isinstance(linear, PackedLinear) for linear in linears):
        return "its linear layers are not packed (bfloat16 on a CPU only)"
    return None
