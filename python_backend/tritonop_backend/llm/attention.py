"""Decode attention on a CPU with a group's query heads packed into one kernel call.

Models with grouped-query attention (Llama, Mistral, SmolLM2: 9 query heads over 3
key/value heads) reach ``transformers``' SDPA attention in one of two ways during a
decode step. With a padding mask it folds each group's query heads into the query
length (``pack_gqa``); with no mask (one row, or rows of equal length) it asks the
kernel for ``enable_gqa`` instead, and PyTorch's CPU flash kernel runs that 4-7x
slower: measured in bfloat16 on one thread, 72 against 16 us a layer for one row over
100 columns, 280 against 40 us over 400, 552 against 104 us for 8 rows. This function
always folds the groups for a one-token query and leaves everything else (prefill,
per-head masks) to ``transformers``' own SDPA function. In bfloat16 both ways give the
same bits (the same kernel over the same numbers), which is why it is used only there
(with the packed linear layers, ``packing.py``): in float32 they differ in the last bit,
and float32 keeps exact equality with ``generate``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

LOGGER = logging.getLogger(__name__)

NAME = "tritonop_sdpa"
"""The attention implementation's name in ``transformers``' registries."""


def decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers``' attention-function signature; ``(batch, 1, heads, dim)`` out."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    extras = any(kwargs.get(name) is not None for name in ("softcap", "position_bias"))
    if length != 1 or groups == 1 or dropout != 0.0 or not shared_mask or extras:
        # Imported here, off the decode path: transformers is imported only once a model loads.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.reshape(batch, heads // groups, groups, dim)
    output = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )
    return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_decode_attention(model: Any) -> bool:
    """Switch ``model`` to :func:`decode_attention` (masks built as for SDPA).

    Returns:
        Whether the model took it: only models on ``transformers``' SDPA attention do,
        and only those whose attention goes through the registry (others keep theirs,
        as does a ``transformers`` release whose registries this does not know).
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if not model._can_set_attn_implementation():
            return False
        AttentionInterface.register(NAME, decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        model.set_attn_implementation(NAME)
    except (ImportError, AttributeError, ValueError) as error:
        LOGGER.warning("decode attention left as loaded: %s: %s", type(error).__name__, error)
        return False
    return bool(model.config._attn_implementation == NAME)
