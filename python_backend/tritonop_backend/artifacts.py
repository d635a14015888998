"""On-disk formats shared by the tools that write artifacts and the models that read them.

Two directories make an embedding-search deployment:

* the *model directory*: an exported encoder (``encoder.pt`` or ``encoder.onnx``), the
  tokenizer, and ``manifest.json`` (:class:`ModelManifest`);
* the *index directory*: ``embeddings.safetensors`` (one L2-normalized row per corpus
  text), ``texts.jsonl`` (one JSON string per line, same order) and ``manifest.json``
  (:class:`IndexManifest`).

The manifests carry a fingerprint of the source model, so that an index is never
searched with query embeddings from another model or pooling: that mistake returns
plausible-looking nonsense instead of failing, so it is checked on load.
"""

from __future__ import annotations

import dataclasses
import json
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
ENCODER_FILES = {"torchscript": "encoder.pt", "onnx": "encoder.onnx"}


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, or does not fit the others."""


_M = TypeVar("_M", bound="_Manifest")


@dataclass(frozen=True)
class _Manifest:
    """A JSON manifest with a kind and version, so stale formats fail loudly."""

    def write(self, directory: Path) -> None:
        body = {"kind": self._kind(), "version": MANIFEST_VERSION, **dataclasses.asdict(self)}
        (directory / MANIFEST_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")

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
    """

    source: str
    fingerprint: str
    format: str
    dimension: int
    pooling: str
    max_sequence_length: int
    max_abs_diff: float

    @property
    def encoder_file(self) -> str:
        return ENCODER_FILES[self.format]

    @staticmethod
    def _kind() -> str:
        return MODEL_MANIFEST_KIND

    @staticmethod
    def _hint() -> str:
        return "export the model again with `tritonop export`"


@dataclass(frozen=True)
class IndexManifest(_Manifest):
    """What ``tritonop index build`` produced, and with which model settings."""

    model_source: str
    model_fingerprint: str
    pooling: str
    max_sequence_length: int
    dimension: int
    count: int
    corpus_sha256: str

    @staticmethod
    def _kind() -> str:
        return INDEX_MANIFEST_KIND

    @staticmethod
    def _hint() -> str:
        return "build the index again with `tritonop index build`"

    def check_compatible(self, model: ModelManifest, pooling: str, max_length: int) -> None:
        """Fail unless queries embedded with ``model``/``pooling`` are comparable to this index.

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
        if problems:
            raise ArtifactError(
                "the corpus index does not match the model: " + "; ".join(problems) + "; "
                + self._hint()
            )


def resolve_setting(value: str, default: int | str) -> Any:
    """Resolve a rendered ``"auto"`` parameter to the model's own default.

    Rendering is pure and cannot read the model, so settings left unset in the resource
    reach the models as ``"auto"`` and are resolved here against the model manifest.
    """
    if value in ("", "auto"):
        return default
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
        (Path(directory) / VERSION_FILE).write_text(
            json.dumps(body, indent=2, sort_keys=True) + "\n")


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
