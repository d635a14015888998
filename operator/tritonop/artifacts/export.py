"""Exporting a sentence-transformers encoder to TorchScript or ONNX, checked against the source.

The export is the encoder alone (token ids and mask in, ``last_hidden_state`` out);
tokenization and pooling stay in their own models, so one export serves every pooling
mode. Architectures differ in what else they take: BERT has ``token_type_ids`` (zeros for
one text, as its tokenizer gives), DistilBERT, MPNet and ModernBERT have none, RoBERTa,
XLM-RoBERTa and MPNet derive position ids from the token ids themselves (counting from
the padding id); the exported graph takes the two common inputs and does the rest
inside, so every stage after it is the same for every architecture.

Where the architecture takes position ids and a prepared attention mask (all but
ModernBERT, which unpads by itself), the graph's ``attention_mask`` is read as segment
ids: several texts can share one row (``1 1 1 2 2 0``: two texts and a pad), each
attending only to its own tokens with positions counted from its own start, so a batch of
short queries runs as one row of their real tokens instead of a rectangle padded to the
longest (a plain 0/1 mask is the case of one text per row). The manifest says ``packed``
where it does.

After writing, the exported file is loaded back and run on texts of other lengths and
batch sizes than the trace used, padded and (where packed) several to a row, and
compared with the source model in ``transformers``: an export that drifts fails here
rather than in production. A packed export that does not match is written again
unpacked.

The tokenizer is written as ``transformers`` builds it for the model's tokenizer class
(which, since transformers 5, is not always the folder's ``tokenizer.json`` as it
stands: the class rebuilds normalizer and pre-tokenizer from its own code), plus the
lower-casing a ``sentence_bert_config.json`` asks for, since that is what
sentence-transformers tokenizes with; the written file is then checked to give the same
token ids as ``transformers`` on texts with and without the prompts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonop.artifacts.encoders import POSITIONS_AFTER_PADDING
from tritonop.artifacts.sources import SourceModel
from tritonop_backend.artifacts import (
    ENCODER_FILES,
    INT8_ENCODER_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    ModelManifest,
)
from tritonop_backend.encoder import encode_ragged, load_encoder
from tritonop_backend.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Largest tolerated |exported - source| over real tokens; float32 BERT exports sit
# around 1e-6, a broken export (wrong mask handling, fixed shapes) is off by > 1e-1.
TOLERANCE = 1e-4
_TRACE_TEXTS = ["a short query", "a longer sentence that makes the batch ragged and padded"]
_CHECK_TEXTS = [
    "storm",
    "Zürich, 北京 and São Paulo: non-ASCII text is tokenized too",
    "the quick brown fox jumps over the lazy dog " * 4,
    "UPPER case, accents (é, ñ), digits 0123 and    spaces",
]


@dataclass(frozen=True)
class ExportResult:
    manifest: ModelManifest
    directory: Path
    skipped: bool


# Architectures that take position ids and a prepared [rows, 1, length, length] mask as
# given (where their first position is: tritonop.artifacts.encoders.POSITIONS_AFTER_PADDING).
_PACKABLE = frozenset({"bert", "distilbert", "roberta", "xlm-roberta", "mpnet"})


def _load(source: SourceModel):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(
            str(source.directory), trust_remote_code=source.trust_remote_code,
            dtype=torch.float32).eval()
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise ArtifactError(f"model source {source.source}: transformers cannot load its "
                            f"{source.model_type!r} model: {err}") from None


def _wrapped(model, packed: bool):  # type: ignore[no-untyped-def]
    """``model`` as positional ``(input_ids, attention_mask)`` -> ``last_hidden_state``;
    ``packed``: with ``attention_mask`` read as segment ids (see the module's doc)."""
    import inspect

    import torch

    token_types = "token_type_ids" in inspect.signature(model.forward).parameters
    first_position = 0
    if model.config.model_type in POSITIONS_AFTER_PADDING:  # fairseq's: after the padding id
        first_position = int(model.config.pad_token_id) + 1

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            extra = {"token_type_ids": torch.zeros_like(input_ids)} if token_types else {}
            if packed:
                same = attention_mask[:, :, None] == attention_mask[:, None, :]
                # Texts are contiguous: a token's position is how many of its text's precede it.
                # Padding (segment 0) takes the first position: counted like a text, a
                # wide row's padding would run past the position table.
                earlier = torch.ones_like(same).tril(-1) & (attention_mask != 0)[:, :, None]
                extra["position_ids"] = (same & earlier).sum(-1) + first_position
                # zeros_like: on the input's device (torch.zeros would trace in the CPU).
                attention_mask = torch.zeros_like(same, dtype=torch.float32).masked_fill(
                    ~same, torch.finfo(torch.float32).min)[:, None]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return out[0] if isinstance(out, tuple) else out.last_hidden_state

    return Encoder().eval()


def _write_tokenizer(source: SourceModel, path: Path) -> Any:
    """Write the tokenizer sentence-transformers uses for ``source``; returns transformers'."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    try:
        reference = AutoTokenizer.from_pretrained(
            str(source.directory), trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise ArtifactError(f"model source {source.source}: transformers cannot load its "
                            f"tokenizer: {err}") from None
    backend = getattr(reference, "backend_tokenizer", None)
    if backend is None:
        raise ArtifactError(f"model source {source.source}: its tokenizer "
                            f"({type(reference).__name__}) has no fast (tokenizers) form, "
                            "which is what tritonop runs")
    if source.lowercase and "Lowercase" not in str(backend.normalizer):
        # sentence-transformers' do_lower_case: a Lowercase normalizer before the model's own.
        rest = [] if backend.normalizer is None else [backend.normalizer]
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
    backend.save(str(path))
    return reference


def _check_tokenizer(source: SourceModel, reference: Any, path: Path) -> None:
    """Fail unless the written tokenizer gives transformers' ids (prompts included)."""
    for prompt in {"", source.query_prompt, source.document_prompt}:
        ours = TextTokenizer(path, source.max_sequence_length, prompt)
        for text in _CHECK_TEXTS:
            ids, _ = ours.encode([text])
            expected = reference(prompt + text, truncation=True,
                                 max_length=source.max_sequence_length)["input_ids"]
            if ids[0].tolist() != list(expected):
                raise ArtifactError(
                    f"model source {source.source}: its tokenizer, as tritonop runs it, "
                    f"gives other token ids than transformers for {prompt + text!r} "
                    f"({ids[0].tolist()} != {list(expected)}); not serving it")


def _scriptable_type_names(module) -> None:  # type: ignore[no-untyped-def]
    """Make every submodule's class importable by name in TorchScript's grammar.

    A saved TorchScript module names each submodule's type by its Python module path,
    and parses that back on load. transformers imports a model's own code (trust_remote_
    code) as ``transformers_modules.<folder>.<hash>.<file>``, and a hash that starts with
    a digit is no identifier: the file saves and then never loads. The classes are this
    process's copies of the model's code, so renaming their module path changes nothing
    else.
    """
    import re

    for submodule in module.modules():
        cls = type(submodule)
        parts = cls.__module__.split(".")
        safe = [re.sub(r"\W", "_", part) for part in parts]
        safe = [f"_{part}" if part[:1].isdigit() else part for part in safe]
        if safe != parts:
            cls.__module__ = ".".join(safe)


def _write_encoder(module, example: tuple, path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        if fmt == "torchscript":
            _scriptable_type_names(module)
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


def _max_difference(reference, directory: Path, tokenizer: TextTokenizer,  # type: ignore[no-untyped-def]
                    manifest: ModelManifest) -> float:
    """Largest |exported - source| over real tokens, padded and (if packed) packed."""
    import torch

    encoder = load_encoder(directory, threads=torch.get_num_threads(), manifest=manifest)
    ids, mask = tokenizer.encode(_CHECK_TEXTS)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    real = mask.astype(bool)
    differences = [np.abs(encoder(ids, mask) - expected)[real].max()]
    if encoder.packed:  # each text a request of its own: they share a row
        lengths = mask.sum(axis=1)
        texts = [(ids[i : i + 1, :n], mask[i : i + 1, :n]) for i, n in enumerate(lengths)]
        for i, hidden in enumerate(encode_ragged(encoder, texts)):
            differences.append(np.abs(hidden[0] - expected[i, : lengths[i]]).max())
    return float(max(differences))


def _write_checked(module, reference, tokenizer: TextTokenizer, manifest: ModelManifest,  # type: ignore[no-untyped-def]
                   directory: Path, source: SourceModel) -> float:
    """Write ``module`` as the manifest's format; its largest difference from ``reference``.

    Raises ArtifactError where the export itself fails, and ValueError where a packed
    export differs by more than :data:`TOLERANCE` (the caller then exports it unpacked).
    """
    import torch

    example = tuple(torch.from_numpy(a) for a in tokenizer.encode(_TRACE_TEXTS))
    fmt = manifest.format
    try:
        _write_encoder(module, example, directory / ENCODER_FILES[fmt], fmt)
    except Exception as err:  # torch.jit and torch.onnx raise many kinds; say which model
        raise ArtifactError(f"model source {source.source}: exporting its "
                            f"{source.model_type!r} encoder to {fmt} failed: "
                            f"{type(err).__name__}: {err}") from err
    difference = _max_difference(reference, directory, tokenizer, manifest)
    if manifest.packed and difference > TOLERANCE:
        raise ValueError(f"packed export differs by {difference:.2e}")
    return difference


def serves(existing: ModelManifest, fingerprint: str, fmt: str, precision: str) -> bool:
    """Whether an export already there serves this model, format and precision as it is.

    A float32 ONNX export also serves ``int8``: quantizing it
    (:mod:`tritonop.artifacts.quantize`) adds a file and replaces the manifest; an int8
    one keeps no float32 encoder, so it never serves ``float32``. An unpacked export of
    an architecture that packs, made before tritonop packed, is exported again: it would
    serve the same embeddings, a third slower (one whose packed graph failed its check is
    kept: it would fail again).
    """
    return (existing.fingerprint, existing.format) == (fingerprint, fmt) and \
        existing.precision in (precision, "float32") and \
        (existing.packed or existing.packing_checked or existing.model_type not in _PACKABLE)


def export_model(
    source: SourceModel, fmt: str, directory: Path, *, force: bool = False,
    precision: str = "float32",
) -> ExportResult:
    """Export ``source`` as ``fmt`` into ``directory`` unless an export there serves it.

    Args:
        precision: what the caller serves: an existing export is kept where it
            :func:`serves` it. The export itself is always float32; ``int8`` is made from
            it afterwards (:func:`tritonop.artifacts.quantize.quantize_encoder`).

    Raises:
        ArtifactError: the exported encoder differs from the source by more than
            :data:`TOLERANCE`.
    """
    if fmt not in ENCODER_FILES:
        raise ArtifactError(f"format must be one of {sorted(ENCODER_FILES)}, got {fmt!r}")
    if precision == "int8" and fmt != "onnx":
        raise ArtifactError(f"precision int8 needs format onnx, got {fmt!r}")
    directory = Path(directory)
    if not force:
        try:
            existing = ModelManifest.read(directory)
        except ArtifactError:
            existing = None
        if existing and serves(existing, source.fingerprint, fmt, precision):
            return ExportResult(existing, directory, skipped=True)
    directory.mkdir(parents=True, exist_ok=True)
    # New files, never rewritten in place: the folder may hold hard links to another
    # version's files (a seeded or torn version linked into staging by prepare).
    for name in (MANIFEST_FILE, INT8_ENCODER_FILE, TOKENIZER_FILE, *ENCODER_FILES.values()):
        (directory / name).unlink(missing_ok=True)
    reference = _write_tokenizer(source, directory / TOKENIZER_FILE)
    _check_tokenizer(source, reference, directory / TOKENIZER_FILE)
    tokenizer = TextTokenizer(directory / TOKENIZER_FILE, source.max_sequence_length)
    model = _load(source)
    plain = _wrapped(model, packed=False)
    manifest = ModelManifest(
        source=source.source, fingerprint=source.fingerprint, format=fmt,
        dimension=source.dimension, pooling=source.pooling,
        max_sequence_length=source.max_sequence_length, max_abs_diff=0.0,
        normalize=source.normalize, query_prompt=source.query_prompt,
        document_prompt=source.document_prompt, model_type=source.model_type,
    )
    difference = None
    if source.model_type in _PACKABLE:
        manifest = dataclasses.replace(manifest, packing_checked=True)
        packed = dataclasses.replace(manifest, packed=True)
        try:
            difference = _write_checked(_wrapped(model, packed=True), plain, tokenizer, packed,
                                        directory, source)
            manifest = packed
        except Exception as err:  # whatever broke the packed graph, the plain one is the contract
            log.warning("model source %s: its packed %s encoder failed its check (%s: %s); "
                        "exporting it unpacked, one text a row", source.source,
                        source.model_type, type(err).__name__, err)
    if difference is None:
        difference = _write_checked(plain, plain, tokenizer, manifest, directory, source)
    if difference > TOLERANCE:
        raise ArtifactError(f"exported {fmt} encoder differs from {source.source} by "
                            f"{difference:.2e} (> {TOLERANCE:.0e}); not using it")
    manifest = dataclasses.replace(manifest, max_abs_diff=difference)
    manifest.write(directory)
    return ExportResult(manifest, directory, skipped=False)
