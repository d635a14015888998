"""Running an exported BERT (TorchScript or ONNX) on token ids.

Locally Triton has only its Python backend, so the exported encoder runs inside a
Python model: TorchScript through ``torch.jit.load``, ONNX through ``onnxruntime``.
Both take ``input_ids`` and ``attention_mask`` (``int64 [rows, length]``) and return
``last_hidden_state`` (``float32 [rows, length, dim]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tritonop_backend.artifacts import ModelManifest
from tritonop_backend.batching import pad_and_stack, split_rows


class Encoder(Protocol):
    """Token ids in, token embeddings out."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchScriptEncoder:
    """A traced encoder run with torch on the CPU or one CUDA device."""

    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
        import torch

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

    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
        self._session = onnx_session(path, threads, device)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return np.asarray(hidden, dtype=np.float32)


def load_encoder(model_dir: Path, threads: int = 1, device: str = "cpu") -> Encoder:
    """Load the encoder that ``tritonop export`` wrote into ``model_dir``."""
    manifest = ModelManifest.read(model_dir)
    path = Path(model_dir) / manifest.encoder_file
    if manifest.format == "torchscript":
        return TorchScriptEncoder(path, threads, device)
    return OnnxEncoder(path, threads, device)


def encode_ragged(
    encoder: Encoder, requests: list[tuple[np.ndarray, np.ndarray]]
) -> list[np.ndarray]:
    """Run the encoder once over several requests of different lengths.

    Returns each request's ``[rows, its own length, dim]`` token embeddings. Extra
    padding does not change the embeddings of real tokens: BERT's attention mask
    keeps padded positions out of every real token's attention.
    """
    ids = [request[0] for request in requests]
    masks = [request[1] for request in requests]
    hidden = encoder(pad_and_stack(ids), pad_and_stack(masks))
    return split_rows(hidden, ids, trim=True)
