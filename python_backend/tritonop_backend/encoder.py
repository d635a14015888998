"""Running an exported BERT (TorchScript or ONNX) on token ids.

Locally Triton has only its Python backend, so the exported encoder runs inside a
Python model: TorchScript through ``torch.jit.load``, ONNX through ``onnxruntime``.
Both take ``input_ids`` and ``attention_mask`` (``int64 [rows, length]``) and return
``last_hidden_state`` (``float32 [rows, length, dim]``). A packed export
(``ModelManifest.packed``) reads ``attention_mask`` as segment ids, so that
:func:`encode_ragged` can run a batch of short texts as a few rows of real tokens rather
than a rectangle padded to the longest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tritonop_backend.artifacts import ModelManifest
from tritonop_backend.batching import pad_and_stack, split_rows

# Tokens per packed row (more where one text is longer). Attention over a row costs in
# its square, the rest of the encoder in its tokens; at 256 tokens attention adds ~4% to
# a MiniLM row (measured), while a batch of 8 queries padded to the longest pays ~50%.
PACK_TOKENS = 256


class Encoder(Protocol):
    """Token ids in, token embeddings out."""

    packed: bool

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchScriptEncoder:
    """A traced encoder run with torch on the CPU or one CUDA device."""

    def __init__(self, path: Path, threads: int, device: str = "cpu",
                 packed: bool = False) -> None:
        import torch

        self.packed = packed
        if device == "cpu":
            # Each Triton model instance is its own process; without this, every
            # instance starts one thread per core and they fight over the cores.
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self._module = torch.jit.load(str(path), map_location=self._device).eval()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self._device)
            mask = torch.from_numpy(attention_mask).to(self._device)
            return self._module(ids, mask).float().cpu().numpy()


def onnx_session(path: Path, threads: int, device: str = "cpu") -> Any:
    """An onnxruntime session with ``threads`` intra-op threads, on CUDA when ``device``
    asks for it and the provider is there (the CPU provider otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxEncoder:
    """An ONNX encoder run with onnxruntime (CUDA provider when asked and available)."""

    def __init__(self, path: Path, threads: int, device: str = "cpu",
                 packed: bool = False) -> None:
        self._session = onnx_session(path, threads, device)
        self.packed = packed

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return np.asarray(hidden, dtype=np.float32)


def load_encoder(model_dir: Path, threads: int = 1, device: str = "cpu",
                 manifest: ModelManifest | None = None) -> Encoder:
    """Load the encoder that ``tritonop export`` wrote into ``model_dir`` (as ``manifest``
    says, where export checks a graph before it writes the manifest)."""
    manifest = manifest or ModelManifest.read(model_dir)
    path = Path(model_dir) / manifest.encoder_file
    kind = TorchScriptEncoder if manifest.format == "torchscript" else OnnxEncoder
    return kind(path, threads, device, manifest.packed)


def encode_ragged(
    encoder: Encoder, requests: list[tuple[np.ndarray, np.ndarray]]
) -> list[np.ndarray]:
    """Run the encoder once over several requests of different lengths.

    Returns each request's ``[rows, its own length, dim]`` token embeddings. A packed
    encoder runs the texts several to a row (:func:`pack`), and positions past a text's
    own tokens are zeros; otherwise rows are padded to the longest, which does not change
    the embeddings of real tokens (BERT's attention mask keeps padded positions out of
    every real token's attention). Masks are a text's tokens then padding, as the
    tokenizer gives them.
    """
    ids = [request[0] for request in requests]
    masks = [request[1] for request in requests]
    if encoder.packed:
        rows = [(request, row, int(length)) for request, mask in enumerate(masks)
                for row, length in enumerate(mask.sum(axis=1))]
        if any(length for _, _, length in rows):
            return _encode_packed(encoder, ids, rows)
    hidden = encoder(pad_and_stack(ids), pad_and_stack(masks))
    return split_rows(hidden, ids, trim=True)


def _encode_packed(encoder: Encoder, ids: list[np.ndarray],
                   rows: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """:func:`encode_ragged` for a packed encoder; ``rows``: (request, row, length)."""
    packs = pack([length for _, _, length in rows], PACK_TOKENS)
    width = max(sum(rows[i][2] for i in members) for members in packs)
    packed_ids = np.zeros((len(packs), width), dtype=np.int64)
    segments = np.zeros((len(packs), width), dtype=np.int64)
    placed = []  # (request, row, length, pack, start)
    for p, members in enumerate(packs):
        start = 0
        for segment, i in enumerate(members, start=1):
            request, row, length = rows[i]
            packed_ids[p, start : start + length] = ids[request][row, :length]
            segments[p, start : start + length] = segment
            placed.append((request, row, length, p, start))
            start += length
    hidden = encoder(packed_ids, segments)
    out = [np.zeros((*a.shape, hidden.shape[2]), dtype=np.float32) for a in ids]
    for request, row, length, p, start in placed:
        out[request][row, :length] = hidden[p, start : start + length]
    return out


def pack(lengths: Sequence[int], tokens: int = PACK_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of about ``tokens`` tokens each.

    As many rows as the total needs at ``tokens`` a row (a longer text gets one of its
    own), filled longest first into the first row with room for it (first-fit
    decreasing), so rows come out of about the same length; a text that fits nowhere
    opens one more row.
    """
    total = sum(lengths)
    capacity = max(max(lengths), math.ceil(total / max(1, math.ceil(total / tokens))))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for p, left in enumerate(room):
            if left >= lengths[i]:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(capacity - lengths[i])
    return packs
