"""Fetching and exporting an EmbeddingSearch's cross-encoder (``spec.rerank.model``).

A sentence-transformers ``CrossEncoder`` is a ``transformers`` sequence-classification
model with one label, plus what ``CrossEncoder.predict`` does around it: the tokenizer's
pair encoding (truncating the longer text first), and an activation on the logit. The
model comes from any source the encoder's ``model.source`` takes, through the same
fetching code (:mod:`tritonop.artifacts.fetch`), and is exported like the encoder
(:mod:`tritonop.artifacts.export`): TorchScript or ONNX, ``input_ids``,
``attention_mask``, ``token_type_ids`` in and the logit out, loaded back and checked
against ``transformers`` before it is used.

The activation is read as sentence-transformers 6.3 reads it: ``activation_fn`` of
``config_sentence_transformers.json``, else ``sentence_transformers.activation_fn`` of
``config.json``, else the pre-v4 ``sbert_ce_default_activation_function``, else a sigmoid
for one label. A path outside ``torch.`` is code of the model's own, which
sentence-transformers skips (with a warning) unless told to trust it: so does this.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tritonop.artifacts.encoders import (
    _json,
    _max_sequence_length,
    _positions,
    check_architecture,
)
from tritonop.artifacts.fetch import Fetched, ModelSource, fetch
from tritonop.artifacts.resolve import download_progress, link_tree
from tritonop.artifacts.sources import SourceModel, fingerprint
from tritonop.artifacts.versions import complete_versions
from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec
from tritonop_backend.artifacts import MANIFEST_FILE, ArtifactError
from tritonop_backend.rerank import (
    CROSS_ENCODER_FILES,
    PAIR_TOKENIZER_FILE,
    RERANK_FOLDER,
    PairTokenizer,
    RerankManifest,
    load_graph,
)

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}
_CHECK_PAIRS = [
    ("storm", "severe storm warning for northern europe"),
    ("Zürich, 北京 and São Paulo", "non-ASCII text is tokenized too"),
    ("a query", "the quick brown fox jumps over the lazy dog " * 40),  # truncated
    ("the quick brown fox jumps over the lazy dog " * 40, "a short document"),
]


def activation(source: str, directory: Path, config: dict[str, Any]) -> str:
    """The activation ``CrossEncoder.predict`` applies, as sentence-transformers reads it."""
    st_config = _json(directory / "config_sentence_transformers.json", source) or {}
    nested = config.get("sentence_transformers") or {}
    for path in (st_config.get("activation_fn"),
                 nested.get("activation_fn") if isinstance(nested, dict) else None,
                 config.get("sbert_ce_default_activation_function")):
        if not isinstance(path, str) or not path:
            continue
        if not path.startswith("torch."):
            log.warning("model source %s names the activation %s, code of its own, which "
                        "sentence-transformers skips without trust_remote_code: so does "
                        "tritonop (sigmoid)", source, path)
            continue
        name = path.rsplit(".", 1)[-1]
        if name not in _ACTIVATIONS:
            raise ArtifactError(
                f"model source {source}: its activation {path} is not one tritonop applies "
                f"(torch's {', '.join(_ACTIVATIONS)})")
        return _ACTIVATIONS[name]
    return "sigmoid"


def _check_layout(source: str, directory: Path, config: dict[str, Any]) -> None:
    """Refuse what is not a one-label sequence classifier served whole by its logit."""
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1
    if labels != 1:
        raise ArtifactError(f"model source {source}: config.json has {labels} labels; a "
                            "reranker gives one score per pair (num_labels 1)")
    architectures = config.get("architectures") or []
    if architectures and not str(architectures[0]).endswith("ForSequenceClassification"):
        raise ArtifactError(
            f"model source {source}: its architecture {architectures[0]} is not a "
            "*ForSequenceClassification model, which a CrossEncoder reranker is")
    modules = _json(directory / "modules.json", source)
    if modules is not None:
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds != ["Transformer"]:
            raise ArtifactError(
                f"model source {source}: modules.json lists {' -> '.join(kinds)}; tritonop "
                "serves a CrossEncoder of one Transformer module (sequence classification)")
    task = (_json(directory / "sentence_bert_config.json", source) or {}).get(
        "transformer_task")
    if task not in (None, "sequence-classification"):
        raise ArtifactError(f"model source {source}: sentence_bert_config.json's "
                            f"transformer_task is {task!r}, not sequence-classification")


def inspect_cross_encoder(source: str, directory: Path) -> SourceModel:
    """The cross-encoder in ``directory``, checked, with its fingerprint and maximum length.

    Raises:
        ArtifactError: naming ``source`` and what tritonop cannot serve.
    """
    config = _json(directory / "config.json", source)
    if not isinstance(config, dict):
        raise ArtifactError(f"model source {source}: it has no config.json")
    check_architecture(source, directory, config, trust_remote_code=False)
    _check_layout(source, directory, config)
    model_type = str(config.get("model_type", ""))
    positions = _positions(model_type, config)
    return SourceModel(
        source=source, directory=directory, fingerprint=fingerprint(directory),
        pooling="cls", dimension=int(config.get("hidden_size") or config.get("dim") or 0),
        max_sequence_length=_max_sequence_length(directory, source, positions),
        model_type=model_type, max_positions=positions)


def _wrapped(source: SourceModel) -> Any:
    import inspect

    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(source.directory), dtype=torch.float32).eval()
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise ArtifactError(f"model source {source.source}: transformers cannot load it as "
                            f"a sequence classifier: {err}") from None
    token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    class CrossEncoderLogit(torch.nn.Module):
        """Positional ``(input_ids, attention_mask, token_type_ids)`` -> the logit ``[n]``."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            extra = {"token_type_ids": token_type_ids} if token_types else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            logits = out[0] if isinstance(out, tuple) else out.logits
            return logits[:, 0]

    return CrossEncoderLogit().eval()


