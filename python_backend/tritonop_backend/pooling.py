"""Pooling token embeddings into one sentence embedding.

The modes match sentence-transformers' ``Pooling`` module so that embeddings served by
Triton equal ``SentenceTransformer.encode`` on the same model. Tokens are padded on the
right (the tokenizer stage and the encoder both pad after the real tokens), so the first
position is the ``[CLS]``/``<s>`` token and a row's last real token sits at its length - 1.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PoolingMode = Literal["mean", "max", "cls", "lasttoken"]
POOLING_MODES: tuple[PoolingMode, ...] = ("mean", "max", "cls", "lasttoken")


def pool(token_embeddings: np.ndarray, attention_mask: np.ndarray, mode: str) -> np.ndarray:
    """Pool ``[rows, length, dim]`` token embeddings into ``[rows, dim]``.

    Padding positions (mask 0) never contribute: mean divides by the real token count,
    max sees them as -inf, cls takes position 0, lasttoken the last position whose mask is 1
    (as sentence-transformers finds it: the last 1, not the count of 1s).
    """
    if mode == "cls":
        return token_embeddings[:, 0].astype(np.float32, copy=True)
    if mode == "lasttoken":
        length = attention_mask.shape[1]
        last = length - 1 - np.argmax(attention_mask[:, ::-1] != 0, axis=1)
        rows = np.arange(token_embeddings.shape[0])
        return token_embeddings[rows, last].astype(np.float32, copy=True)
    mask = attention_mask[:, :, None].astype(bool)
    if mode == "mean":
        summed = np.where(mask, token_embeddings, 0).sum(axis=1)
        counts = np.clip(mask.sum(axis=1), 1, None)
        return (summed / counts).astype(np.float32)
    if mode == "max":
        masked = np.where(mask, token_embeddings, -np.inf).max(axis=1)
        return masked.astype(np.float32)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length (zero rows stay zero), as ``torch.nn.functional.normalize``."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
