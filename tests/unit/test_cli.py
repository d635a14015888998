"""The tritonop command line: manifests, repositories, CRDs, and errors a person can act on."""

from __future__ import annotations

from pathlib import Path

import yaml

from tritonop.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_render_prints_the_manifests_the_operator_applies(capsys):
    assert main(["render", "-f", str(ROOT / "examples" / "news-search.yaml")]) == 0
    kinds = [doc["kind"] for doc in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ServiceAccount", "ConfigMap", "Service", "Deployment", "NetworkPolicy"]


def test_render_writes_a_model_repository(tmp_path, capsys):
    assert main(["render", "-f", str(ROOT / "examples" / "chat.yaml"),
                 "--repository", str(tmp_path)]) == 0
    assert (tmp_path / "chat" / "config.pbtxt").exists()
    assert (tmp_path / "chat" / "1" / "model.py").exists()


def test_crds_command_writes_both_crds(tmp_path, capsys):
    assert main(["crds", "--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embeddingsearches.serving.tritonop.dev.yaml", "llmservices.serving.tritonop.dev.yaml"]


def test_a_bad_resource_file_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
                   "metadata: {name: news}\nspec: {corpus: {source: c.txt}, "
                   "search: {maxTopK: -3}}\n")
    for command in (["serve", str(bad)], ["render", "-f", str(bad)],
                    ["prepare", "-f", str(bad)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "bad.yaml" in err and "spec.search.maxTopK" in err
        assert "Traceback" not in err


def test_a_missing_corpus_is_named(tmp_path, capsys):
    spec = tmp_path / "search.yaml"
    spec.write_text("apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
                    "metadata: {name: news}\nspec: {corpus: {source: nowhere.jsonl}}\n")
    assert main(["prepare", "-f", str(spec), "--artifacts-root", str(tmp_path / "a")]) == 2
    assert "nowhere.jsonl does not exist" in capsys.readouterr().err
