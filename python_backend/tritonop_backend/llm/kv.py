"""A key/value cache shared by all running sequences, written in place.

Rows are sequences, columns are token positions. Every row's tokens end at the same
column (``end``), so a decode step writes one column for the whole batch and the
model sees one ``(rows, heads, columns, head_dim)`` view per layer. Shorter rows are
padded on the left and masked. Compared with Hugging Face's ``DynamicCache``, which
concatenates a new tensor every step, writing into preallocated storage makes a decode
step cost what the attention costs, and dropping padding that no row needs any more
is just moving ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class Window:
    """Which part of the buffer one forward pass reads and writes.

    Attributes:
        rows: first and one-past-last row of the sequences in this pass.
        read_from: first column the attention reads.
        write_at: column where the pass's first new token goes.
    """

    rows: tuple[int, int]
    read_from: int
    write_at: int

    @property
    def past(self) -> int:
        """Columns already cached before this pass (Hugging Face's ``past_key_values_length``)."""
        return self.write_at - self.read_from


class KVBuffer:
    """Preallocated keys and values for every layer, plus the token ids at each position.

    Storage is allocated on the first write, when the key shape and dtype are known, and
    grows by doubling up to ``max_columns``. Columns that hold no live token keep
    finite stale values; the attention mask hides them.
    """

    def __init__(
        self, num_layers: int, max_rows: int, max_columns: int, device: torch.device
    ) -> None:
        """Describe the storage; nothing is allocated yet except the token ids."""
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.device = device
        self.capacity = min(256, max_columns)
        self.start = 0
        self.end = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.tokens = torch.zeros((max_rows, self.capacity), dtype=torch.long, device=device)
        self.window = Window(rows=(0, 0), read_from=0, write_at=0)
        self.static_at: torch.Tensor | None = None
        """Set by a fixed-shape step (``graphs.StaticDecoder``): the write column, on the device."""
        self.static_rows = 0
        """Rows of that step (a batch-size bucket)."""

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values; return the layer's whole window."""
        if not self.keys:
            self._allocate(key)
        if self.static_at is not None:  # fixed shapes: every column, written by index
            keys = self.keys[layer][: self.static_rows]
            values = self.values[layer][: self.static_rows]
            keys.index_copy_(2, self.static_at, key)
            values.index_copy_(2, self.static_at, value)
            return keys, values
        lo, hi = self.window.rows
        at, new = self.window.write_at, key.shape[2]
        self.keys[layer][lo:hi, :, at : at + new] = key
        self.values[layer][lo:hi, :, at : at + new] = value
        read = slice(self.window.read_from, at + new)
        return self.keys[layer][lo:hi, :, read], self.values[layer][lo:hi, :, read]

    def make_room(self, rows: int, left: int) -> None:
        """Ensure ``left`` columns before ``end`` and one after it, relocating if needed.

        Args:
            rows: rows in use, whose window must survive the move.
            left: columns that the next pass needs to the left of ``end``.
        """
        if self.end - left >= 0 and self.end + 1 <= self.capacity:
            return
        width = max(self.end - self.start, left)
        # Leave a quarter of headroom to the right so that moves stay rare (amortised O(1)).
        wanted = width + 1 + max(16, width // 4)
        if wanted > self.capacity and self.capacity < self.max_columns:
            self._grow(min(max(2 * self.capacity, wanted), self.max_columns))
        if width + 1 > self.capacity:
            raise RuntimeError(f"KV buffer needs {width + 1} columns, limit is {self.max_columns}")
        shift = width - self.end
        if shift != 0:
            self._move_columns(rows, shift)

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        """Copy live rows into freed ones so that the rows in use stay contiguous."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.device)
        dst = torch.tensor(targets, device=self.device)
        columns = slice(self.start, self.end)
        for storage in (*self.keys, *self.values):
            storage[dst, :, columns] = storage[src, :, columns]
        self.tokens[dst, columns] = self.tokens[src, columns]

    def clear_padding(self, rows: tuple[int, int], mask: torch.Tensor) -> None:
        """Zero keys and values written for padding, which some kernels leave non-finite."""
        lo, hi = rows
        columns = slice(self.end - mask.shape[1], self.end)
        hidden = ~mask[:, None, :, None]
        for storage in (*self.keys, *self.values):
            storage[lo:hi, :, columns].masked_fill_(hidden, 0)

    def cache(self) -> Cache:
        """A Hugging Face ``Cache`` whose layers read and write this buffer."""
        return Cache(layers=[BufferLayer(self, index) for index in range(self.num_layers)])

    def _allocate(self, key: torch.Tensor) -> None:
        shape = (self.max_rows, key.shape[1], self.capacity, key.shape[3])
        for _ in range(self.num_layers):
            self.keys.append(torch.zeros(shape, dtype=key.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=key.dtype, device=self.device))

    def _grow(self, capacity: int) -> None:
        self.keys = [_widen(storage, capacity) for storage in self.keys]
        self.values = [_widen(storage, capacity) for storage in self.values]
        self.tokens = _widen(self.tokens, capacity)
        self.capacity = capacity

    def _move_columns(self, rows: int, shift: int) -> None:
        """Shift the live window of the first ``rows`` rows by ``shift`` columns."""
        old = slice(self.start, self.end)
        new = slice(self.start + shift, self.end + shift)
        for storage in (*self.keys, *self.values):
            storage[:rows, :, new] = storage[:rows, :, old].clone()
        self.tokens[:rows, new] = self.tokens[:rows, old].clone()
        self.start += shift
        self.end += shift


class BufferLayer(CacheLayerMixin):
    """One model layer's view of a :class:`KVBuffer`, in the shape ``Cache`` expects."""

    is_sliding = False

    def __init__(self, buffer: KVBuffer, index: int) -> None:
        """Bind to one layer of the shared buffer."""
        super().__init__()
        self.buffer = buffer
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffer allocates itself on the first write."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys and values; return everything the attention must see."""
        return self.buffer.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Key length and offset for the mask: the window plus the new tokens."""
        return self.buffer.window.past + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens cached before this pass."""
        return self.buffer.window.past

    def get_max_length(self) -> int:
        """The buffer grows on demand, so there is no fixed maximum."""
        return -1


def _widen(storage: torch.Tensor, capacity: int) -> torch.Tensor:
    """A copy of ``storage`` with more columns (dimension 2 for KV, 1 for token ids)."""
    dim = 2 if storage.dim() == 4 else 1
    shape = list(storage.shape)
    shape[dim] = capacity
    wider = torch.zeros(shape, dtype=storage.dtype, device=storage.device)
    wider.narrow(dim, 0, storage.shape[dim]).copy_(storage)
    return wider
