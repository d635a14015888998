"""A permission problem on the artifacts volume is one line naming the folder, never a
traceback. (The pods tier shows the real thing: a hostPath that a kubelet made root 0755,
prepared as uid 1000; here the refusal is simulated, since these tests may run as root.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tritonop.artifacts import prepare as prepare_module
from tritonop.cli import main
from tritonop.resources import parse_resource
from tritonop_backend.artifacts import ArtifactError

ROOT = Path(__file__).resolve().parents[2]


def news(tmp_path: Path):
    return parse_resource({
        "apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "EmbeddingSearch",
        "metadata": {"name": "news"}, "spec": {"corpus": {"source": "c.jsonl"}}}, tmp_path)


def refuse(monkeypatch, target: str, path: Path) -> None:
    def refused(*_, **__):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(prepare_module, target, refused)


def test_a_folder_inside_the_root_that_refuses_is_named_with_its_owner(tmp_path, monkeypatch):
    (tmp_path / "news").mkdir(mode=0o750)
    refuse(monkeypatch, "prepare_embedding_search", tmp_path / "news" / ".staging-x")
    with pytest.raises(ArtifactError) as failed:
        prepare_module.prepare([news(tmp_path)], tmp_path)
    info = (tmp_path / "news").stat()
    assert str(failed.value).startswith(
        f"{tmp_path / 'news'} (in the artifacts folder {tmp_path}) is not writable by uid "
        f"{os.getuid()} (owned by uid {info.st_uid}, mode 0o750); give that user the folder")
    assert "\n" not in str(failed.value)


def test_a_root_that_refuses_the_lock_is_named(tmp_path, monkeypatch):
    def no_lock(path, *_, **__):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr("builtins.open", no_lock)
    with pytest.raises(ArtifactError, match=f"^the artifacts folder {tmp_path} is not writable "
                       f"by uid {os.getuid()} \\(owned by uid"):
        with prepare_module.locked(tmp_path, "news"):
            pass


def test_the_cli_prints_one_error_line(tmp_path, monkeypatch, capsys):
    resource = tmp_path / "news.yaml"
    resource.write_text("apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
                        "metadata: {name: news}\nspec: {corpus: {source: c.jsonl}}\n")
    refuse(monkeypatch, "prepare_embedding_search", tmp_path / "art" / "news")
    assert main(["prepare", "-f", str(resource), "--artifacts-root", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'art'}" in err and "is not writable" in err
