"""Decoding and checking the text that clients send."""

from __future__ import annotations

from collections.abc import Iterable

from tritonop_backend.errors import RequestError


def decode_texts(
    values: Iterable[object], field: str = "text", max_characters: int | None = None
) -> list[str]:
    """Decode BYTES tensor elements into non-empty strings of bounded length.

    Triton hands BYTES tensors over as numpy object arrays of ``bytes``; clients of the
    gRPC and binary HTTP protocols can put arbitrary bytes there, so strict UTF-8
    decoding happens here, once, with an error the client can act on. The length bound
    is checked here too, before any tokenizer sees the text: a tokenizer reads the whole
    text before it truncates to the model's maximum length, so an 8 MiB text would hold
    the tokenizer (and every request batched with it) for seconds.

    Args:
        values: the tensor's elements, flattened.
        field: the input name to blame in errors.
        max_characters: the most characters (code points) one text may have; None: no bound.

    Returns:
        The decoded texts, stripped of surrounding whitespace (as sentence-transformers does).

    Raises:
        RequestError: a text is not valid UTF-8, is longer than ``max_characters``, or is
            empty after stripping.
    """
    texts = []
    for position, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RequestError(
                    field, f"element {position} is not valid UTF-8 (byte {err.start})"
                ) from None
        decoded = str(value)
        if max_characters is not None and len(decoded) > max_characters:
            raise RequestError(field, f"element {position} is {len(decoded)} characters long; "
                               f"at most {max_characters} are allowed")
        text = decoded.strip()
        if not text:
            raise RequestError(field, f"element {position} is empty or only whitespace")
        texts.append(text)
    return texts
