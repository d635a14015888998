"""Versioned artifacts: the fingerprint, atomic version folders, racing prepares, clean-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tritonop.artifacts.prepare import locked, prepare
from tritonop.artifacts.versions import (
    STAGING_PREFIX,
    complete_versions,
    remove_versions,
    resource_fingerprint,
    version_dir,
)
from tritonop.resources import parse_resource
from tritonop_backend.artifacts import (
    VERSION_FILE,
    ArtifactError,
    IndexManifest,
    VersionManifest,
    check_version,
)
from tritonop_backend.stages import SearchStage

API = "serving.tritonop.dev/v1alpha1"
TEXTS = ["storm warning for the north sea", "a text editor for programmers",
         "recipes with lentils", "football results of the weekend", "the price of copper"]


def body(source: str = "corpus.txt", **spec) -> dict:
    return {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "news"},
            "spec": {"corpus": {"source": source}, **spec}}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    return tmp_path


def fingerprint(folder: Path, **spec) -> str:
    return resource_fingerprint(parse_resource(body(**spec), folder))


@pytest.mark.parametrize("change", [
    {"model": {"pooling": "max"}},
    {"model": {"maxSequenceLength": 64}},
    {"model": {"format": "onnx"}},
    {"model": {"source": "/models/other"}},
    {"corpus": {"source": "corpus.txt", "textField": "body"}},
    {"model": {"pooling": "lasttoken"}},
    {"model": {"documentPrompt": "passage: "}},
    {"model": {"documentPrompt": ""}},  # no prompt, where the model may declare one
])
def test_what_decides_the_artifacts_changes_the_fingerprint(folder, change):
    assert fingerprint(folder, **change) != fingerprint(folder)


@pytest.mark.parametrize("change", [
    {"replicas": 5},
    {"stages": {"encoder": {"maxBatchSize": 8, "instances": 2, "threads": 2}}},
    {"cache": {"enabled": True}},
    {"search": {"defaultTopK": 3, "maxTopK": 7}},
    {"model": {"normalize": False}},
    {"model": {"queryPrompt": "query: "}},  # applied to queries in Triton, not built
    {"model": {"trustRemoteCode": True}},
])
def test_serving_settings_do_not_change_the_fingerprint(folder, change):
    assert fingerprint(folder, **change) == fingerprint(folder)


def test_the_corpus_content_changes_the_fingerprint(folder):
    before = fingerprint(folder)
    (folder / "corpus.txt").write_text("\n".join(TEXTS[:-1]) + "\n")
    assert fingerprint(folder) != before


def test_a_corpus_on_the_volume_is_fingerprinted_by_its_path(folder):
    """The operator cannot read the artifacts volume: an absolute path is the identity."""
    one = parse_resource(body("/artifacts/corpus/a.jsonl"), folder)
    assert resource_fingerprint(one) == resource_fingerprint(
        parse_resource(body("/artifacts/corpus/a.jsonl"), None))
    assert resource_fingerprint(one) != resource_fingerprint(
        parse_resource(body("/artifacts/corpus/b.jsonl"), folder))


def seed(root: Path, exported: dict[str, Path], fingerprint: str = "0" * 16) -> None:
    """A complete older version holding the session's export, which prepare reuses."""
    old = root / "news" / fingerprint
    shutil.copytree(exported["torchscript"], old / "model")
    VersionManifest(fingerprint, {}, "").write(old)


def test_prepare_builds_a_complete_version_and_cleans_up_old_ones(folder, exported, tmp_path):
    root = tmp_path / "artifacts"
    seed(root, exported)
    resource = parse_resource(body(), folder)
    prepare([resource], root, progress=False)
    target = Path(version_dir(resource, str(root)))
    assert VersionManifest.read(target).fingerprint == resource_fingerprint(resource)
    assert IndexManifest.read(target / "index").count == len(TEXTS)
    check_version(target, resource_fingerprint(resource))

    changed = parse_resource(body(model={"pooling": "cls"}), folder)
    prepare([changed], root, progress=False, keep_only=True)
    assert complete_versions(root / "news") == [resource_fingerprint(changed)]
    assert not list((root / "news").glob(f"{STAGING_PREFIX}*"))


def test_a_second_prepare_of_a_complete_version_changes_nothing(folder, exported, tmp_path):
    root = tmp_path / "artifacts"
    seed(root, exported)
    resource = parse_resource(body(), folder)
    prepare([resource], root, progress=False)
    marker = Path(version_dir(resource, str(root))) / VERSION_FILE
    stamp = marker.stat().st_mtime_ns
    prepare([resource], root, progress=False)
    assert marker.stat().st_mtime_ns == stamp


