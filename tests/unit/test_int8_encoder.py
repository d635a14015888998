"""``spec.model.precision: int8``: the spec rule, its own artifacts version, the quantized
encoder prepare builds and serves, and its measured cosine reported up to the status.

The reference is sentence-transformers on the same model folder (a tiny random-weight BERT,
and the packaged all-MiniLM-L6-v2); the cosine bounds are stated per test, with the values
measured when they were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_CORPUS, MODEL_SOURCE
from tritonop.artifacts.approximate import prepared_reports
from tritonop.artifacts.embedding_cache import cache_key
from tritonop.artifacts.prepare import prepare
from tritonop.artifacts.quantize import quantize_encoder, sample_texts
from tritonop.artifacts.versions import resource_fingerprint, version_dir
from tritonop.resources import ResourceError, parse_resource
from tritonop_backend.artifacts import (
    ENCODER_FILES,
    INT8_ENCODER_FILE,
    ModelManifest,
    VersionManifest,
)
from tritonop_backend.stages import EmbedStage

API = "serving.tritonop.dev/v1alpha1"
TEXTS = ["storm warning for the north sea", "a text editor for programmers",
         "recipes with lentils", "football results of the weekend", "the price of copper",
         "europe climate change storm", "Zürich, São Paulo and 北京: non-ASCII text",
         "the quick brown fox jumps over the lazy dog", "rain and snow in the mountains",
         "an election result surprises markets", "a compiler for a small language"]
# Measured when written: the tiny BERT's int8 embeddings have cosine >= 0.9993 to
# sentence-transformers'; MiniLM's >= 0.985 (mean 0.994) on the demo corpus.
TINY_BOUND = 0.98
MINILM_BOUND = 0.98


def body(model: dict | None = None, source: str = "corpus.txt", **spec) -> dict:
    return {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "news"},
            "spec": {"corpus": {"source": source}, "model": model or {}, **spec}}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def served(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Query embeddings as Triton serves them (the fused embed stage)."""
    stage = EmbedStage({"model_dir": str(model_dir), "max_sequence_length": "auto",
                        "pooling": "auto", "max_input_characters": "100000",
                        "query_prompt": "auto", "normalize": "auto", "threads": "1"})
    (result,) = stage.run([{"text": np.array([[t.encode()] for t in texts], dtype=object)}])
    return result["embedding"]


@pytest.fixture
def folder(tmp_path: Path, tiny_encoders) -> Path:
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    return tmp_path


@pytest.mark.parametrize("model", [{"precision": "int8"},
                                   {"precision": "int8", "format": "torchscript"}])
def test_int8_needs_onnx_and_says_which_field(model):
    with pytest.raises(ResourceError, match=r"spec\.model: precision: int8 needs format: onnx"):
        parse_resource(body(model))


def test_int8_is_its_own_artifacts_version(tmp_path):
    (tmp_path / "corpus.txt").write_text("a\n")

    def fingerprint(**model: str) -> str:
        return resource_fingerprint(parse_resource(body(model), tmp_path))

    assert fingerprint(format="onnx", precision="int8") != fingerprint(format="onnx")
    # float32, said or not, is the version made before precision existed.
    assert fingerprint(format="onnx", precision="float32") == fingerprint(format="onnx")


