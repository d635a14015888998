"""On-disk formats shared by the tools that write artifacts and the models that read them.

Two directories make an embedding-search deployment:

* the *model directory*: an exported encoder (``encoder.pt``, ``encoder.onnx``, or
  ``encoder.int8.onnx`` at ``precision: int8``), the tokenizer, and ``manifest.json``
  (:class:`ModelManifest`);
* the *index directory*: ``embeddings.safetensors`` (one L2-normalized row per corpus
  text), the texts in the same order (``texts.utf8`` and ``texts.offsets.npy``, see
  :mod:`tritonop_backend.text_column`; ``texts.jsonl`` in indexes written before), the
  columns of the record fields kept for filters (``field.<name>.*``, see
  :mod:`tritonop_backend.filters`) and ``manifest.json`` (:class:`IndexManifest`).

The manifests carry a fingerprint of the source model, so that an index is never
searched with query embeddings from another model or pooling: that mistake returns
plausible-looking nonsense instead of failing, so it is checked on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

MODEL_MANIFEST_KIND = "tritonop-encoder"
INDEX_MANIFEST_KIND = "tritonop-index"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
TEXTS_FILE = "texts.jsonl"
"""The texts of indexes written before ``TEXTS_BLOB_FILE``: one JSON string a line."""
TEXTS_BLOB_FILE = "texts.utf8"
TEXT_OFFSETS_FILE = "texts.offsets.npy"
ENCODER_FILES = {"torchscript": "encoder.pt", "onnx": "encoder.onnx"}
INT8_ENCODER_FILE = "encoder.int8.onnx"
"""The encoder of ``precision: int8``: the ONNX export with its weights quantized."""


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, or does not fit the others."""


_M = TypeVar("_M", bound="_Manifest")


