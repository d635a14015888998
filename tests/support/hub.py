"""A Hugging Face Hub-compatible server on loopback, over git repositories the tests make.

The project downloads from the Hub with ``huggingface_hub``'s own client, so the tests point
that client (``HF_ENDPOINT``) at this server instead of mocking anything. It speaks the part of
the Hub's HTTP API the client uses (seen with huggingface_hub 2.4):

* ``GET /api/models/<org>/<name>[/revision/<rev>][?blobs=true]``: the commit ``sha`` and the
  ``siblings`` (with ``blobId``, ``size`` and ``lfs.sha256`` when ``blobs=true``);
* ``GET /api/models/<org>/<name>/tree/<rev>[/<path>][?recursive=true]``;
* ``HEAD`` and ``GET /<org>/<name>/resolve/<rev>/<path>`` with ``X-Repo-Commit``, ``ETag`` (git
  blob sha1, or the sha256 of an LFS file's content) and ``Range``.

Errors look like the Hub's, because the client turns them into its own exception types:
401 ``RepoNotFound`` for a missing repository *and* for a private one the token may not see,
401 "Invalid credentials" for an unknown token, 404 ``RevisionNotFound``, 404 ``EntryNotFound``.

A repository is a git work tree under ``<root>/models/<org>/<name>``. Weights are committed as
git-lfs pointer files with their content under ``.git/lfs/objects``, as git-lfs stores them,
so no git-lfs binary is needed and the tree listing carries the pointers' sha256.

Hooks for failure tests: :attr:`HubServer.corrupt` (serve a file with its first byte flipped),
:attr:`HubServer.drop_after` (close the connection after N body bytes, once),
:attr:`HubServer.throttle` (a pause per 64 KiB), :attr:`HubServer.claimed_sha` (a hostile
hub's answer for a repository's commit); :attr:`HubServer.requests` records the
``/resolve/`` requests, the ones that move file content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

# What the Hub stores through git-lfs: weights and other large binaries.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".pkl", ".model")
_POINTER = re.compile(
    rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize ([0-9]+)\n"
)
_CHUNK = 64 * 1024
_GIT_ENV = {"GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
            "GIT_COMMITTER_NAME": "tests", "GIT_COMMITTER_EMAIL": "tests@localhost"}


class Request(NamedTuple):
    """One ``/resolve/`` request as the server saw it."""

    method: str
    repo_id: str
    revision: str
    path: str
    range: str | None


@dataclass(frozen=True)
class Entry:
    """A file of a commit: its git blob id, the size served, and the LFS object if any."""

    blob_id: str
    size: int
    lfs_sha256: str | None
    pointer_size: int


class HubRepo:
    """A git repository in the layout the server reads; commits return their sha."""

    def __init__(self, path: Path, repo_id: str) -> None:
        self.path = path
        self.repo_id = repo_id

    def git(self, *args: str) -> str:
        result = subprocess.run(["git", "-C", str(self.path), *args], check=True,
                                capture_output=True, env={**os.environ, **_GIT_ENV})
        return result.stdout.decode()

    def commit(self, files: Mapping[str, bytes | str | None], message: str = "update",
               tag: str | None = None) -> str:
        """Write ``files`` (None deletes one) and commit them; weights go in as LFS pointers."""
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            target.write_bytes(self._lfs_pointer(data) if name.endswith(LFS_SUFFIXES) else data)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        if tag:
            self.git("tag", tag)
        return self.git("rev-parse", "HEAD").strip()

    def commit_folder(self, folder: Path, message: str = "upload", tag: str | None = None) -> str:
        """Make the repository hold exactly the files of ``folder`` (a saved model): one commit."""
        for child in self.path.iterdir():
            if child.name not in (".git", ".gitattributes"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit(files, message, tag)

    def _lfs_pointer(self, data: bytes) -> bytes:
        oid = hashlib.sha256(data).hexdigest()
        store = self.path / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_bytes(data)
        return (f"version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{oid}\nsize {len(data)}\n").encode()

    def resolve(self, revision: str) -> str | None:
        """The commit a branch, tag or sha names, or None."""
        try:
            return self.git("rev-parse", "--verify", "--quiet", "--end-of-options",
                            f"{revision}^{{commit}}").strip()
        except subprocess.CalledProcessError:
            return None

    def entries(self, sha: str) -> dict[str, Entry]:
        """Every file of commit ``sha``, LFS pointers replaced by what they point to."""
        out: dict[str, Entry] = {}
        for line in self.git("ls-tree", "-r", "-l", "-z", sha).split("\0"):
            if not line:
                continue
            meta, path = line.split("\t", 1)
            _mode, kind, blob_id, size_text = meta.split()
            size = int(size_text)
            pointer = None
            if kind == "blob" and size < 200:
                pointer = _POINTER.fullmatch(self._blob(blob_id))
            if pointer:
                out[path] = Entry(blob_id, int(pointer.group(2)), pointer.group(1).decode(), size)
            elif kind == "blob":
                out[path] = Entry(blob_id, size, None, size)
        return out

    def content(self, entry: Entry) -> bytes:
        if entry.lfs_sha256 is None:
            return self._blob(entry.blob_id)
        oid = entry.lfs_sha256
        return (self.path / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes()

    def _blob(self, blob_id: str) -> bytes:
        return subprocess.run(["git", "-C", str(self.path), "cat-file", "blob", blob_id],
                              check=True, capture_output=True).stdout


class HubServer(ThreadingHTTPServer):
    """The server; use as a context manager, or :meth:`start` and :meth:`stop`."""

    daemon_threads = True

    def __init__(self, root: Path, tokens: tuple[str, ...] = ()) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.tokens: set[str] = set(tokens)
        self.private: dict[str, set[str]] = {}
        self.requests: list[Request] = []
        self.corrupt: set[tuple[str, str]] = set()
        self.drop_after: dict[tuple[str, str], int] = {}
        self.throttle = 0.0
        self.claimed_sha: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._entries: dict[tuple[str, str], dict[str, Entry]] = {}

    def entries(self, repo: HubRepo, sha: str) -> dict[str, Entry]:
        """A commit's files, read from git once (a commit never changes)."""
        key = (repo.repo_id, sha)
        if key not in self._entries:
            self._entries[key] = repo.entries(sha)
        return self._entries[key]

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def create_repo(self, repo_id: str, private_to: tuple[str, ...] | None = None) -> HubRepo:
        """A new empty repository; ``private_to`` lists the tokens that may see a private one."""
        path = self.root / "models" / repo_id
        path.mkdir(parents=True)
        repo = HubRepo(path, repo_id)
        repo.git("init", "-q", "-b", "main")
        attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
        repo.commit({".gitattributes": attributes}, "initial commit")
        if private_to is not None:
            self.private[repo_id] = set(private_to)
            self.tokens.update(private_to)
        return repo

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """The file paths GET through ``/resolve/`` (of one repository), in order."""
        return [r.path for r in self.requests
                if r.method == "GET" and (repo_id is None or r.repo_id == repo_id)]

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read :attr:`HubServer.requests` instead."""

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(f"{parts[2]}/{parts[3]}", parts[4:], parse_qs(url.query))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self._json(404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, code: int, body: object, error_code: str | None = None,
              headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        if code >= 400 and isinstance(body, dict):
            self.send_header("X-Error-Message", str(body.get("error", "")))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _repo(self, repo_id: str) -> HubRepo | None:
        """The repository if the request's token may see it; else the Hub's answer is sent."""
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is not None and token not in self.server.tokens:
            self._json(401, {"error": "Invalid credentials in Authorization header"})
            return None
        path = self.server.root / "models" / repo_id
        allowed = self.server.private.get(repo_id)
        if ".." in repo_id or not path.is_dir() or (allowed is not None and token not in allowed):
            self._json(401, {"error": "Repository not found"}, "RepoNotFound")
            return None
        return HubRepo(path, repo_id)

    def _commit(self, repo: HubRepo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._json(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
        return sha

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if rest and rest[0] == "tree" and len(rest) >= 2:
            sha = self._commit(repo, rest[1])
            if sha is not None:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                listing = _tree(self.server.entries(repo, sha), "/".join(rest[2:]), recursive)
                self._json(200, list(listing))
            return
        if rest and rest[0] != "revision":
            self._json(404, {"error": "not found"})
            return
        sha = self._commit(repo, "/".join(rest[1:]) if len(rest) > 1 else "main")
        if sha is None:
            return
        blobs = query.get("blobs", ["false"])[0] == "true"
        entries = sorted(self.server.entries(repo, sha).items())
        siblings = [_sibling(path, entry, blobs) for path, entry in entries]
        org = repo_id.split("/")[0]
        self._json(200, {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                         "modelId": repo_id, "author": org,
                         "sha": self.server.claimed_sha.get(repo_id, sha),
                         "private": repo_id in self.server.private, "gated": False,
                         "disabled": False, "tags": [], "siblings": siblings})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.server
        hub.requests.append(Request(self.command, repo_id, revision, path,
                                    self.headers.get("Range")))
        repo = self._repo(repo_id)
        sha = None if repo is None else self._commit(repo, revision)
        if repo is None or sha is None:
            return
        entry = hub.entries(repo, sha).get(path)
        if entry is None:
            self._json(404, {"error": f"{path} does not exist on {revision}"}, "EntryNotFound",
                       headers={"X-Repo-Commit": sha})
            return
        etag = entry.lfs_sha256 or entry.blob_id
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs_sha256:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)}
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.command == "GET":
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{entry.size - 1}/{entry.size}"
        self.send_response(206 if match and self.command == "GET" else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(entry.size - start))
        self.end_headers()
        if self.command == "GET":
            data = repo.content(entry)
            if (repo_id, path) in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self._stream(data[start:], hub.drop_after.pop((repo_id, path), None))

    def _stream(self, body: bytes, drop_after: int | None) -> None:
        """Send ``body`` in chunks; past ``drop_after`` bytes, cut the connection as networks do."""
        for offset in range(0, len(body), _CHUNK):
            chunk = body[offset:offset + _CHUNK]
            if drop_after is not None and offset + len(chunk) > drop_after:
                self.wfile.write(chunk[:max(drop_after - offset, 0)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(chunk)
            if self.server.throttle:
                threading.Event().wait(self.server.throttle)


def _sibling(path: str, entry: Entry, blobs: bool) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": path}
    if blobs:
        sibling |= {"blobId": entry.blob_id, "size": entry.size}
        if entry.lfs_sha256:
            sibling["lfs"] = {"sha256": entry.lfs_sha256, "size": entry.size,
                              "pointerSize": entry.pointer_size}
    return sibling


def _tree(entries: dict[str, Entry], prefix: str, recursive: bool) -> Iterator[dict[str, Any]]:
    """The ``/tree`` listing: folders and files under ``prefix``, one level unless recursive."""
    prefix = prefix.strip("/")
    folders: set[str] = set()
    for path, entry in sorted(entries.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        parts = path.split("/")
        depth = len(prefix.split("/")) if prefix else 0
        for level in range(depth + 1, len(parts) if recursive else min(depth + 2, len(parts))):
            folder = "/".join(parts[:level])
            if folder not in folders:
                folders.add(folder)
                yield {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder}
        if recursive or len(parts) == depth + 1:
            item: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": entry.size,
                                    "path": path}
            if entry.lfs_sha256:
                item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size,
                               "pointerSize": entry.pointer_size}
            yield item
