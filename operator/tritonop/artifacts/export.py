"""Exporting a sentence-transformers BERT to TorchScript or ONNX, checked against the source.

The export is the encoder alone (token ids and mask in, ``last_hidden_state`` out);
tokenization and pooling stay in their own models, so one export serves every pooling
mode. After writing, the exported file is loaded back and run on texts of other
lengths and batch sizes than the trace used, and compared with the source model in
``transformers``: an export that drifts fails here rather than in production.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonop.artifacts.sources import SourceModel
from tritonop_backend.artifacts import (
    ENCODER_FILES,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    ModelManifest,
)
from tritonop_backend.encoder import load_encoder
from tritonop_backend.tokenizer import TextTokenizer

# Largest tolerated |exported - source| over real tokens; float32 BERT exports sit
# around 1e-6, a broken export (wrong mask handling, fixed shapes) is off by > 1e-1.
TOLERANCE = 1e-4
_TRACE_TEXTS = ["a short query", "a longer sentence that makes the batch ragged and padded"]
_CHECK_TEXTS = [
    "storm",
    "Zürich, 北京 and São Paulo: non-ASCII text is tokenized too",
    "the quick brown fox jumps over the lazy dog " * 4,
]


@dataclass(frozen=True)
class ExportResult:
    manifest: ModelManifest
    directory: Path
    skipped: bool


def _wrapped(source: SourceModel):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source.directory)).eval()

    class Encoder(torch.nn.Module):
        """Positional ``(input_ids, attention_mask)`` -> ``last_hidden_state``."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            token_types = torch.zeros_like(input_ids)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_types)
            return out.last_hidden_state

    return Encoder().eval()


def _write_encoder(module, example: tuple, path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(module, example, check_trace=False).save(str(path))
            return
        dynamic = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            module, example, str(path),
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic,
                          "last_hidden_state": dynamic},
            opset_version=17, dynamo=False,
        )


def _max_difference(module, directory: Path, tokenizer: TextTokenizer) -> float:  # type: ignore[no-untyped-def]
    import torch

    encoder = load_encoder(directory, threads=torch.get_num_threads())
    ids, mask = tokenizer.encode(_CHECK_TEXTS)
    with torch.no_grad():
        expected = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    actual = encoder(ids, mask)
    real = mask.astype(bool)
    return float(np.abs(actual - expected)[real].max())


def export_model(
    source: SourceModel, fmt: str, directory: Path, *, force: bool = False
) -> ExportResult:
    """Export ``source`` as ``fmt`` into ``directory`` unless an identical export is there.

    Raises:
        ArtifactError: the exported encoder differs from the source by more than
            :data:`TOLERANCE`.
    """
    if fmt not in ENCODER_FILES:
        raise ArtifactError(f"format must be one of {sorted(ENCODER_FILES)}, got {fmt!r}")
    directory = Path(directory)
    if not force:
        try:
            existing = ModelManifest.read(directory)
        except ArtifactError:
            existing = None
        if existing and (existing.fingerprint, existing.format) == (source.fingerprint, fmt):
            return ExportResult(existing, directory, skipped=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.copyfile(source.directory / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    tokenizer = TextTokenizer(directory / TOKENIZER_FILE, source.max_sequence_length)
    module = _wrapped(source)
    import torch

    example = tuple(torch.from_numpy(a) for a in tokenizer.encode(_TRACE_TEXTS))
    _write_encoder(module, example, directory / ENCODER_FILES[fmt], fmt)
    manifest = ModelManifest(
        source=source.source, fingerprint=source.fingerprint, format=fmt,
        dimension=source.dimension, pooling=source.pooling,
        max_sequence_length=source.max_sequence_length, max_abs_diff=0.0,
    )
    manifest.write(directory)
    difference = _max_difference(module, directory, tokenizer)
    if difference > TOLERANCE:
        (directory / MANIFEST_FILE).unlink()
        raise ArtifactError(f"exported {fmt} encoder differs from {source.source} by "
                            f"{difference:.2e} (> {TOLERANCE:.0e}); not using it")
    manifest = dataclasses.replace(manifest, max_abs_diff=difference)
    manifest.write(directory)
    return ExportResult(manifest, directory, skipped=False)