@dataclass(frozen=True)
class _Manifest:
    """A JSON manifest with a kind and version, so stale formats fail loudly."""

    def write(self, directory: Path) -> None:
        body = {"kind": self._kind(), "version": MANIFEST_VERSION, **dataclasses.asdict(self)}
        _replace_text(Path(directory) / MANIFEST_FILE,
                      json.dumps(body, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls: type[_M], directory: Path) -> _M:
        path = Path(directory) / MANIFEST_FILE
        try:
            body: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{path} does not exist; {cls._hint()}") from None
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path} is not valid JSON ({err}); {cls._hint()}") from None
        if body.pop("kind", None) != cls._kind() or body.pop("version", None) != MANIFEST_VERSION:
            raise ArtifactError(
                f"{path} is not a {cls._kind()} v{MANIFEST_VERSION} manifest; {cls._hint()}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})

    @staticmethod
    def _kind() -> str:
        raise NotImplementedError

    @staticmethod
    def _hint() -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelManifest(_Manifest):
    """What ``tritonop export`` produced, and the model defaults it read from the source.

    Attributes:
        source: where the model came from, as the resource named it.
        fingerprint: hash of the source weights, config and tokenizer.
        format: ``torchscript`` or ``onnx``.
        dimension: embedding width.
        pooling: the source model's own pooling mode (sentence-transformers config).
        max_sequence_length: the source model's own maximum sequence length.
        max_abs_diff: largest difference between exported and source outputs at export.
        normalize: whether the source model ends in a ``Normalize`` module.
        query_prompt: the source model's own prompt for queries ("" for none).
        document_prompt: the source model's own prompt for corpus texts ("" for none).
        model_type: the ``model_type`` of the source's ``config.json`` (for a reader).
        precision: ``float32``, or ``int8``: the encoder served is :data:`INT8_ENCODER_FILE`.
        quantization: for ``int8``, how it was quantized and its measured cosine to the
            float32 export (``cosine_min``, ``cosine_mean`` over ``cosine_texts`` corpus
            texts, see ``tritonop.artifacts.quantize``); empty for ``float32``.
        packed: the encoder reads ``attention_mask`` as segment ids, so several texts
            can share a row (``tritonop_backend.encoder.encode_ragged``).
        packing_checked: packing was tried at export, and ``packed`` says whether the
            packed graph held; False in exports made before tritonop packed.

    The last eight have defaults so that manifests written before them still read; such an
    export came from all-MiniLM-L6-v2-like models, which normalize and have no prompts.
    """

    source: str
    fingerprint: str
    format: str
    dimension: int
    pooling: str
    max_sequence_length: int
    max_abs_diff: float
    normalize: bool = True
    query_prompt: str = ""
    document_prompt: str = ""
    model_type: str = ""
    precision: str = "float32"
    quantization: dict[str, Any] = dataclasses.field(default_factory=dict)
    packed: bool = False
    packing_checked: bool = False

    @property
    def encoder_file(self) -> str:
        if self.precision == "int8":
            return INT8_ENCODER_FILE
        return ENCODER_FILES[self.format]

    @staticmethod
    def _kind() -> str:
        return MODEL_MANIFEST_KIND

    @staticmethod
    def _hint() -> str:
        return "export the model again with `tritonop export`"


@dataclass(frozen=True)
class IndexManifest(_Manifest):
    """What ``tritonop index build`` produced, and with which model settings.

    ``document_prompt`` is the text put before every corpus text when it was embedded
    (default ``""`` for indexes written before prompts existed, which used none).
    ``fields`` names the record fields kept beside the vectors (name -> type, see
    :mod:`tritonop_backend.filters`), empty for an index that keeps none.
    ``index`` describes the approximate index built beside the vectors (empty: none, the
    exact scan): its settings (:class:`tritonop_backend.ann.HnswSettings`), the library,
    its build time, and ``recall_at_10`` measured against the exact index on
    ``recall_queries`` of the corpus's own vectors.
    """

    model_source: str
    model_fingerprint: str
    pooling: str
    max_sequence_length: int
    dimension: int
    count: int
    corpus_sha256: str
    document_prompt: str = ""
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    index: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def index_kind(self) -> str:
        """``exact`` or ``hnsw``."""
        return str(self.index.get("kind", "exact"))

    @staticmethod
    def _kind() -> str:
        return INDEX_MANIFEST_KIND

    @staticmethod
    def _hint() -> str:
        return "build the index again with `tritonop index build`"

    def check_compatible(self, model: ModelManifest, pooling: str, max_length: int,
                         document_prompt: str | None = None) -> None:
        """Fail unless queries embedded with ``model``/``pooling`` are comparable to this index.

        ``document_prompt``, where given, is the one the corpus should have been embedded
        with; None skips that check.

        Raises:
            ArtifactError: naming each setting that differs and how to fix it.
        """
        problems = []
        if self.model_fingerprint != model.fingerprint:
            problems.append(
                f"it was built with model {self.model_source} (fingerprint "
                f"{self.model_fingerprint}) but queries use {model.source} (fingerprint "
                f"{model.fingerprint})"
            )
        if self.pooling != pooling:
            problems.append(f"it was built with {self.pooling} pooling but queries use {pooling}")
        if self.max_sequence_length != max_length:
            problems.append(
                f"it was built with max sequence length {self.max_sequence_length} "
                f"but queries use {max_length}"
            )
        if self.dimension != model.dimension:
            problems.append(f"it has dimension {self.dimension}, the model {model.dimension}")
        if document_prompt is not None and self.document_prompt != document_prompt:
            problems.append(f"its texts were embedded with document prompt "
                            f"{self.document_prompt!r} but this service's is {document_prompt!r}")
        if problems:
            raise ArtifactError(
                "the corpus index does not match the model: " + "; ".join(problems) + "; "
                + self._hint()
            )


def render_prompt(value: str | None) -> str:
    """A prompt as a model-config parameter: ``auto`` (the model's own) or a JSON string.

    JSON, because ``""`` (no prompt) must differ from unset, and a prompt may itself be
    the word ``auto``.
    """
    return "auto" if value is None else json.dumps(value)


def resolve_prompt(value: str, default: str) -> str:
    """The prompt a :func:`render_prompt` parameter stands for, ``default`` for ``auto``."""
    if value in ("", "auto"):
        return default
    prompt = json.loads(value)
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt parameter must be 'auto' or a JSON string, got {value!r}")
    return prompt


def resolve_setting(value: str, default: int | str) -> Any:
    """Resolve a rendered ``"auto"`` parameter to the model's own default.

    Rendering is pure and cannot read the model, so settings left unset in the resource
    reach the models as ``"auto"`` and are resolved here against the model manifest.
    """
    if value in ("", "auto"):
        return default
    if isinstance(default, bool):
        if value not in ("true", "false"):
            raise ValueError(f"expected 'true', 'false' or 'auto', got {value!r}")
        return value == "true"
    return type(default)(value)


VERSION_FILE = "version.json"
VERSION_MANIFEST_KIND = "tritonop-artifacts-version"


@dataclass(frozen=True)
class VersionManifest(_Manifest):
    """The marker of a complete artifacts version folder, written last.

    A version folder (``<root>/<resource>/<fingerprint>/``) is built in a staging folder
    and renamed into place, with this file written before the rename, so a folder that
    has it is complete. Pods compare its fingerprint with the one rendered into their
    model config and refuse to start on a mismatch: an index built from another corpus
    or model returns plausible nonsense instead of failing.

    Attributes:
        fingerprint: what the folder was built for (``tritonop.artifacts.versions``).
        inputs: the settings the fingerprint hashes, for a reader of the volume.
        corpus_sha256: the content hash of the corpus that was embedded.
    """

    fingerprint: str
    inputs: dict[str, str]
    corpus_sha256: str

    @classmethod
    def read(cls, directory: Path) -> VersionManifest:  # type: ignore[override]
        path = Path(directory) / VERSION_FILE
        try:
            body: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{path}: {err}") from None
        if body.get("kind") != VERSION_MANIFEST_KIND:
            raise ArtifactError(f"{path} is not a {VERSION_MANIFEST_KIND} manifest")
        return cls(fingerprint=body["fingerprint"], inputs=body.get("inputs", {}),
                   corpus_sha256=body.get("corpus_sha256", ""))

    def write(self, directory: Path) -> None:
        body = {"kind": VERSION_MANIFEST_KIND, "version": MANIFEST_VERSION,
                **dataclasses.asdict(self)}
        _replace_text(Path(directory) / VERSION_FILE,
                      json.dumps(body, indent=2, sort_keys=True) + "\n")


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` as a new file put in place at once: never half written, and never
    through a hard link that another version's folder shares."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def check_version(version_dir: Path, expected: str) -> None:
    """Fail unless ``version_dir`` is a complete artifacts version built for ``expected``.

    Called by every model that reads artifacts, before loading anything, so that a pod
    whose volume lacks its version (the prepare Job has not run, or was for another
    spec) fails its startup with both fingerprints named, instead of serving a stale index.

    Raises:
        ArtifactError: naming the expected fingerprint and the one(s) found.
    """
    version_dir = Path(version_dir)
    try:
        found = VersionManifest.read(version_dir)
    except ArtifactError:
        parent = version_dir.parent
        others = sorted(p.name for p in parent.iterdir()
                        if (p / VERSION_FILE).is_file()) if parent.is_dir() else []
        raise ArtifactError(
            f"artifacts version {expected} is missing: {version_dir} holds no complete "
            f"version (complete versions found on the volume: {', '.join(others) or 'none'}); "
            f"this pod's config expects fingerprint {expected}: let the prepare Job finish, "
            "or run `tritonop prepare` for this spec"
        ) from None
    if found.fingerprint != expected:
        raise ArtifactError(
            f"artifacts in {version_dir} were built for fingerprint {found.fingerprint}, but "
            f"this pod's config expects fingerprint {expected}: prepare this spec's artifacts"
        )
