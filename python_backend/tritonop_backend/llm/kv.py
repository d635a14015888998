"""A key/value cache shared by all running sequences, written in place.

Rows are sequences, columns are token positions. Every row's tokens end at the same
column (``end``), so a decode step writes one column for the whole batch and the
model sees one ``(rows, heads, columns, head_dim)`` view per layer. Shorter rows are
padded on the left and masked. Compared with Hugging Face's ``DynamicCache``, which
concatenates a new tensor every step, writing into preallocated storage makes a decode
step cost what the attention costs, and dropping padding that no row needs any more
is just moving ``start``.

All storage is allocated when the engine is built, for ``max_sequences`` rows of the whole
context plus some headroom: a service that cannot hold that many sequences fails at load,
naming both numbers, instead of running out of memory under traffic; and the memory in
use stays the same while serving.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class KVShape:
    """What one layer stores per token: key/value heads, their size and the dtype."""

    num_layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    def nbytes(self, rows: int, columns: int) -> int:
        """Bytes of keys and values for ``rows`` x ``columns`` tokens over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * rows * self.heads * columns * self.head_dim * itemsize


class KVBuffer:
    """Preallocated keys and values for every layer, plus the token ids at each position.

    Columns that hold no live token keep finite stale values; the attention mask hides
    them.
    """

    def __init__(
        self, shape: KVShape, max_rows: int, max_columns: int, device: torch.device
    ) -> None:
        """Allocate everything now (zeros, so the memory is touched and counted).

        Raises:
            MemoryError: when the buffer does not fit in the memory that is free.
        """
        self.shape = shape
        self.num_layers = shape.num_layers
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.device = device
        self.capacity = max_columns
        self.nbytes = shape.nbytes(max_rows, max_columns)
        free = free_memory(device)
        if free is not None and self.nbytes > free:
            raise MemoryError(f"needs {_gib(self.nbytes)} but {_gib(free)} is free on {device}")
        size = (max_rows, shape.heads, max_columns, shape.head_dim)
        try:
            self.keys = [_zeros(size, shape.dtype, device) for _ in range(shape.num_layers)]
            self.values = [_zeros(size, shape.dtype, device) for _ in range(shape.num_layers)]
        except torch.OutOfMemoryError as error:
            raise MemoryError(f"needs {_gib(self.nbytes)}: {error}") from None
        self.tokens = _zeros((max_rows, max_columns), torch.long, device)
        self.start = 0
        self.end = 0
        self.window = Window(rows=(0, 0), read_from=0, write_at=0)
        self.static_at: torch.Tensor | None = None
        """Set by a fixed-shape step (``graphs.StaticDecoder``): the write column, on the device."""
        self.static_rows = 0
        """Rows of that step (a batch-size bucket)."""
        self.static_columns = 0
        """Columns that step reads, from column 0 (a width bucket)."""

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values; return the layer's whole window."""
        shape = self.shape
        if (key.shape[1], key.shape[3], key.dtype) != (shape.heads, shape.head_dim, shape.dtype):
            raise RuntimeError(
                f"layer {layer} produced {key.dtype} keys of shape {list(key.shape)}; the "
                f"cache holds {shape.dtype} for {shape.heads} heads of {shape.head_dim}"
            )
        if self.static_at is not None:  # fixed shapes: columns 0..width, written by index
            keys = self.keys[layer][: self.static_rows, :, : self.static_columns]
            values = self.values[layer][: self.static_rows, :, : self.static_columns]
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

        The live window moves back to column 0; the headroom beyond the context keeps
        such moves rare (one per headroom's worth of steps at most).

        Args:
            rows: rows in use, whose window must survive the move.
            left: columns that the next pass needs to the left of ``end``.
        """
        if self.end - left >= 0 and self.end + 1 <= self.capacity:
            return
        width = max(self.end - self.start, left)
        if width + 1 > self.capacity:
            raise RuntimeError(f"KV buffer needs {width + 1} columns, limit is {self.max_columns}")
        shift = width - self.end
        if shift != 0:
            self._move_columns(rows, shift)

    def pack_left(self, rows: int) -> None:
        """Move the live window of the first ``rows`` rows to column 0."""
        if self.start > 0:
            self._move_columns(rows, -self.start)

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        """Copy live rows into freed ones so that the rows in use stay contiguous."""
        self.copy_rows(sources, targets, self.start)

    def copy_rows(self, sources: list[int], targets: list[int], first: int) -> None:
        """Copy rows' keys, values and tokens from column ``first`` to ``end`` into others."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.device)
        dst = torch.tensor(targets, device=self.device)
        columns = slice(first, self.end)
        for storage in (*self.keys, *self.values):
            storage[dst, :, columns] = storage[src, :, columns]
        self.tokens[dst, columns] = self.tokens[src, columns]

    def read_row(self, row: int, first: int, last: int) -> torch.Tensor:
        """One row's keys and values in columns ``first..last``, every layer's keys first.

        Returns:
            ``[2 * layers, heads, last - first, head_dim]``, a new tensor.
        """
        columns = slice(first, last)
        return torch.stack([storage[row, :, columns] for storage in (*self.keys, *self.values)])

    def write_row(self, row: int, first: int, data: torch.Tensor) -> None:
        """Put keys and values laid out as :meth:`read_row` gives them at column ``first``."""
        columns = slice(first, first + data.shape[2])
        for storage, layer in zip((*self.keys, *self.values), data, strict=True):
            storage[row, :, columns] = layer

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
        """Nothing to do: the buffer is allocated when the engine is built."""

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
        """The engine bounds each sequence by the context itself; no maximum here."""
        return -1


def cache_keyword(model: Any) -> str:
    """The name under which ``model``'s forward pass takes the cache.

    ``transformers`` renamed ``past_key_values`` to ``cache`` (5.2x: the old name warns and
    goes in 5.40); passing the name the model declares works on both sides of that.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CGROUP_ROOT = Path("/sys/fs/cgroup")


def free_memory(device: torch.device, cgroup: Path = CGROUP_ROOT) -> int | None:
    """Bytes that an allocation on ``device`` may still take; None when unknown.

    On the CPU that is the smaller of the machine's available memory and what the
    container's memory limit leaves (cgroup v2 ``memory.max`` less ``memory.current``):
    in a pod, ``/proc/meminfo`` describes the node, and going past the limit is an OOM
    kill rather than an error.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    sizes = [_mem_available(), _cgroup_room(cgroup)]
    known = [size for size in sizes if size is not None]
    return min(known) if known else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room(root: Path) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _zeros(size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Created in inference mode, like everything the engine's steps write into it.
    with torch.inference_mode():
        return torch.zeros(size, dtype=dtype, device=device)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
