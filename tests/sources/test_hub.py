"""Models from a Hugging Face Hub: huggingface_hub's real client against a hub on loopback."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.sources.conftest import GOOD_TOKEN, OTHER_TOKEN, SERVED, Repos
from tests.support.hub import HubServer
from tritonop.artifacts.fetch import COMPLETE_MARKER, ModelSource, fetch
from tritonop_backend.artifacts import ArtifactError

ROOT = Path(__file__).resolve().parents[2]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def revisions(cache: Path, repo_id: str) -> list[str]:
    """What is under the model's cache folder besides its lock: revisions and staging."""
    folder = cache / "hf" / repo_id
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


def test_tag_branch_and_sha_resolve_to_their_commits_with_only_serving_files(
        hub: HubServer, hub_env: dict[str, str], repos: Repos, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    at_tag = fetch("hf://tiny/bert@v1", tmp_path, env=hub_env,
                   progress=lambda done, total: progress.append((done, total)))
    assert (at_tag.revision, at_tag.directory.name) == (repos.bert_v1, repos.bert_v1)
    assert set(at_tag.files) == SERVED
    assert sorted(hub.downloads("tiny/bert")) == sorted(SERVED)  # each once, nothing else
    on_disk = {str(p.relative_to(at_tag.directory)) for p in at_tag.directory.rglob("*")
               if p.is_file()}
    assert on_disk == SERVED | {COMPLETE_MARKER}  # no client state, no partial files
    for name in SERVED:
        assert (at_tag.directory / name).read_bytes() == repos.v1_files[name]
    assert progress[-1] == (sum(len(repos.v1_files[n]) for n in SERVED),) * 2

    on_branch = fetch("tiny/bert", tmp_path, env=hub_env)  # plain org/name: the default branch
    assert on_branch.revision == repos.bert_main
    assert (on_branch.directory / "config.json").read_bytes() == repos.main_files["config.json"]
    assert not (on_branch.directory / "pytorch_model.bin").exists()
    assert (at_tag.directory / "config.json").read_bytes() == repos.v1_files["config.json"]

    hub.requests.clear()
    by_sha = fetch(f"hf://tiny/bert@{repos.bert_v1}", tmp_path, env=hub_env)
    assert by_sha.directory == at_tag.directory
    assert hub.requests == []
    assert revisions(tmp_path, "tiny/bert") == sorted([repos.bert_v1, repos.bert_main])


def test_pinned_revision_is_served_from_the_cache_with_no_network(
        hub: HubServer, hub_env: dict[str, str], repos: Repos, tmp_path: Path) -> None:
    first = fetch(f"hf://tiny/bert@{repos.bert_main}", tmp_path, env=hub_env)
    # A hub that cannot be reached: only a call-free cache hit can answer.
    again = fetch(f"hf://tiny/bert@{repos.bert_main}", tmp_path,
                  env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert again == first
    hub.requests.clear()
    moving = fetch("hf://tiny/bert@main", tmp_path, env=hub_env)  # one metadata call, no file
    assert moving.directory == first.directory and hub.downloads() == []


def test_concurrent_fetches_download_each_file_once(
        hub: HubServer, hub_env: dict[str, str], tmp_path: Path) -> None:
    hub.throttle = 0.002
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(
        fetch("hf://tiny/bert", tmp_path, env=hub_env))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len({r.directory for r in results}) == 1  # type: ignore[attr-defined]
    assert sorted(hub.downloads("tiny/bert")) == sorted(SERVED)


@pytest.mark.parametrize(("source", "env", "expected"), [
    ("hf://tiny/secret", {}, ["tiny/secret", "HTTP 401", "no HF_TOKEN"]),
    ("hf://tiny/secret", {"HF_TOKEN": OTHER_TOKEN}, ["tiny/secret", "HTTP 401", "no access"]),
    ("hf://tiny/secret", {"HF_TOKEN": "hf_bogus"}, ["credentials", "HTTP 401", "HF_TOKEN"]),
    ("hf://tiny/nope", {}, ["tiny/nope", "not found", "HTTP 401"]),
    ("hf://tiny/bert@nope", {}, ["revision 'nope' not found in tiny/bert", "HTTP 404"]),
    ("hf://tiny/gguf/missing.gguf", {}, ["missing.gguf is not there"]),
])
def test_refusals_name_the_source_and_the_cause(
        hub: HubServer, hub_env: dict[str, str], tmp_path: Path, source: str,
        env: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ArtifactError, match=f"model source {source}") as error:
        fetch(source, tmp_path, env={**hub_env, **env})
    for part in expected:
        assert part in str(error.value)
    assert hub.downloads() == []
    assert not (tmp_path / "hf").exists()  # refused at the metadata call, before any folder


def test_a_hub_that_names_a_path_as_its_commit_is_refused_before_any_folder(
        hub: HubServer, hub_env: dict[str, str], tmp_path: Path) -> None:
    """The commit sha names the cache folder: a hostile hub (HF_ENDPOINT is the tenant's)
    answering ``../..`` would have had prepare remove a folder outside the cache."""
    victim = tmp_path / "other-resource" / "0123abcd"
    victim.mkdir(parents=True)
    hub.claimed_sha["tiny/bert"] = "../../../other-resource/0123abcd"
    with pytest.raises(ArtifactError, match="the hub named no commit sha"):
        fetch("hf://tiny/bert", tmp_path / "cache", env=hub_env)
    assert victim.is_dir() and hub.downloads() == []


def test_private_repository_with_its_token(hub: HubServer, hub_env: dict[str, str],
                                           tmp_path: Path) -> None:
    fetched = fetch("hf://tiny/secret", tmp_path, env={**hub_env, "HF_TOKEN": GOOD_TOKEN})
    assert set(fetched.files) == SERVED


def test_corrupted_file_is_refused_and_leaves_no_revision(
        hub: HubServer, hub_env: dict[str, str], repos: Repos, tmp_path: Path) -> None:
    hub.corrupt.add(("tiny/bert", "model.safetensors"))
    expected = sha256(repos.main_files["model.safetensors"])
    with pytest.raises(ArtifactError, match=f"model.safetensors does not match its sha256 hash: "
                                            f"expected {expected}, got [0-9a-f]{{64}}"):
        fetch("hf://tiny/bert", tmp_path, env=hub_env)
    assert revisions(tmp_path, "tiny/bert") == []  # neither a revision nor its staging
    hub.corrupt.clear()
    assert fetch("hf://tiny/bert", tmp_path, env=hub_env).revision == repos.bert_main


def test_connection_cut_midway_is_retried(hub: HubServer, hub_env: dict[str, str],
                                          repos: Repos, tmp_path: Path) -> None:
    """huggingface_hub retries within the call (with Range from its last whole 10 MiB chunk,
    so from 0 for this file); the retried bytes are whole and verified."""
    hub.drop_after[("tiny/big", "model.safetensors")] = 1_000_000
    fetched = fetch("hf://tiny/big", tmp_path, env=hub_env)
    data = (fetched.directory / "model.safetensors").read_bytes()
    assert sha256(data) == sha256(repos.big_files["model.safetensors"])
    assert hub.downloads("tiny/big").count("model.safetensors") == 2


def test_killed_download_restarts_and_completes(hub: HubServer, hub_env: dict[str, str],
                                                repos: Repos, tmp_path: Path) -> None:
    """A prepare killed midway leaves staging only; the next one keeps the whole files."""
    hub.throttle = 0.02  # ~3 MB/s: the 4 MiB weights take over a second
    code = ("import sys; from pathlib import Path; from tritonop.artifacts.fetch import fetch; "
            "fetch('hf://tiny/big', Path(sys.argv[1]))")
    env = {**os.environ, **hub_env, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT),
           "HF_HOME": str(tmp_path / "hf-home")}  # no token of this machine's user
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while "model.safetensors" not in hub.downloads("tiny/big"):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = revisions(tmp_path, "tiny/big")
    assert len(left) == 1 and left[0].startswith(".staging-")
    (tmp_path / "hf" / "tiny" / "big" / ".staging-0123abcd").mkdir()  # stale
    hub.throttle = 0.0
    hub.requests.clear()
    fetched = fetch("hf://tiny/big", tmp_path, env=hub_env)
    for name in SERVED:
        assert (fetched.directory / name).read_bytes() == repos.big_files[name]
    in_order = sorted(SERVED)  # fetch takes files in this order: the ones before the weights
    assert hub.downloads("tiny/big") == in_order[in_order.index("model.safetensors"):]
    assert revisions(tmp_path, "tiny/big") == [fetched.revision]
    assert (fetched.directory / COMPLETE_MARKER).exists()


@pytest.fixture
def small_volume(tmp_path: Path):  # -> Iterator[Path]
    """A 1 MiB tmpfs, as a nearly full volume is (root only)."""
    mount = tmp_path / "volume"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_no_space_is_refused_before_downloading(hub: HubServer, hub_env: dict[str, str],
                                                small_volume: Path) -> None:
    with pytest.raises(ArtifactError, match=r"model source hf://tiny/big: needs 4\.\d MiB "
                                            r"\(\d+ bytes\) in .*volume.*, but only"):
        fetch("hf://tiny/big", small_volume, env=hub_env)
    assert hub.downloads() == []
    assert revisions(small_volume, "tiny/big") == []


def test_pickled_weights_are_refused_unless_allowed(hub: HubServer, hub_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"model source tiny/pickled: the weights are pickled "
                                            r"\(pytorch_model\.bin\).*allowPickle: true"):
        fetch("tiny/pickled", tmp_path, env=hub_env)
    assert hub.downloads() == []
    fetched = fetch(ModelSource.parse("tiny/pickled", allow_pickle=True), tmp_path, env=hub_env)
    assert "pytorch_model.bin" in fetched.files and "training_args.bin" not in fetched.files
    assert (fetched.directory / "pytorch_model.bin").stat().st_size > 0


def test_a_named_gguf_is_the_only_file_fetched(hub: HubServer, hub_env: dict[str, str],
                                               tmp_path: Path) -> None:
    fetched = fetch("hf://tiny/gguf/model-q8_0.gguf@main", tmp_path, env=hub_env)
    assert fetched.files == ("model-q8_0.gguf",)
    assert hub.downloads() == ["model-q8_0.gguf"]
    assert (fetched.directory / "model-q8_0.gguf").read_bytes()[:4] == b"GGUF"
