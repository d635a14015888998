"""Turning a growing list of token ids into safe, incremental pieces of text.

Two things make this harder than ``decode`` per token: a character can span several
tokens (byte-fallback pieces decode to U+FFFD until the character is complete), and a
SentencePiece token decodes differently at the start of a string than after another
token. Both are handled the way Hugging Face's TGI does it, by decoding a short window
of already-read tokens plus the new ones and emitting only the difference. Stop
strings may span token boundaries, so text that could still become one is held back.

Special tokens are left out of the text, except those a stream is told to show (``shown``):
under ``tool_choice: "auto"`` the control token that begins a call (Mistral's
``[TOOL_CALLS]``, Llama's ``<|python_tag|>``) is written by its name, so that the gateway,
which reads calls from the text, sees where the call begins after some text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

REPLACEMENT_CHARACTER = "\ufffd"


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer that detokenization needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str:
        """Turn token ids into text."""
        ...


class IncrementalDetokenizer:
    """Yields the text that each new token adds, never an incomplete character."""

    def __init__(self, tokenizer: Decoder, shown: Mapping[int, str] | None = None) -> None:
        """Start with no tokens; ``prefix`` and ``read`` are TGI's two offsets. ``shown``:
        special tokens (id -> text) written into the text rather than left out."""
        self._tokenizer = tokenizer
        self._shown = dict(shown or {})
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the new text, or "" while a character is incomplete."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHARACTER):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back, as a full decode would render it."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if not self._shown or not any(token in self._shown for token in token_ids):
            return self._tokenizer.decode(token_ids, skip_special_tokens=True)
        parts, start = [], 0
        for at, token in enumerate(token_ids):
            if token in self._shown:
                parts += [self._decode(token_ids[start:at]), self._shown[token]]
                start = at + 1
        parts.append(self._decode(token_ids[start:]))
        return "".join(parts)


class TextStream:
    """Text of one sequence: detokenized, cut at the first stop string, released safely.

    Attributes:
        stopped: a stop string has been seen; the text ends just before it.
    """

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (),
                 shown: Mapping[int, str] | None = None) -> None:
        """Track one sequence; ``stop`` strings are excluded from the text; ``shown`` special
        tokens are written in it (:class:`IncrementalDetokenizer`)."""
        self._detokenizer = IncrementalDetokenizer(tokenizer, shown)
        self._stop = tuple(stop)
        self._longest = max((len(item) for item in self._stop), default=0)
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text released so far plus what is held back."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that may be sent now."""
        return self._advance(self._detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        """The sequence ended for another reason: release everything still held back."""
        if self.stopped:
            return ""
        return self._advance(self._detokenizer.flush(), final=True)

    def _advance(self, delta: str, final: bool) -> str:
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        cut = self._find_stop(search_from)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            final = True
        release = len(self._text) if final else len(self._text) - self._held_back()
        piece = self._text[self._sent : release]
        self._sent = max(self._sent, release)
        return piece

    def _find_stop(self, search_from: int) -> int | None:
        """Where the earliest stop string begins in the unchecked tail, if anywhere."""
        hits = [self._text.find(stop, search_from) for stop in self._stop]
        found = [hit for hit in hits if hit >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        for size in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self._stop):
                return size
        return 0
