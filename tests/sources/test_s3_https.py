"""Models from S3 (boto3 against moto with credentials checked) and single files over HTTP."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.sources.conftest import SERVED, model_files, weights
from tests.support.s3 import Key, S3Store
from tritonop.artifacts.fetch import ModelSource, fetch
from tritonop_backend.artifacts import ArtifactError


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def s3_source(store: S3Store, prefix: str) -> ModelSource:
    return ModelSource.parse(f"s3://models/{prefix}", s3_endpoint=store.endpoint)


@pytest.fixture(scope="module")
def uploaded(s3_store: S3Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """bert/ with 6 MiB weights, uploaded in parts (an ``<md5>-2`` ETag), and a sibling
    prefix bert-large/ that a listing of bert/ must not take in."""
    files = {**model_files(), "model.safetensors": weights(5, rows=24576)}
    s3_store.upload_folder(write_folder(tmp_path_factory.mktemp("bert"), files), "models",
                           "bert", multipart_threshold=5 << 20)
    s3_store.upload_folder(write_folder(tmp_path_factory.mktemp("large"), model_files(64)),
                           "models", "bert-large")
    return files


def test_prefix_is_fetched_with_a_reader_key(s3_store: S3Store, uploaded: dict[str, bytes],
                                              tmp_path: Path) -> None:
    head = s3_store.client().head_object(Bucket="models", Key="bert/model.safetensors")
    assert head["ETag"].endswith('-2"')  # the multipart path is the one verified here
    progress: list[tuple[int, int]] = []
    fetched = fetch(s3_source(s3_store, "bert"), tmp_path, env=s3_store.reader.env,
                    progress=lambda done, total: progress.append((done, total)))
    assert set(fetched.files) == SERVED
    for name in SERVED:
        assert (fetched.directory / name).read_bytes() == uploaded[name]
    assert progress[0] == (0, sum(len(uploaded[n]) for n in SERVED)) == (0, progress[-1][0])
    assert fetched.directory == tmp_path / "s3" / "models" / "bert" / str(
        fetched.revision)


def test_revision_follows_the_etags(s3_store: S3Store, uploaded: dict[str, bytes],
                                    tmp_path: Path) -> None:
    s3_store.upload_folder(write_folder(tmp_path / "v1", model_files(32, seed=7)), "models",
                           "moving")
    source = s3_source(s3_store, "moving")
    first = fetch(source, tmp_path, env=s3_store.reader.env)
    assert fetch(source, tmp_path, env=s3_store.reader.env) == first
    s3_store.client().put_object(Bucket="models", Key="moving/README.md", Body=b"not served")
    assert fetch(source, tmp_path, env=s3_store.reader.env).revision == first.revision
    s3_store.client().put_object(Bucket="models", Key="moving/config.json", Body=b'{"v": 2}')
    second = fetch(source, tmp_path, env=s3_store.reader.env)
    assert second.revision != first.revision
    assert (second.directory / "config.json").read_bytes() == b'{"v": 2}'
    assert (first.directory / "config.json").read_bytes() != b'{"v": 2}'  # the old one intact


def test_a_pinned_revision_is_reused_without_a_call_and_a_changed_store_refused(
        s3_store: S3Store, uploaded: dict[str, bytes], tmp_path: Path) -> None:
    """What prepare does with the revision a render pinned (the listing's hash)."""
    s3_store.upload_folder(write_folder(tmp_path / "v1", model_files(32, seed=8)), "models",
                           "pinned")
    first = fetch(s3_source(s3_store, "pinned"), tmp_path, env=s3_store.reader.env)
    unreachable = ModelSource.parse("s3://models/pinned", s3_endpoint="http://127.0.0.1:9")
    pinned = replace(unreachable, revision=first.revision)
    assert fetch(pinned, tmp_path, env=s3_store.reader.env) == first  # no call: port 9
    s3_store.client().put_object(Bucket="models", Key="pinned/config.json", Body=b'{"v": 2}')
    moved = replace(s3_source(s3_store, "pinned"), revision=first.revision)
    (first.directory.parent / first.revision).rename(tmp_path / "evicted")  # not cached
    with pytest.raises(ArtifactError, match=rf"model source s3://models/pinned: the store now "
                                            rf"holds revision [0-9a-f]{{64}}, not the pinned "
                                            rf"{first.revision} \(objects changed since\)"):
        fetch(moved, tmp_path, env=s3_store.reader.env)
    assert sorted(p.name for p in first.directory.parent.iterdir()) == [".lock"]


@pytest.mark.parametrize("key", [Key("AKIAUNKNOWN000000000", "secret"), None],
                         ids=["unknown key", "wrong secret"])
def test_bad_credentials_are_named(s3_store: S3Store, uploaded: dict[str, bytes],
                                  tmp_path: Path, key: Key | None) -> None:
    key = key or Key(s3_store.reader.access_key_id, "wrong")
    with pytest.raises(ArtifactError, match=r"model source s3://models/bert: the store refused "
                                            r"the credentials \(\w+, HTTP 403\); check "
                                            r"AWS_ACCESS_KEY_ID"):
        fetch(s3_source(s3_store, "bert"), tmp_path, env=key.env)
    assert not (tmp_path / "s3").exists()


def test_missing_prefix(s3_store: S3Store, uploaded: dict[str, bytes], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no objects under s3://models/nope/"):
        fetch(s3_source(s3_store, "nope"), tmp_path, env=s3_store.reader.env)


def test_a_named_gguf_object_alone(s3_store: S3Store, tmp_path: Path) -> None:
    files = {"model-q8_0.gguf": b"GGUF" + bytes(2048), "model-f16.gguf": b"GGUF" + bytes(4096)}
    s3_store.upload_folder(write_folder(tmp_path / "src", files), "models", "gguf")
    fetched = fetch(s3_source(s3_store, "gguf/model-q8_0.gguf"), tmp_path / "cache",
                    env=s3_store.reader.env)
    assert fetched.files == ("model-q8_0.gguf",)
    assert sorted(p.name for p in fetched.directory.iterdir()) == [
        ".tritonop-complete.json", "model-q8_0.gguf"]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_corrupted_object_is_refused_and_leaves_no_revision(
        s3_store: S3Store, tmp_path: Path, name: str) -> None:
    prefix = f"corrupt-{name.split('.')[0]}"
    files = {**model_files(), "model.safetensors": weights(6, rows=24576)}
    s3_store.upload_folder(write_folder(tmp_path / "src", files), "models", prefix,
                           multipart_threshold=5 << 20)
    s3_store.corrupt("models", f"{prefix}/{name}")
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError, match=f"model source s3://models/{prefix}: {name} does "
                                            f"not match its"):
        fetch(s3_source(s3_store, prefix), cache, env=s3_store.reader.env)
    assert [p.name for p in (cache / "s3" / "models" / prefix).iterdir()] == [".lock"]


class _Files(SimpleHTTPRequestHandler):
    """Serves a folder; ``/stall/...`` answers only after two seconds."""

    def log_message(self, format: str, *args: object) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        if self.path.startswith("/stall/"):
            time.sleep(2)
        super().do_HEAD()


@pytest.fixture(scope="module")
def file_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadingHTTPServer]:
    root = tmp_path_factory.mktemp("www")
    (root / "model.gguf").write_bytes(b"GGUF" + weights(8, rows=1024))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(root)))
    server.daemon_threads = True
    server.paths = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_file_with_its_sha256(file_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    host, port = file_server.server_address[:2]
    url = f"http://{host!s}:{port}/model.gguf"
    data = b"GGUF" + weights(8, rows=1024)
    digest = hashlib.sha256(data).hexdigest()
    fetched = fetch(ModelSource.parse(url, sha256=digest), tmp_path)
    assert fetched.revision == digest and fetched.files == ("model.gguf",)
    assert (fetched.directory / "model.gguf").read_bytes() == data
    file_server.paths.clear()  # type: ignore[attr-defined]
    assert fetch(ModelSource.parse(url, sha256=digest), tmp_path) == fetched
    assert file_server.paths == []  # type: ignore[attr-defined]

    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(ArtifactError, match=f"model.gguf does not match its sha256 hash: "
                                            f"expected {wrong}, got {digest}"):
        fetch(ModelSource.parse(url, sha256=wrong), tmp_path)
    assert not (fetched.directory.parent / wrong).exists()
    with pytest.raises(ArtifactError, match=f"model source {url}: an https source needs "
                                            f"`sha256`"):
        ModelSource.parse(url)


def test_silent_server_times_out(file_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    host, port = file_server.server_address[:2]
    url = f"http://{host!s}:{port}/stall/model.gguf"
    with pytest.raises(ArtifactError, match=f"model source {url}: timed out after 0.3 s"):
        fetch(ModelSource.parse(url, sha256="0" * 64), tmp_path, timeout=0.3)


def test_credentials_in_a_url_stay_out_of_errors(file_server: ThreadingHTTPServer,
                                                 tmp_path: Path) -> None:
    """A presigned query or a password in the URL is the user's secret: a failure names the
    URL without them, and a URL urllib cannot open is one line, not a traceback."""
    host, port = file_server.server_address[:2]
    url = f"http://{host!s}:{port}/missing.gguf"
    with pytest.raises(ArtifactError) as failed:
        fetch(ModelSource.parse(f"{url}?X-Amz-Signature=SECRETSIG", sha256="0" * 64), tmp_path)
    assert str(failed.value).startswith(f"model source {url}: HTTP 404")
    assert "SECRETSIG" not in str(failed.value)
    with pytest.raises(ArtifactError) as failed:
        fetch(ModelSource.parse(f"http://alice:hunter2@{host!s}/m.gguf", sha256="0" * 64),
              tmp_path)
    assert "hunter2" not in str(failed.value) and "not a URL that can be opened" in str(
        failed.value)
