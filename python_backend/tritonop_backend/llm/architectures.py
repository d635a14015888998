"""Which decoder architectures the engine serves, decided from the model's files alone.

The engine drives ``transformers``' own implementation of each model through a cache and
masks of its own (``kv.py``, ``graphs.py``), so an architecture is served only once its
greedy output has been checked against ``transformers``' ``generate``, alone and in
mixed batches (``tests/unit/test_llm_architectures.py``). Anything else is refused when
the service is prepared, from ``config.json`` or a GGUF file's header, instead of loading
for minutes and then failing, or worse answering wrongly, at the first request.

Nothing here imports torch or transformers: the operator checks a model before any
download of weights is worth starting, and the check must be cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPPORTED: dict[str, str] = {
    "mistral": "Mistral (sliding-window attention)",
    "llama": "Llama 2, 3, 3.1, 3.2 (Llama 3 RoPE scaling), SmolLM2",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3 (dense)",
    "gemma2": "Gemma 2 (sliding and full layers, soft-capping)",
    "gemma3_text": "Gemma 3 text-only (1B; sliding and full layers)",
    "phi3": "Phi-3, Phi-3.5-mini, Phi-4-mini (fused qkv and gate-up projections)",
}
"""``config.json`` ``model_type`` -> the models it covers."""

GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",  # llama.cpp writes Mistral 7B as "llama" too
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",  # transformers reads a Gemma 3 GGUF as its text model
    "phi3": "phi3",
}
"""A GGUF file's ``general.architecture`` -> the ``model_type`` transformers turns it into."""


ROPE_FREQS = "rope_freqs.weight"
"""llama.cpp's tensor of per-frequency RoPE factors (Llama 3.1's ``rope_type: llama3``);
``transformers`` ignores it when reading a GGUF (measured with 5.25: greedy output of a
tiny Llama 3 model changed from its first token)."""


class UnsupportedModelError(ValueError):
    """The model's files name an architecture the engine does not serve, or custom code."""


def check_model_config(config: Mapping[str, Any], *, trust_remote_code: bool = False) -> str:
    """The ``model_type`` of a ``config.json``, or why the engine refuses it.

    A config with ``auto_map`` ships its own Python modelling code. When its
    ``model_type`` is one in :data:`SUPPORTED`, ``transformers``' own implementation is
    used and that code is never run (as ``transformers`` itself does without
    ``trust_remote_code``; Phi-3's repositories declare such code). Otherwise the model
    needs its code run, which is refused unless ``trust_remote_code``: with it, the model
    is loaded through its own code, untested here, and served only if that code follows
    ``transformers``' cache interface.

    Args:
        config: the parsed ``config.json``.
        trust_remote_code: the resource's ``model.trustRemoteCode``.

    Raises:
        UnsupportedModelError: saying which ``model_type`` and what would be served.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModelError("config.json names no model_type")
    if model_type in SUPPORTED:
        return model_type
    auto_map = config.get("auto_map")
    if isinstance(auto_map, Mapping) and auto_map:
        if trust_remote_code:
            return model_type
        code = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))
        raise UnsupportedModelError(
            f"model_type {model_type!r} needs the model's own Python code (config.json "
            f"auto_map: {code}), which is not run unless model.trustRemoteCode is true"
        )
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not an architecture this engine serves; it serves "
        f"{', '.join(SUPPORTED)}"
    )


def check_model_dir(model_dir: str | Path, *, trust_remote_code: bool = False) -> str:
    """:func:`check_model_config` on a Hugging Face folder's ``config.json``."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModelError(f"{path.parent} has no config.json") from None
    except (OSError, ValueError) as error:
        raise UnsupportedModelError(f"{path} cannot be read: {error}") from None
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object")
    return check_model_config(config, trust_remote_code=trust_remote_code)


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of each fixed-size GGUF value type (8 is a string, 9 an array)."""
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def check_gguf_header(path: str | Path) -> None:
    """Walk a GGUF file's header (its metadata and tensor table) with every count and
    length checked against the bytes left, before ``gguf``'s reader sees it: that reader
    trusts them, and a count of 2**62 in a 115-byte file made it loop and allocate without
    end.

    Raises:
        UnsupportedModelError: naming what does not fit.
    """
    import mmap
    import struct

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size = len(data)
        offset = 0

        def take(count: int, what: str) -> int:
            nonlocal offset
            if count < 0 or offset + count > size:
                raise UnsupportedModelError(f"{path} is not a readable GGUF file: {what} "
                                            f"runs past its end ({size} bytes)")
            start, offset = offset, offset + count
            return start

        def number(fmt: str, what: str) -> int:
            value: int = struct.unpack_from("<" + fmt, data, take(struct.calcsize(fmt), what))[0]
            return value

        def string(what: str) -> None:
            take(number("Q", what), what)

        def value(kind: int, what: str, depth: int = 0) -> None:
            if kind in _GGUF_SCALARS:
                take(_GGUF_SCALARS[kind], what)
            elif kind == _GGUF_STRING:
                string(what)
            elif kind == _GGUF_ARRAY and depth < 2:
                item, count = number("I", what), number("Q", what)
                if item in _GGUF_SCALARS:
                    take(count * _GGUF_SCALARS[item], what)
                    return
                if count > size - offset:  # every other item takes a byte at least
                    take(count, what)
                for _ in range(count):
                    value(item, what, depth + 1)
            else:
                raise UnsupportedModelError(f"{path} is not a readable GGUF file: {what} has "
                                            f"value type {kind}")

        if data[:4] != b"GGUF":
            raise UnsupportedModelError(f"{path} is not a GGUF file (no GGUF magic)")
        take(4, "the magic")
        version = number("I", "the version")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{path}: GGUF version {version} is not read here "
                                        "(versions 2 and 3 are)")
        tensors, fields = number("Q", "the tensor count"), number("Q", "the field count")
        for index in range(fields):
            what = f"metadata field {index}"
            string(what)
            value(number("I", what), what)
        for index in range(tensors):
            what = f"tensor {index}"
            string(what)
            dims = number("I", what)
            if dims > 4:
                raise UnsupportedModelError(f"{path} is not a readable GGUF file: {what} has "
                                            f"{dims} dimensions")
            take(8 * dims + 4 + 8, what)


def check_gguf(path: str | Path) -> str:
    """The ``model_type`` a GGUF file becomes, from its header (no tensor is read).

    Raises:
        UnsupportedModelError: when the file's ``general.architecture`` is not served.
    """
    from gguf import GGUFReader

    try:
        check_gguf_header(path)
        reader = GGUFReader(str(path))
    except UnsupportedModelError:
        raise
    except Exception as error:  # gguf raises what its parsing meets: KeyError, IndexError...
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: "
                                    f"{type(error).__name__}: {error}") from None
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise UnsupportedModelError(f"{path} has no general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {architecture!r} is not one this engine serves; it serves "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    if any(tensor.name == ROPE_FREQS for tensor in reader.tensors):
        raise UnsupportedModelError(
            f"the GGUF carries RoPE scaling factors ({ROPE_FREQS}, as Llama 3.1 and later "
            "have), which transformers' GGUF reader drops: the model would answer with "
            "other positions than it was trained with; serve its safetensors folder instead"
        )
    return GGUF_ARCHITECTURES[architecture]
