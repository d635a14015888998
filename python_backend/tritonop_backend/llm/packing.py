"""bfloat16 linear layers whose weights are reordered for oneDNN once, at load (CPU).

On a CPU, ``torch.nn.functional.linear`` in bfloat16 hands the product to oneDNN, which
first reorders the weight into its blocked layout, on every call. Decoding a small model
is bound by reading the weights once per step, so that reorder nearly doubles a step's
matrix-product time. Reordering once at load and calling oneDNN's linear on the packed
weight (the same pair of operations ``torch.compile`` emits for a frozen CPU graph)
measured, with SmolLM2-135M on one thread of an AVX-512 BF16 CPU: all of a decode step's
matrix products 21.6 -> 12.8 ms at 1 row and 24.3 -> 16.0 ms at 8; engine steps 29 -> 20
ms and 43 -> 34 ms. The kernel after the reorder is the one ``F.linear`` runs, so the
outputs are bitwise the same: greedy output still equals ``generate`` on the unpacked model
(``tests/unit/test_llm_packing.py``).

float32 is left unpacked on purpose. Packing it is faster still (measured: 60 -> 25 ms of
matrix products a step at 8 rows), but float32 ``F.linear`` runs MKL's product, not
oneDNN's, and the packed one sums in another order: greedy output would no longer equal
``generate``'s bit for bit, and float32 is where the engine promises that (CPUs without
native bfloat16 run it by default).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

LOGGER = logging.getLogger(__name__)

LAYOUT_ROWS = 8
"""Rows oneDNN is told to expect when it picks the packed layout. Measured: a layout
picked for 8 rows runs 1, 8 and 42 rows as fast as one picked for each."""


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` for inference, with the weight held in oneDNN's packed layout.

    The packed weight is an opaque oneDNN tensor: it cannot be trained, moved to another
    device or saved; the model is for serving once packed.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        """Pack ``linear``'s weight (the caller drops ``linear`` and its unpacked weight)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), LAYOUT_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` over the last dimension, like ``nn.Linear``."""
        output: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, "none", [], ""
        )
        return output

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`pack_linear_layers` applies: bfloat16 on a CPU with oneDNN."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def pack_linear_layers(model: Any) -> int:
    """Replace every ``nn.Linear`` in ``model`` with a :class:`PackedLinear`, in place.

    A tied output layer (the embedding matrix doubling as ``lm_head``) gets its own packed
    copy; the embedding keeps the original. If this torch build cannot pack (no oneDNN
    linear, or a packed product that differs from ``F.linear`` on a probe), nothing is
    replaced and a warning says why: the model then runs as loaded.

    Returns:
        How many layers were packed.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    if not targets:
        return 0
    problem = _probe(targets[0][2])
    if problem is not None:
        LOGGER.warning("linear layers left unpacked: %s", problem)
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def _probe(linear: torch.nn.Linear) -> str | None:
    """Why packing is unusable in this torch build, or None when it gives F.linear's output."""
    try:
        with torch.inference_mode():
            x = torch.linspace(-1, 1, 3 * linear.in_features, dtype=linear.weight.dtype)
            x = x.reshape(3, linear.in_features)
            expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
            got = PackedLinear(linear)(x)
    except (RuntimeError, AttributeError) as error:  # op missing or refused by this build
        return f"{type(error).__name__}: {error}"
    if not torch.equal(expected, got):
        return "the packed product differs from F.linear's"
    return None
