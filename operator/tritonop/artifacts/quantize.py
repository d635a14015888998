"""``spec.model.precision: int8``: the ONNX encoder with int8 weights, and what it costs.

Prepare exports the float32 ONNX encoder as always (checked against the source model),
then quantizes it with onnxruntime's dynamic quantization: the weights of every MatMul
become signed int8 with one scale per output channel, and activations are quantized per
batch as it runs. On all-MiniLM-L6-v2 (docs/models.md, choosing a precision) that was both
the fastest and the closest of the variants measured: one scale per tensor lost about
three times as much cosine, unsigned weights (QUInt8) ran slower than float32 at batch 16,
and the embedding tables (Gather) stay float32, which costs little time.

The cost is measured, not assumed: up to :data:`SAMPLE_TEXTS` of the corpus's own texts
are embedded with both encoders (same tokenizer, prompt and pooling) and the min and mean
cosine go into the model manifest's ``quantization``, which ``tritonop prepare`` reports
beside the index (the operator's ``status.encoder``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tritonop.artifacts.index import encode_texts
from tritonop_backend.artifacts import (
    ENCODER_FILES,
    INT8_ENCODER_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    ModelManifest,
)
from tritonop_backend.encoder import OnnxEncoder
from tritonop_backend.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

SAMPLE_TEXTS = 256
"""Corpus texts the cosine to the float32 encoder is measured on (all, in smaller corpora)."""
QUANTIZATION = {"method": "onnxruntime dynamic", "weight_type": "QInt8", "per_channel": True,
                "op_types": ["MatMul"]}


def sample_texts(texts: Sequence[str], count: int = SAMPLE_TEXTS) -> list[str]:
    """Up to ``count`` texts spread evenly over the corpus (the same ones on every run)."""
    if len(texts) <= count:
        return list(texts)
    return [texts[int(i)] for i in np.linspace(0, len(texts) - 1, count)]


def quantize_encoder(model_dir: Path, texts: Sequence[str], *, pooling: str | None = None,
                     max_length: int | None = None, prompt: str | None = None,
                     threads: int = 1) -> ModelManifest:
    """Quantize the float32 ONNX export in ``model_dir`` to int8 and measure its cosine.

    The int8 encoder (:data:`INT8_ENCODER_FILE`) replaces the float32 one, which is
    removed; the manifest says ``precision: int8`` with the measured cosine. An export
    already at int8 is returned as it is. Files are written under new names and the
    manifest replaced, never rewritten in place: the folder may hold hard links to another
    version's files (:func:`tritonop.artifacts.prepare._reusable_model`).

    Args:
        texts: the texts the cosine is measured on (:func:`sample_texts` of the corpus).
        pooling, max_length, prompt: as the corpus is embedded; None for the model's own.

    Raises:
        ArtifactError: the export is not ONNX, or there are no texts to measure with.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_dir = Path(model_dir)
    manifest = ModelManifest.read(model_dir)
    if manifest.precision == "int8":
        return manifest
    if manifest.format != "onnx":
        raise ArtifactError(f"precision int8 needs an ONNX encoder; {model_dir} holds "
                            f"{manifest.format}")
    if not texts:
        raise ArtifactError("quantizing the encoder needs texts to measure its cosine with")
    float_file = model_dir / ENCODER_FILES["onnx"]
    int8_file = model_dir / INT8_ENCODER_FILE
    int8_file.unlink(missing_ok=True)
    with _root_logger_quiet():
        quantize_dynamic(float_file, int8_file, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=QUANTIZATION["op_types"])
    tokenizer = TextTokenizer(model_dir / TOKENIZER_FILE,
                              max_length or manifest.max_sequence_length,
                              manifest.document_prompt if prompt is None else prompt)
    pooling = pooling or manifest.pooling
    reference = encode_texts(texts, tokenizer, OnnxEncoder(float_file, threads), pooling)
    quantized = encode_texts(texts, tokenizer, OnnxEncoder(int8_file, threads), pooling)
    report = {**QUANTIZATION, **cosine_report(reference, quantized)}
    log.info("int8 encoder: cosine to float32 min %.4f, mean %.4f on %d corpus texts",
             report["cosine_min"], report["cosine_mean"], report["cosine_texts"])
    manifest = dataclasses.replace(manifest, precision="int8", quantization=report)
    (model_dir / MANIFEST_FILE).unlink()
    manifest.write(model_dir)
    float_file.unlink()
    return manifest


@contextmanager
def _root_logger_quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs a line per tensor (and advice) on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def cosine_report(reference: np.ndarray, quantized: np.ndarray) -> dict[str, Any]:
    """``cosine_min``, ``cosine_mean`` and ``cosine_texts`` of two sets of unit rows."""
    cosine = np.sum(reference * quantized, axis=1)
    return {"cosine_min": round(float(cosine.min()), 4),
            "cosine_mean": round(float(cosine.mean()), 4), "cosine_texts": len(cosine)}


def encoder_report(manifest: ModelManifest) -> dict[str, Any]:
    """What ``status.encoder`` shows of a model manifest: precision and measured cosine."""
    report: dict[str, Any] = {"precision": manifest.precision}
    if manifest.precision == "int8":
        quantization = manifest.quantization
        report.update(cosineMin=quantization.get("cosine_min"),
                      cosineMean=quantization.get("cosine_mean"),
                      cosineTexts=quantization.get("cosine_texts"))
    return report
