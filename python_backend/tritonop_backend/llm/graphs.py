"""Decode steps with fixed shapes, so that a GPU can replay them as CUDA graphs.

An eager decode step of a 7B model in ``transformers`` launches hundreds of small kernels
from Python; measured on an H100, the GPU was busy for 8-10 ms of a 25-45 ms step and
waited on the host for the rest. A CUDA graph records those launches once and replays
them with one call. Graphs need fixed shapes and fixed memory, so a static step:

- pads the batch to a *bucket* (1, 2, 4, 8, ... up to ``max_sequences``); padding rows
  attend to one column only, so they stay finite, and their outputs are dropped;
- reads the buffer's columns from 0 to a *width bucket* (64, 128, 256, ... up to the
  capacity) just past the newest token, and masks the ones a row does not own, instead
  of slicing the live window (whose start and width change every step); so a step
  attends over about the columns in use, not the whole preallocated context, and the
  graphs stay few (rows buckets x width buckets, each recorded on first use);
- writes the new keys and values with ``index_copy_`` at a column held in a device
  tensor, instead of a Python slice baked into the recording;
- passes a ready 4D additive mask, so ``transformers`` builds none; a model whose layers
  mix sliding-window and full attention (Gemma 2 and 3) gets one per kind of layer, in the
  mapping from layer type to mask that such models take.

The engine keeps the live window packed toward column 0 (see ``LLMEngine._decode``) so
that the width bucket follows the longest running sequence. Without CUDA, or with graphs
off, the same fixed-shape step runs eagerly: the CPU tests check it against ``generate`` that way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tritonop_backend.llm.kv import KVBuffer, cache_keyword

LOGGER = logging.getLogger(__name__)


def buckets(max_rows: int) -> list[int]:
    """Batch sizes a static step is recorded for: powers of two, and ``max_rows``."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_rows})


MIN_WIDTH = 64
"""The narrowest width bucket: below it, a step's cost hardly depends on the width."""


def width_buckets(capacity: int) -> list[int]:
    """Column widths a static step reads: powers of two from ``MIN_WIDTH``, and ``capacity``."""
    sizes = [min(MIN_WIDTH, capacity)]
    while sizes[-1] * 2 < capacity:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, capacity})


def width_bucket(columns: int, capacity: int) -> int:
    """The narrowest width bucket holding ``columns`` columns."""
    return next(size for size in width_buckets(capacity) if size >= columns)


LAYER_KINDS = ("full_attention", "sliding_attention")
"""The ``config.layer_types`` values a static step builds masks for."""


def layer_windows(config: Any) -> dict[str, int | None]:
    """The keys each kind of layer sees: a window of that many, or None for all of them.

    A config without ``layer_types`` (Llama, Mistral, Phi-3) has one kind, windowed where
    it names a ``sliding_window`` (as its model's own mask is); otherwise sliding layers
    see ``sliding_window`` keys and full layers all of them.
    """
    window = getattr(config, "sliding_window", None) or None
    kinds = list(dict.fromkeys(getattr(config, "layer_types", None) or []))
    if not kinds:
        use_window = getattr(config, "use_sliding_window", True) is not False
        return {"full_attention": window if use_window else None}
    return {kind: window if kind == "sliding_attention" else None for kind in kinds}


@dataclass
class _Inputs:
    """The tensors one bucket's recorded step reads from and writes to."""

    ids: torch.Tensor  # [rows, 1] last token of each row
    positions: torch.Tensor  # [rows, 1] its position
    masks: dict[str, torch.Tensor]  # per layer kind, [rows, 1, 1, width]: 0 where attended,
    # dtype minimum elsewhere
    at: torch.Tensor  # [1] column the new keys and values go to
    columns: torch.Tensor  # [width] 0, 1, ... for building the mask
    logits: torch.Tensor | None = None  # [rows, vocab], written by the step
    graph: Any = None  # torch.cuda.CUDAGraph once recorded