def test_prepare_serves_the_int8_encoder_and_reports_its_cosine(folder, tiny_encoders):
    from sentence_transformers import SentenceTransformer

    root = folder / "artifacts"
    model = {"source": str(tiny_encoders["bert"]), "format": "onnx"}
    float32 = parse_resource(body(model), folder)
    int8 = parse_resource(body({**model, "precision": "int8"}), folder)
    prepare([float32], root, progress=False)
    prepare([int8], root, progress=False)  # reuses the float32 export (hard links)

    model_dir = Path(version_dir(int8, str(root))) / "model"
    manifest = ModelManifest.read(model_dir)
    assert manifest.precision == "int8" and manifest.encoder_file == INT8_ENCODER_FILE
    assert not (model_dir / ENCODER_FILES["onnx"]).exists()  # only what is served is kept
    import onnx

    ops = {node.op_type for node in onnx.load(str(model_dir / INT8_ENCODER_FILE)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops

    # Served (fused stage) against sentence-transformers on the float model.
    reference = SentenceTransformer(str(tiny_encoders["bert"]), device="cpu")
    expected = reference.encode(TEXTS)
    queries = served(model_dir, TEXTS)
    measured = cosine(queries, expected)
    assert measured.min() >= TINY_BOUND, measured
    assert measured.min() < 0.9999  # quantized: not the float32 encoder under another name
    # The manifest's figures are these (every corpus text was sampled; the float32 export
    # is within 1e-4 of sentence-transformers, so its cosine is the same to 1e-3).
    report = manifest.quantization
    assert report["cosine_texts"] == len(TEXTS)
    assert report["cosine_min"] == pytest.approx(measured.min(), abs=1e-3)
    assert report["cosine_mean"] == pytest.approx(measured.mean(), abs=1e-3)

    # The float32 version it reused is untouched; both are complete versions.
    float_dir = Path(version_dir(float32, str(root))) / "model"
    assert ModelManifest.read(float_dir).precision == "float32"
    assert (float_dir / ENCODER_FILES["onnx"]).is_file()
    assert not (float_dir / INT8_ENCODER_FILE).exists()
    assert np.all(cosine(served(float_dir, TEXTS), expected) >= 0.9999)
    for resource in (float32, int8):
        VersionManifest.read(Path(version_dir(resource, str(root))))
    # The corpus vectors were embedded with the int8 encoder, not taken from float32's cache.
    assert cache_key(manifest, "mean", 48, "") != cache_key(
        ModelManifest.read(float_dir), "mean", 48, "")

    # tritonop prepare's report (the Job's termination message) -> status.encoder.
    (report_int8,) = prepared_reports([int8], root)
    assert report_int8["encoder"] == {"precision": "int8", "cosineMin": report["cosine_min"],
                                      "cosineMean": report["cosine_mean"],
                                      "cosineTexts": len(TEXTS)}
    assert "encoder" not in prepared_reports([float32], root)[0]
    status = status_from_termination_message(model | {"precision": "int8"}, report_int8)
    assert status.model_dump(by_alias=True, exclude_none=True) == {
        "version": status.version, **report_int8["encoder"]}


def test_an_int8_export_is_never_reused_for_float32(folder, tiny_encoders):
    root = folder / "artifacts"
    model = {"source": str(tiny_encoders["bert"]), "format": "onnx"}
    int8 = parse_resource(body({**model, "precision": "int8"}), folder)
    float32 = parse_resource(body(model), folder)
    prepare([int8], root, progress=False)
    prepare([float32], root, progress=False)
    int8_dir = Path(version_dir(int8, str(root))) / "model"
    float_dir = Path(version_dir(float32, str(root))) / "model"
    assert ModelManifest.read(float_dir).precision == "float32"
    assert (float_dir / ENCODER_FILES["onnx"]).is_file()
    assert not (float_dir / INT8_ENCODER_FILE).exists()
    assert ModelManifest.read(int8_dir).precision == "int8"  # untouched by the export
    assert (int8_dir / INT8_ENCODER_FILE).is_file()
    assert not (int8_dir / ENCODER_FILES["onnx"]).exists()


def status_from_termination_message(model: dict, report: dict):
    """``status.encoder`` as the operator's plan reads it from a complete prepare Job."""
    from tritonop.controller.artifacts import plan, prepared_encoder
    from tritonop.render.kubernetes import Images
    from tritonop.status import ResourceStatus

    resource = parse_resource({
        "apiVersion": API, "kind": "EmbeddingSearch",
        "metadata": {"name": "news", "namespace": "ml"},
        "spec": {"corpus": {"source": "/artifacts/c.txt"}, "artifacts": {"prepare": "job"},
                 "model": model}})
    version = resource_fingerprint(resource)
    said = json.dumps({**report, "version": version})
    pod = {"status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "prepare", "state": {"terminated": {"message": said}}}]}}
    complete = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    done = plan(resource, ResourceStatus(), lambda child: {**child, "status": complete},
                lambda child: None, Images(), pods=lambda job: [pod])
    assert done.encoder is not None and done.encoder.version == version
    # Once recorded, it stays with its version; a message of another version is no report.
    kept = plan(resource, ResourceStatus(artifacts_version=version, encoder=done.encoder),
                lambda child: child, lambda child: None, Images())
    assert kept.encoder == done.encoder
    assert prepared_encoder(said, "another") is None
    return done.encoder


def test_int8_minilm_is_close_to_sentence_transformers(exported, tmp_path):
    """The packaged all-MiniLM-L6-v2, quantized, on the demo corpus's own texts."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from tritonop.artifacts.corpus import read_corpus

    model_dir = tmp_path / "model"
    shutil.copytree(exported["onnx"], model_dir)
    texts = sample_texts(read_corpus(DEMO_CORPUS), 64)
    manifest = quantize_encoder(model_dir, texts, threads=2)
    assert manifest.quantization["cosine_min"] >= MINILM_BOUND, manifest.quantization

    from tritonop.artifacts.sources import inspect

    reference = SentenceTransformer(str(inspect(MODEL_SOURCE).directory), device="cpu")
    measured = cosine(served(model_dir, texts), reference.encode(texts))
    assert measured.min() >= MINILM_BOUND, measured.min()
    assert measured.mean() == pytest.approx(manifest.quantization["cosine_mean"], abs=1e-3)
