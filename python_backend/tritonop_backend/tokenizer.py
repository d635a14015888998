"""Turning texts into encoder token ids with the model's own fast tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer


class TextTokenizer:
    """A Hugging Face fast tokenizer set up the way sentence-transformers uses it.

    Truncation (not an error) at ``max_length`` tokens, special tokens added, and no
    padding: padding happens per request in :meth:`encode`, and again per batch in the
    encoder, so a short query is never padded to a fixed length it does not need.

    ``prompt`` is put before every text, as sentence-transformers does with a prompt
    (``"query: " + text``): its tokens count towards ``max_length`` and are pooled with
    the text's.
    """

    def __init__(self, tokenizer_file: Path, max_length: int, prompt: str = "") -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self.max_length = max_length
        self.prompt = prompt

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize ``texts`` into ``input_ids`` and ``attention_mask``, both ``[n, longest]``."""
        return _to_arrays(self._tokenizer.encode_batch([self.prompt + t for t in texts]))

    def encode_groups(self, groups: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize several requests' texts in one call, each padded to its own longest."""
        encodings = self._tokenizer.encode_batch(
            [self.prompt + text for group in groups for text in group])
        results = []
        start = 0
        for group in groups:
            results.append(_to_arrays(encodings[start : start + len(group)]))
            start += len(group)
        return results


def _to_arrays(encodings: list[Encoding]) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), length), dtype=np.int64)
    mask = np.zeros((len(encodings), length), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return ids, mask
