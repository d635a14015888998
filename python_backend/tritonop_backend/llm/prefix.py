"""Keys and values of prompt prefixes, kept so that later prompts skip their prefill.

Requests to one service often begin alike: the chat template's system turn, a shared
instruction, a few-shot preamble, the same document asked several questions. Their keys
and values over that prefix are the same (they depend only on the tokens before and at
each position), so the engine keeps them, in blocks of :data:`BLOCK_TOKENS` tokens, and
copies them into a new sequence's row instead of computing them again.

A block is found by a chain of digests: block ``i``'s key hashes block ``i - 1``'s key
and its own token ids, so any shared prefix of whole blocks is found, wherever the
prompts part. A found block is also checked for its tokens and its parent block, so a
digest collision could only miss, never hand out rows of another prefix.

Memory is bounded by a byte budget: blocks are evicted least recently used, and a block
is always used more recently than the blocks that continue it (a hit refreshes a chain
from its end back to its start), so eviction takes the ends of chains first and never
leaves a block whose parent is gone. Blocks are plain tensors on the engine's device,
allocated as prompts arrive and freed when evicted: nothing is reserved at load.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tritonop_backend.llm.kv import KVShape

BLOCK_TOKENS = 16
"""Tokens per block: the unit in which prefixes are shared, stored and evicted."""

DEFAULT_BUDGET_BYTES = 256 * 2**20
"""Bytes of keys and values the cache may hold by default: about 11,000 tokens of
SmolLM2-135M in bfloat16, 2,000 of a 7B model with 8 key/value heads."""


class BlockKey(NamedTuple):
    """One whole block of a prompt: its chain digest and its token ids."""

    digest: bytes
    tokens: tuple[int, ...]


@dataclass(eq=False)
class _Block:
    key: BlockKey
    parent: _Block | None
    data: torch.Tensor
    """``[2 * layers, heads, BLOCK_TOKENS, head_dim]``: every layer's keys, then values."""
    children: set[bytes] = field(default_factory=set)


def block_keys(ids: list[int], block_tokens: int = BLOCK_TOKENS) -> list[BlockKey]:
    """The chain keys of every whole block of ``ids``, first block first."""
    keys: list[BlockKey] = []
    digest = b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        tokens = tuple(ids[start : start + block_tokens])
        digest = hashlib.blake2b(digest + array("q", tokens).tobytes(), digest_size=16).digest()
        keys.append(BlockKey(digest, tokens))
    return keys


class PrefixCache:
    """Blocks of keys and values by prefix, within a byte budget, evicted least recently used.

    Not thread-safe: only the engine's driving thread uses it.
    """

    def __init__(
        self,
        shape: KVShape,
        budget_bytes: int,
        device: torch.device,
        block_tokens: int = BLOCK_TOKENS,
    ) -> None:
        """An empty cache for keys and values of ``shape``.

        Raises:
            ValueError: when the budget does not hold a single block.
        """
        self.shape = shape
        self.block_tokens = block_tokens
        self.block_bytes = shape.nbytes(1, block_tokens)
        self.budget_bytes = budget_bytes
        self.max_blocks = budget_bytes // self.block_bytes
        if self.max_blocks < 1:
            raise ValueError(f"a prefix cache of {budget_bytes} bytes holds no block of "
                             f"{self.block_bytes} bytes")
        self.device = device
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.hit_tokens = 0
        """Prompt tokens whose keys and values came from the cache, since it was made."""
        self.evictions = 0
        """Blocks evicted since the cache was made."""

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def nbytes(self) -> int:
        """Bytes held by the blocks' tensors now."""
        return sum(block.data.nbytes for block in self._blocks.values())

    def lookup(self, keys: list[BlockKey], limit: int) -> int:
        """How many of the first blocks of ``keys`` (at most ``limit``) are held."""
        parent: _Block | None = None
        found = 0
        for key in keys[:limit]:
            block = self._blocks.get(key.digest)
            if block is None or block.key.tokens != key.tokens or block.parent is not parent:
                break
            parent = block
            found += 1
        return found

    def fetch(self, keys: list[BlockKey], tokens: int) -> torch.Tensor:
        """Keys and values of the first ``tokens`` tokens, all held (see :meth:`lookup`).

        Returns:
            ``[2 * layers, heads, tokens, head_dim]``, every layer's keys, then values.
        """
        count = -(-tokens // self.block_tokens)
        blocks = [self._blocks[key.digest] for key in keys[:count]]
        self._touch(blocks)
        self.hit_tokens += tokens
        return torch.cat([block.data for block in blocks], dim=2)[:, :, :tokens]

    def store(self, keys: list[BlockKey], read: Callable[[int, int], torch.Tensor]) -> int:
        """Hold every block of ``keys``, reading those not held from the sequence's row.

        Args:
            keys: the prompt's blocks, from :func:`block_keys`.
            read: ``read(first, last)`` gives ``[2 * layers, heads, last - first, head_dim]``
                for those token positions of the prompt.

        Returns:
            Blocks added. Fewer than missing when the budget cannot hold them without
            evicting this prompt's own earlier blocks.
        """
        held = self.lookup(keys, len(keys))
        chain = [self._blocks[key.digest] for key in keys[:held]]
        self._touch(chain)
        wanted = min(len(keys), self.max_blocks) - held
        if wanted <= 0:
            return 0
        protected = {id(block) for block in chain}
        room = self.max_blocks - len(self._blocks)
        while room < wanted and self._blocks:
            oldest = next(iter(self._blocks.values()))
            if id(oldest) in protected:
                break
            room += self._evict(oldest)
        wanted = min(wanted, room)
        if wanted <= 0:
            return 0
        size = self.block_tokens
        rows = read(held * size, (held + wanted) * size)
        parent = chain[-1] if chain else None
        for index, key in enumerate(keys[held : held + wanted]):
            data = rows[:, :, index * size : (index + 1) * size].clone()
            block = _Block(key, parent, data)
            self._blocks[key.digest] = block
            if parent is not None:
                parent.children.add(key.digest)
            chain.append(block)
            parent = block
        self._touch(chain)
        return wanted

    def clear(self) -> None:
        """Drop every block."""
        self._blocks.clear()

    def _touch(self, chain: list[_Block]) -> None:
        """Mark a chain used, its end first, so that every block is fresher than its children."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key.digest)

    def _evict(self, block: _Block) -> int:
        """Drop a block and any blocks that continue it; how many were dropped."""
        dropped = 0
        for child in list(block.children):
            if child in self._blocks:
                dropped += self._evict(self._blocks[child])
        del self._blocks[block.key.digest]
        if block.parent is not None:
            block.parent.children.discard(block.key.digest)
        self.evictions += 1
        return dropped + 1