class StaticDecoder:
    """Runs the decode pass of :class:`~tritonop_backend.llm.engine.LLMEngine` at fixed shapes."""

    def __init__(
        self, model: Any, kv: KVBuffer, cache: Any, max_rows: int, *, graphs: bool
    ) -> None:
        """Bind to the engine's model and buffer.

        Args:
            model: the causal LM.
            kv: the engine's key/value buffer, allocated once.
            cache: the ``transformers`` cache view of ``kv``.
            max_rows: the engine's ``max_sequences``.
            graphs: record and replay CUDA graphs (needs a CUDA device); otherwise run
                the fixed-shape pass eagerly.
        """
        self.model = model
        self.kv = kv
        self.cache = cache
        self.cache_keyword = cache_keyword(model)
        self.buckets = buckets(max_rows)
        self.graphs = graphs and kv.device.type == "cuda"
        self.windows = layer_windows(model.config.get_text_config())
        self._inputs: dict[tuple[int, int], _Inputs] = {}
        self._pool: Any = None
        self.recordings = 0
        """CUDA graphs recorded so far (one per rows bucket and width bucket in use)."""

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether every layer is of a kind whose mask a static step builds."""
        kinds = layer_windows(model.config.get_text_config())
        return all(kind in LAYER_KINDS for kind in kinds)

    def forward(self, last: torch.Tensor, lengths: torch.Tensor, end: int) -> torch.Tensor:
        """Next-token logits for each running row.

        Args:
            last: ``[count]`` the token each row feeds in (already on the device).
            lengths: ``[count]`` tokens each row holds in the cache before this step,
                which is also the new token's position.
            end: the buffer column the new token goes to.

        Returns:
            ``[count, vocab]`` logits; a view into the bucket's output when graphs are on,
            valid until the next step.
        """
        count = int(last.shape[0])
        size = next(b for b in self.buckets if b >= count)
        width = width_bucket(end + 1, self.kv.capacity)
        inputs = self._inputs.get((size, width))
        if inputs is None:
            inputs = self._inputs[(size, width)] = self._allocate(size, width)
        self._fill(inputs, last, lengths, end)
        if not self.graphs:
            inputs.logits = self._run(inputs)
        elif inputs.graph is None:
            self._record(inputs)
        else:
            inputs.graph.replay()
        assert inputs.logits is not None
        return inputs.logits[:count]

    def _allocate(self, rows: int, columns: int) -> _Inputs:
        device = self.kv.device
        dtype = self.kv.keys[0].dtype
        return _Inputs(
            ids=torch.zeros((rows, 1), dtype=torch.long, device=device),
            positions=torch.zeros((rows, 1), dtype=torch.long, device=device),
            masks={kind: torch.zeros((rows, 1, 1, columns), dtype=dtype, device=device)
                   for kind in self.windows},
            at=torch.zeros(1, dtype=torch.long, device=device),
            columns=torch.arange(columns, device=device),
        )

    def _fill(self, inputs: _Inputs, last: torch.Tensor, lengths: torch.Tensor, end: int) -> None:
        """Write this step's values into the bucket's input tensors, in place."""
        count = last.shape[0]
        rows = inputs.ids.shape[0]
        inputs.ids.zero_()
        inputs.ids[:count, 0] = last
        inputs.positions.zero_()
        inputs.positions[:count, 0] = lengths
        # Row r owns columns end - lengths[r] .. end; padding rows own only `end`.
        owned = torch.zeros(rows, dtype=torch.long, device=last.device)
        owned[:count] = lengths
        columns = inputs.columns
        for kind, window in self.windows.items():
            first = end - owned
            if window is not None:  # a key at distance >= window is out of sight
                first = torch.clamp(first, min=end - window + 1)
            seen = (columns[None, :] >= first[:, None]) & (columns[None, :] <= end)
            mask = inputs.masks[kind]
            mask.copy_(torch.where(seen, 0.0, torch.finfo(mask.dtype).min)[:, None, None, :])
        inputs.at.fill_(end)

    def _run(self, inputs: _Inputs) -> torch.Tensor:
        self.kv.static_at = inputs.at
        self.kv.static_rows = inputs.ids.shape[0]
        self.kv.static_columns = inputs.columns.shape[0]
        # One kind of layer: the tensor itself, which every model takes; several: the
        # mapping by layer type, which only the models that mix them take.
        masks = inputs.masks
        mask = masks if len(masks) > 1 else next(iter(masks.values()))
        try:
            output = self.model(
                input_ids=inputs.ids,
                attention_mask=mask,
                position_ids=inputs.positions,
                **{self.cache_keyword: self.cache},
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.kv.static_at = None
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    def _record(self, inputs: _Inputs) -> None:
        """Run the step on a side stream (warm-up), then record it; the step's results stand.

        Recording launches nothing: the warm-up runs compute this step's real outputs
        (writing the same keys and values at the same column each time).
        """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                inputs.logits = self._run(inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: Triton's threads may use CUDA while the engine's thread records.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            inputs.logits = self._run(inputs)
        inputs.graph = graph
        self.recordings += 1
        graph.replay()  # the recorded output tensor is only written by a replay
        LOGGER.info("recorded a CUDA graph for %d rows, %d columns",
                    inputs.ids.shape[0], inputs.columns.shape[0])
