"""Reading tritonop custom resources from YAML into validated objects."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import ValidationError

from tritonop import API_GROUP, API_VERSION
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec, describe_errors

API = f"{API_GROUP}/{API_VERSION}"
CORPUS_SHA256_ANNOTATION = f"{API_GROUP}/corpus-sha256"
MODEL_REVISION_ANNOTATION = f"{API_GROUP}/model-revision"
SPECS: dict[str, type[EmbeddingSearchSpec] | type[LLMServiceSpec]] = {
    "EmbeddingSearch": EmbeddingSearchSpec,
    "LLMService": LLMServiceSpec,
}
# Children get suffixes ("-triton", "_tokenizer"), and Service names must be DNS-1035
# labels of at most 63 characters: leave them room.
MAX_NAME_LENGTH = 50
NAME_LIMIT = 63  # Kubernetes names (DNS-1035 labels) and label values


def max_name_length(kind: str) -> int:
    """The longest ``metadata.name`` of ``kind`` whose derived names and labels fit in 63.

    The binding ones are the pod label ``<kind>.<name>`` (render/kubernetes.py's
    ``selector_labels``) and the ``<name>-triton`` child names. The CRD schema checks it
    with CEL on ``metadata.name``, so the API server refuses the resource at once, rather
    than a child later with a 422 the user never sees.
    """
    return min(MAX_NAME_LENGTH, NAME_LIMIT - max(len("-triton"), len(kind) + 1))
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Spec = Union[EmbeddingSearchSpec, LLMServiceSpec]


class ResourceError(ValueError):
    """A resource that cannot be served, with every problem named by its field path."""


@dataclass(frozen=True)
class Resource:
    """One validated custom resource.

    Attributes:
        kind: ``EmbeddingSearch`` or ``LLMService``.
        name: ``metadata.name``; also the name of the Triton model clients call.
        namespace: ``metadata.namespace`` (``default`` when absent).
        spec: the validated spec.
        base_dir: directory that relative paths in the spec are resolved against
            (the YAML file's directory); ``None`` for resources read from a cluster.
        corpus_sha256: the corpus content hash the operator rendered with (the
            ``serving.tritonop.dev/corpus-sha256`` annotation of the resource document it
            hands to prepare), so that prepare names the very version the pods expect;
            ``None``: hash the corpus here (see ``tritonop.artifacts.versions``).
        model_revision: the exact revision of a remote ``spec.model.source`` (a commit sha, the
            hash of an S3 listing, an https file's sha256) that the artifacts are built from,
            once resolved: by prepare before ``tritonop serve`` renders, or carried in the
            resource document as the ``serving.tritonop.dev/model-revision`` annotation, so
            that prepare downloads the revision the render named. ``None``: not resolved.
    """

    kind: str
    name: str
    namespace: str
    spec: Spec
    base_dir: Path | None = None
    corpus_sha256: str | None = None
    model_revision: str | None = None

    def resolve_path(self, value: str) -> Path:
        """A path from the spec, made absolute against :attr:`base_dir`."""
        path = Path(value).expanduser()
        if path.is_absolute() or self.base_dir is None:
            return path
        return (self.base_dir / path).resolve()

    def resolve_inside(self, value: str, field: str) -> Path:
        """A relative path from the spec, resolved inside :attr:`base_dir`, symlinks too.

        The operator resolves a tenant's relative paths against the examples folder of its
        own image and reads what they name: a symlink there that leads elsewhere (or a
        ``..`` that reached the operator unchecked) would let a resource read any file of
        the operator's, and a hash of it would land in a ConfigMap the tenant can read.

        Raises:
            ResourceError: naming ``field`` when the path leads outside the folder.
        """
        assert self.base_dir is not None and not Path(value).is_absolute()
        base = Path(os.path.realpath(self.base_dir))
        path = Path(os.path.realpath(base / value))
        if not path.is_relative_to(base):
            raise ResourceError(f"{field}: {value!r} leads outside the folder relative paths "
                                f"resolve against ({base}); name a file inside it")
        return path


def parse_resource(body: Mapping[str, Any], base_dir: Path | None = None) -> Resource:
    """Validate one resource document.

    Raises:
        ResourceError: listing each problem as ``<field path>: <what is wrong>``.
    """
    if not isinstance(body, Mapping):
        raise ResourceError("a resource must be a YAML mapping")
    kind = body.get("kind")
    if body.get("apiVersion") != API:
        raise ResourceError(f"apiVersion: must be {API}, got {body.get('apiVersion')!r}")
    if kind not in SPECS:
        raise ResourceError(f"kind: must be one of {sorted(SPECS)}, got {kind!r}")
    metadata = body.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > max_name_length(kind):
        raise ResourceError(
            f"metadata.name: {name!r} must be lowercase letters, digits and '-', start "
            f"with a letter, end with a letter or digit, and be at most "
            f"{max_name_length(kind)} characters"
        )
    try:
        spec = SPECS[kind].model_validate(body.get("spec") or {})
    except ValidationError as err:
        raise ResourceError(f"{kind} {name}:\n{describe_errors(err)}") from None
    annotations = metadata.get("annotations") or {}
    pinned, revision = (annotations.get(key) for key in (CORPUS_SHA256_ANNOTATION,
                                                          MODEL_REVISION_ANNOTATION))
    return Resource(kind, name, metadata.get("namespace") or "default", spec, base_dir,
                    pinned if isinstance(pinned, str) else None,
                    revision if isinstance(revision, str) and revision else None)


def load_resources(path: Path) -> list[Resource]:
    """Every resource in a YAML file (several documents separated by ``---`` are fine)."""
    path = Path(path)
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise ResourceError(f"{path}: not valid YAML: {err}") from None
    if not documents:
        raise ResourceError(f"{path}: no resources in this file")
    resources = []
    for doc in documents:
        try:
            resources.append(parse_resource(doc, path.parent.resolve()))
        except ResourceError as err:
            raise ResourceError(f"{path}: {err}") from None
    return resources


def iter_resources(paths: list[Path]) -> Iterator[Resource]:
    """Resources from several files, refusing two with the same kind and name."""
    seen: set[tuple[str, str]] = set()
    for path in paths:
        for resource in load_resources(path):
            key = (resource.namespace, resource.name)
            if key in seen:
                raise ResourceError(
                    f"{path}: {resource.name} is defined twice; names share one Triton server"
                )
            seen.add(key)
            yield resource