def test_prepare_refuses_a_fingerprint_other_than_the_rendered_one(folder, tmp_path):
    resource = parse_resource(body(), folder)
    with pytest.raises(ArtifactError, match=f"{resource_fingerprint(resource)}.*deadbeef"):
        prepare([resource], tmp_path / "a", progress=False, expect="deadbeef")


def test_two_prepares_racing_on_one_volume_leave_one_complete_version(folder, exported,
                                                                      tmp_path):
    """Two real `tritonop prepare` processes at once, the volume watched all along."""
    root = tmp_path / "artifacts"
    seed(root, exported)
    spec_file = folder / "news.yaml"
    spec_file.write_text(yaml.safe_dump(body()))
    expected = resource_fingerprint(parse_resource(body(), folder))
    target = root / "news" / expected
    seen_partial: list[list[str]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if target.exists() and not (target / VERSION_FILE).exists():
                seen_partial.append(sorted(p.name for p in target.iterdir()))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    command = [sys.executable, "-m", "tritonop.cli", "prepare", "-f", str(spec_file),
               "--artifacts-root", str(root), "--expect-fingerprint", expected]
    try:
        racers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True) for _ in range(2)]
        outputs = [racer.communicate(timeout=600)[0] for racer in racers]
    finally:
        done.set()
        watcher.join()
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    assert seen_partial == []
    assert sorted(complete_versions(root / "news")) == sorted([expected, "0" * 16])
    assert not list((root / "news").glob(f"{STAGING_PREFIX}*"))
    assert sum("already complete" in output for output in outputs) == 1, outputs
    SearchStage({"artifacts_dir": str(target), "artifacts_fingerprint": expected,
                 "model_dir": str(target / "model"), "index_dir": str(target / "index")})


def test_remove_versions_keeps_what_pods_use(tmp_path):
    for name in ("aaaa", "bbbb", "cccc", f"{STAGING_PREFIX}dead"):
        (tmp_path / name).mkdir()
    (tmp_path / ".news.lock").write_text("")
    assert remove_versions(tmp_path, {"bbbb"}) == [f"{STAGING_PREFIX}dead", "aaaa", "cccc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".news.lock", "bbbb"]


def test_prepare_waits_for_the_lock(folder, tmp_path):
    """A holder of the lock blocks a second prepare until it lets go (flock)."""
    root = tmp_path / "artifacts"
    resource = parse_resource(body("/nonexistent/corpus.txt"), folder)
    finished = threading.Event()

    def other() -> None:
        with pytest.raises(ArtifactError):
            prepare([resource], root, progress=False)
        finished.set()

    with locked(root, "news"):
        thread = threading.Thread(target=other)
        thread.start()
        assert not finished.wait(0.5)
    thread.join(10)
    assert finished.is_set()


def test_a_pod_refuses_a_missing_or_another_version_naming_both(tmp_path):
    (tmp_path / "1111").mkdir()
    VersionManifest("1111", {}, "").write(tmp_path / "1111")
    with pytest.raises(ArtifactError, match=r"2222 is missing.*found on the volume: 1111"):
        check_version(tmp_path / "2222", "2222")
    shutil.copytree(tmp_path / "1111", tmp_path / "3333")
    with pytest.raises(ArtifactError, match=r"built for fingerprint 1111.*expects fingerprint "
                                            "3333"):
        check_version(tmp_path / "3333", "3333")
    assert json.loads((tmp_path / "1111" / VERSION_FILE).read_text())["fingerprint"] == "1111"


def test_the_index_is_memory_mapped_and_equal_to_what_safetensors_reads(tmp_path):
    from safetensors.numpy import load_file

    from tritonop_backend.search import _mapped_tensor, load_index, write_index

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((50, 8)).astype(np.float32)
    manifest = IndexManifest("m", "f", "mean", 16, 8, 50, "sha")
    write_index(tmp_path, matrix, [f"t{i}" for i in range(50)], manifest)
    mapped = _mapped_tensor(tmp_path / "embeddings.safetensors", "embeddings")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, load_file(str(tmp_path / "embeddings.safetensors"))
                                  ["embeddings"])
    index, _ = load_index(tmp_path)
    np.testing.assert_array_equal(index.embeddings, matrix)