def _write_graph(module: Any, example: tuple, path: Path, fmt: str) -> None:
    import torch

    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(module, example, check_trace=False).save(str(path))
            return
        dynamic = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            module, example, str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic,
                          "token_type_ids": dynamic, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )


def _check_tokenizer(source: SourceModel, reference: Any, tokenizer: PairTokenizer) -> None:
    """Fail unless the written tokenizer gives transformers' pair ids and token types."""
    for query, document in _CHECK_PAIRS:
        ids, mask, types = tokenizer.encode([(query, document)])
        expected = reference(query, document, truncation=True,
                             max_length=source.max_sequence_length)
        real = mask[0].astype(bool)
        got_types = types[0][real].tolist()
        want_types = list(expected.get("token_type_ids") or [0] * len(expected["input_ids"]))
        if ids[0][real].tolist() != list(expected["input_ids"]) or (
                "token_type_ids" in expected and got_types != want_types):
            raise ArtifactError(
                f"model source {source.source}: its tokenizer, as tritonop runs it, encodes "
                f"the pair ({query[:40]!r}, {document[:40]!r}) differently from transformers; "
                "not serving it")


def export_cross_encoder(source: SourceModel, fmt: str, directory: Path) -> RerankManifest:
    """Export ``source`` as ``fmt`` into ``directory`` unless an identical export is there.

    Raises:
        ArtifactError: the export gives other logits than ``transformers`` (beyond
            :data:`TOLERANCE`), or the tokenizer other pairs.
    """
    import torch

    from tritonop.artifacts.export import _write_tokenizer

    try:
        existing = RerankManifest.read(directory)
        if (existing.fingerprint, existing.format) == (source.fingerprint, fmt):
            return existing
    except ArtifactError:
        pass
    config = _json(source.directory / "config.json", source.source) or {}
    directory.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, PAIR_TOKENIZER_FILE, *CROSS_ENCODER_FILES.values()):
        (directory / name).unlink(missing_ok=True)  # new files: these may be hard links
    reference = _write_tokenizer(source, directory / PAIR_TOKENIZER_FILE)
    tokenizer = PairTokenizer(directory / PAIR_TOKENIZER_FILE, source.max_sequence_length)
    _check_tokenizer(source, reference, tokenizer)
    module = _wrapped(source)
    example = tuple(torch.from_numpy(a) for a in tokenizer.encode(_CHECK_PAIRS[:2]))
    try:
        _write_graph(module, example, directory / CROSS_ENCODER_FILES[fmt], fmt)
    except Exception as err:  # torch.jit and torch.onnx raise many kinds; say which model
        raise ArtifactError(f"model source {source.source}: exporting its cross-encoder to "
                            f"{fmt} failed: {type(err).__name__}: {err}") from err
    manifest = RerankManifest(
        source=source.source, fingerprint=source.fingerprint, format=fmt,
        max_sequence_length=source.max_sequence_length,
        activation=activation(source.source, source.directory, config),
        model_type=source.model_type)
    manifest.write(directory)
    ids, mask, types = tokenizer.encode(_CHECK_PAIRS)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(a) for a in (ids, mask, types))).numpy()
    actual = load_graph(directory, threads=torch.get_num_threads())(ids, mask, types)
    difference = float(np.abs(actual - expected).max())
    if difference > TOLERANCE:
        (directory / MANIFEST_FILE).unlink()
        raise ArtifactError(f"exported {fmt} cross-encoder differs from {source.source} by "
                            f"{difference:.2e} (> {TOLERANCE:.0e}); not using it")
    manifest = dataclasses.replace(manifest, max_abs_diff=difference)
    manifest.write(directory)
    return manifest


