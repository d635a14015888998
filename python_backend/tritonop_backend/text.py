"""Decoding and checking the text that clients send."""

from __future__ import annotations

from collections.abc import Iterable

from tritonop_backend.errors import RequestError


def decode_texts(values: Iterable[object], field: str = "text") -> list[str]:
    """Decode BYTES tensor elements into non-empty strings.

    Triton hands BYTES tensors over as numpy object arrays of ``bytes``; clients of the
    gRPC and binary HTTP protocols can put arbitrary bytes there, so strict UTF-8
    decoding happens here, once, with an error the client can act on.

    Args:
        values: the tensor's elements, flattened.
        field: the input name to blame in errors.

    Returns:
        The decoded texts, stripped of surrounding whitespace (as sentence-transformers does).

    Raises:
        RequestError: a text is not valid UTF-8, or is empty after stripping.
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
        text = str(value).strip()
        if not text:
            raise RequestError(field, f"element {position} is empty or only whitespace")
        texts.append(text)
    return texts
