"""Incremental detokenization and stop strings, with a byte-level toy tokenizer.

Each token of the toy tokenizer is one UTF-8 byte, the worst case for streaming:
every non-ASCII character is split across tokens.
"""

from __future__ import annotations

import pytest

from tritonop_backend.llm.text import IncrementalDetokenizer, TextStream


class ByteTokenizer:
    """Token id = byte value; decoding replaces incomplete characters like HF does."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


def tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream_all(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(ByteTokenizer(), stop)
    pieces = []
    for token in tokens(text):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    else:
        pieces.append(stream.finish())
    return pieces, stream


@pytest.mark.parametrize("text", ["plain ascii", "café crème", "naïve 日本語 🙂 ok", "🙂🙂"])
def test_pieces_are_whole_characters_and_add_up(text: str) -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detokenizer.push(token) for token in tokens(text)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detokenizer.flush() == text


def test_incomplete_tail_is_flushed_as_a_full_decode_would_render_it() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detokenizer.push(token) for token in tokens("ok🙂")[:-1]]
    assert "".join(pieces) == "ok"
    assert detokenizer.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello world. Bye", ("world",), "Hello "),
        ("Hello world. Bye", ("o w",), "Hell"),
        ("Hello world. Bye", ("xyz",), "Hello world. Bye"),
        ("Hello world. Bye", ("Bye", "lo"), "Hel"),
        ("résumé ✂ end", ("✂",), "résumé "),
        ("aaab", ("aab",), "a"),
    ],
)
def test_stop_strings_cut_the_text_across_token_boundaries(
    text: str, stop: tuple[str, ...], expected: str
) -> None:
    pieces, stream = stream_all(text, stop)
    assert "".join(pieces) == expected == stream.text
    assert stream.stopped is (expected != text)


def test_text_that_may_become_a_stop_string_is_held_back() -> None:
    stream = TextStream(ByteTokenizer(), ("STOP",))
    released = "".join(stream.push(token) for token in tokens("go ST"))
    assert released == "go "
    released += "".join(stream.push(token) for token in tokens("ay"))
    assert released == "go STay"


class ControlTokenizer(ByteTokenizer):
    """Bytes, plus one special token (id 256), which the stream's decoding skips."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        assert skip_special_tokens
        return super().decode([token for token in token_ids if token != 256])


def test_special_tokens_are_left_out_unless_shown() -> None:
    """A control token the stream is told to show (a call's start) keeps its place in the
    text, between whole characters; others, and the same one otherwise, are left out."""
    ids = [*tokens("Voilà "), 256, *tokens("[1]")]
    for shown, expected in [({256: "<CALL>"}, "Voilà <CALL>[1]"), (None, "Voilà [1]")]:
        stream = TextStream(ControlTokenizer(), shown=shown)
        pieces = [stream.push(token) for token in ids] + [stream.finish()]
        assert "".join(pieces) == expected
        assert all("\ufffd" not in piece for piece in pieces)