def rerank_source(resource: Resource) -> ModelSource:
    """``spec.rerank.model`` as a :class:`ModelSource`."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec) and spec.rerank is not None
    model = spec.rerank.model
    return ModelSource.parse(
        model.source, s3_endpoint=model.s3.endpoint if model.s3 else None,
        s3_region=model.s3.region if model.s3 else None, sha256=model.sha256,
        allow_pickle=model.allow_pickle, base_dir=resource.base_dir)


def prepare_cross_encoder(resource: Resource, version_staging: Path, models_cache: Path, *,
                          progress: bool = False) -> RerankManifest | None:
    """Fetch and export the resource's cross-encoder into ``<staging>/rerank``; None when
    the resource has no ``spec.rerank``. An export of the same model and format in another
    version of the resource is reused (hard links) instead of exported again."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    if spec.rerank is None:
        return None
    source = rerank_source(resource)
    if progress and source.remote:
        with download_progress(resource, source) as report:
            fetched: Fetched = fetch(source, models_cache, progress=report,
                                     base_dir=resource.base_dir)
    else:
        fetched = fetch(source, models_cache, base_dir=resource.base_dir)
    model = inspect_cross_encoder(source.text, fetched.directory)
    if spec.rerank.model.max_sequence_length and \
            spec.rerank.model.max_sequence_length > model.max_positions:
        raise ArtifactError(
            f"{resource.name}: spec.rerank.model.maxSequenceLength "
            f"{spec.rerank.model.max_sequence_length} is more than model source {source.text} "
            f"has positions for ({model.max_positions} tokens)")
    target = version_staging / RERANK_FOLDER
    fmt = spec.rerank.model.format
    resource_dir = version_staging.parent
    for version in reversed(complete_versions(resource_dir)):
        candidate = resource_dir / version / RERANK_FOLDER
        try:
            found = RerankManifest.read(candidate)
        except ArtifactError:
            continue
        if (found.fingerprint, found.format) == (model.fingerprint, fmt) and not target.exists():
            link_tree(candidate, target)
            break
    manifest = export_cross_encoder(model, fmt, target)
    log.info("%s: %s cross-encoder %s ready (%s activation, max |difference| to the source "
             "model: %.2e)", resource.name, fmt, source.text, manifest.activation,
             manifest.max_abs_diff)
    return manifest
