"""Bringing a model from where it lives into a verified, versioned folder of a local cache.

One function, :func:`fetch`, takes a :class:`ModelSource` (the resource's ``model.source`` and
its options) and returns a :class:`Fetched`: a local folder and the exact revision it holds.
One resolver per scheme sits behind it:

* ``hf://org/name[@rev]`` (or plain ``org/name[@rev]``; ``hf://org/name/file.gguf[@rev]`` names
  one GGUF): ``huggingface_hub``'s own client, honouring ``HF_ENDPOINT`` and ``HF_TOKEN``; the
  revision is the commit sha.
* ``s3://bucket/prefix``: boto3, ``AWS_*`` credentials; the revision is a sha256 of the sorted
  (key, ETag) list, so it changes exactly when an object that serving reads changes.
* ``https://.../file`` with a required ``sha256``, which is also its revision. ``http://`` is
  taken too: the sha256 makes the transport's integrity irrelevant.
* ``pvc://claim/path``: in a pod the claim is mounted read-only at ``<volume_root>/<claim>``
  (``/sources/<claim>`` by convention; ``/models`` is Triton's repository), so the source
  is ``/sources/<claim>/<path>``.
* ``package:<dist>`` and paths: as :func:`tritonop.artifacts.sources.locate` finds them.

Remote sources land in ``<cache_root>/<scheme>/<id>/<revision>/`` (``cache_root``: locally
``~/.cache/tritonop/models``, in a pod the artifacts volume's ``.models``). A revision folder is
built in ``.staging-<revision>`` beside it and renamed into place with a marker written last,
so a folder under its revision's name is always complete; a download killed midway resumes
from the staging folder (whole files, and the bytes of a partial S3 or https file), and every
file is checked against the hash the store lists before the rename. A revision named exactly
(a commit sha, an https sha256) is reused without any network call; a moving one (a branch,
an S3 prefix) costs one metadata call, which :func:`resolve_revision` makes alone (the
revision, nothing downloaded). A lock per model id lets concurrent prepares download once.

Only what serving needs is downloaded (:func:`select_files`): configs, tokenizer files,
safetensors and sentence-transformers module configs. Pickled weights run code when loaded,
so they are refused unless ``allowPickle`` says the source is trusted.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from tritonop.artifacts.progress import public_source
from tritonop_backend.artifacts import ArtifactError

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while a download runs."""

PVC_ROOT = Path("/sources")
COMPLETE_MARKER = ".tritonop-complete.json"
_STAGING_PREFIX = ".staging-"
_CHUNK = 1 << 20
_RETRIES = 3
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
"""A revision as a cache folder names it: a commit's sha1, or a sha256."""
_SHA256 = re.compile(r"[0-9a-f]{64}")

# What serving reads, by file name, at the top of the model or in a sentence-transformers
# module folder (1_Pooling, 2_Normalize, 2_Dense): configs, tokenizers, chat templates.
_SERVING_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "merges.txt", "vocab.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
})
_MODULE_FOLDER = re.compile(r"\d+_[A-Za-z][\w-]*")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Pickles in a repository that are training state, not weights: never downloaded.
_TRAINING_STATE = re.compile(r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|"
                             r"rng_state.*\.pth")


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives, parsed once from the resource's ``model`` fields.

    Attributes:
        text: the source as the resource wrote it (for messages).
        scheme: ``hf``, ``s3``, ``https``, ``pvc``, ``package`` or ``path``.
        name: the hub repository, the bucket, the URL, the claim, the distribution or the path.
        path: the GGUF inside a hub repository, the S3 prefix, or the path inside a claim.
        revision: the hub revision after ``@`` (None: the default branch); for S3, the
            revision (the listing's hash) a caller pinned earlier, so that a cached copy is
            reused with no call and a store that changed since is refused.
    """

    text: str
    scheme: str
    name: str
    path: str = ""
    revision: str | None = None
    endpoint: str | None = None
    region: str | None = None
    sha256: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def public(self) -> str:
        """The source as messages show it: a URL's user, password and query left out."""
        return public_source(self.text)

    @property
    def remote(self) -> bool:
        """Downloaded into the cache (a hub, S3, https), not read where it is."""
        return self.scheme in ("hf", "s3", "https")

    @property
    def exact_revision(self) -> str | None:
        """The revision this source names exactly, known with no call: a hub commit sha after
        ``@``, an https file's sha256, an S3 revision a caller pinned. A cached copy of it is
        reused as it is; None where only the store can say (a branch, a tag, an S3 prefix)."""
        revision = self.revision
        if self.scheme == "hf":
            return revision if revision and _SHA1.fullmatch(revision) else None
        if self.scheme == "s3":
            return revision if revision and _SHA256.fullmatch(revision) else None
        return self.sha256 if self.scheme == "https" else None

    @classmethod
    def parse(cls, text: str, *, s3_endpoint: str | None = None, s3_region: str | None = None,
              sha256: str | None = None, allow_pickle: bool = False,
              trust_remote_code: bool = False, base_dir: Path | None = None) -> ModelSource:
        """Read ``text``; a plain ``org/name`` is a hub id unless such a local path exists."""
        options: dict[str, Any] = {"allow_pickle": allow_pickle,
                                   "trust_remote_code": trust_remote_code}
        scheme, _, rest = text.partition("://")
        if not rest:
            scheme, rest = "", text
        if scheme == "hf" or (not scheme and _is_hub_id(text, base_dir)):
            return cls(text, "hf", *_parse_hub(text, rest), **options)
        if scheme == "s3":
            bucket, _, prefix = rest.partition("/")
            if not bucket:
                raise ArtifactError(f"model source {text}: no bucket; write s3://bucket/prefix")
            return cls(text, "s3", bucket, prefix.strip("/"), endpoint=s3_endpoint,
                       region=s3_region, **options)
        if scheme in ("https", "http"):
            if not sha256 or not _SHA256.fullmatch(sha256.lower()):
                raise ArtifactError(f"model source {public_source(text)}: an https source needs "
                                    "`sha256`, the hex sha256 of the file, so that what is "
                                    "served is checked")
            return cls(text, "https", text, sha256=sha256.lower(), **options)
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            if not claim or ".." in PurePosixPath(path).parts:
                raise ArtifactError(f"model source {text}: write pvc://<claim>/<path> (no '..')")
            return cls(text, "pvc", claim, path.strip("/"), **options)
        if scheme:
            raise ArtifactError(f"model source {public_source(text)}: unknown scheme "
                                f"{scheme}://; use hf://, s3://, https://, pvc://, package: "
                                "or a path")
        if text.startswith("package:"):
            return cls(text, "package", text.removeprefix("package:"), **options)
        return cls(text, "path", text, **options)


@dataclass(frozen=True)
class Fetched:
    """A model folder on local disk and the revision it holds (None for local sources)."""

    directory: Path
    revision: str | None
    source: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Digest:
    """What a file's bytes must hash to: ``sha256``, ``git-sha1`` (a git blob id), ``md5``,
    or ``s3-multipart`` (an S3 multipart ETag, parts of ``part_size`` bytes)."""

    kind: str
    value: str
    part_size: int = 0


@dataclass(frozen=True)
class RemoteFile:
    """A file serving needs, as the store lists it (S3: its key and ETag too)."""

    path: str
    size: int | None
    digest: Digest | None = None
    key: str = ""
    etag: str = ""


class _Mismatch(Exception):
    """Downloaded bytes are not what the store listed: the staging folder is discarded."""


def fetch(source: ModelSource | str, cache_root: Path, *, env: Mapping[str, str] | None = None,
          progress: Progress | None = None, volume_root: Path = PVC_ROOT,
          base_dir: Path | None = None, timeout: float = 60.0) -> Fetched:
    """The local folder of ``source``, downloaded into ``cache_root`` first when remote.

    Args:
        source: a parsed source, or the source text (with no options).
        cache_root: the models cache, e.g. ``~/.cache/tritonop/models`` or the artifacts
            volume's ``.models``.
        env: where ``HF_ENDPOINT``, ``HF_TOKEN`` and ``AWS_*`` are read (default: os.environ),
            so that a caller holding a Secret's keys need not put them into its own environment.
        progress: told (bytes done, bytes total) as bytes arrive.
        volume_root: where ``pvc://`` claims are mounted.
        base_dir: what a relative path is relative to.
        timeout: seconds a connection may stay silent.

    Raises:
        ArtifactError: naming the source and the cause; no partial revision folder is left.
    """
    if isinstance(source, str):
        source = ModelSource.parse(source, base_dir=base_dir)
    env = os.environ if env is None else env
    if source.scheme in ("package", "path"):
        return _local(source, base_dir)
    if source.scheme == "pvc":
        path = volume_root / source.name / source.path
        if not path.exists():
            raise ArtifactError(f"model source {source.public}: {path} does not exist; the "
                                f"claim {source.name!r} is mounted at {volume_root / source.name}")
        if path.is_file():  # one file, a GGUF
            return Fetched(path.parent, None, source.text, (path.name,))
        return Fetched(path, None, source.text, ())
    return _fetch_remote(_remote(source, env, timeout), source, cache_root, progress)


def resolve_revision(source: ModelSource | str, env: Mapping[str, str] | None = None, *,
                     timeout: float = 60.0) -> str:
    """The exact revision a remote source means now, as :func:`fetch` would record it.

    A revision the source names exactly (a commit sha, an https sha256, an S3 revision a
    caller pinned) is returned with no call; a moving one (a branch, a tag, an S3 prefix)
    costs the one metadata call that :func:`fetch` makes first, through the same listing, so
    the string is the same, and the same files are refused (pickled weights). Nothing is
    downloaded and nothing is cached.

    Raises:
        ArtifactError: naming the source and the cause (401, 403, 404, revision not found),
            or that the source is local and has no revision.
    """
    if isinstance(source, str):
        source = ModelSource.parse(source)
    if not source.remote:
        raise ArtifactError(f"model source {source.public}: a {source.scheme} source is read "
                            f"where it is and has no revision to resolve")
    if source.exact_revision:
        return source.exact_revision
    return _remote(source, os.environ if env is None else env, timeout).listing()[0]


def _remote(source: ModelSource, env: Mapping[str, str], timeout: float) -> _Remote:
    """The resolver of a remote source's scheme."""
    if source.scheme == "hf":
        return _Hub(source, env, timeout)
    if source.scheme == "s3":
        return _S3(source, env, timeout)
    return _Https(source, timeout)


def select_files(paths: Sequence[str], source: ModelSource, named: str = "") -> list[str]:
    """The files of a listing that serving reads; raises when the weights are refused.

    A source that ``named`` one file (a GGUF) gets that file alone. Otherwise weights are
    taken per folder (the model's top and each sentence-transformers module folder): its
    ``*.safetensors`` when there are any, else its pickled weights if ``allow_pickle``.
    Mistral's ``consolidated*.safetensors`` duplicate the sharded weights that transformers
    reads, so they are left out when other safetensors are there.
    """
    if named:
        if named not in paths:
            raise ArtifactError(f"model source {source.public}: {named} is not there")
        return [named]
    placed = [p for p in paths if _folder(p) is not None]
    chosen = [p for p in placed if _wanted(p, source)]
    refused: list[str] = []
    for folder in sorted({_folder(p) or "" for p in placed}):
        inside = [p for p in placed if _folder(p) == folder]
        weights = [p for p in inside if p.endswith(".safetensors")]
        if len(weights) > 1 and folder == "":
            weights = [p for p in weights if not p.startswith("consolidated")] or weights
        if not weights:
            weights = [p for p in inside if p.endswith(_PICKLE_SUFFIXES)
                       and not _TRAINING_STATE.fullmatch(p.rsplit("/", 1)[-1])]
            weights += [p for p in inside if p.endswith(".bin.index.json")] if weights else []
            refused += [] if source.allow_pickle else weights
        chosen += weights
    if refused:
        raise ArtifactError(
            f"model source {source.public}: the weights are pickled ({', '.join(sorted(refused))}) "
            f"and loading a pickle runs code from the file; use a source with *.safetensors, "
            f"or set allowPickle: true if you trust it")
    if not any(p.endswith((".safetensors", *_PICKLE_SUFFIXES)) for p in chosen):
        raise ArtifactError(f"model source {source.public}: no weights (*.safetensors) among its "
                            f"{len(paths)} files")
    return sorted(set(chosen))


def _folder(path: str) -> str | None:
    """"" for a top-level file, the module folder for one inside it, else None (not served)."""
    parts = path.split("/")
    if len(parts) == 1:
        return ""
    if len(parts) == 2 and (_MODULE_FOLDER.fullmatch(parts[0])
                            or parts[0] == "additional_chat_templates"):
        return parts[0]
    return None


def _wanted(path: str, source: ModelSource) -> bool:
    name = path.rsplit("/", 1)[-1]
    if path.startswith("additional_chat_templates/"):
        return name.endswith(".jinja")
    if name in _SERVING_NAMES or (name.endswith(".model") and "/" not in path):
        return True
    return source.trust_remote_code and name.endswith(".py") and "/" not in path


# --- the cache -------------------------------------------------------------------------------

class _Remote(Protocol):
    """A scheme's resolver: what the cache holds it under, how to list and download it."""

    cache_id: tuple[str, ...]

    def pinned(self) -> str | None:
        """The revision when the source names it exactly (then a cached copy needs no call)."""

    def listing(self) -> tuple[str, list[RemoteFile]]:
        """The revision the source means now and the files serving needs (one metadata call)."""

    def download(self, file: RemoteFile, staging: Path, revision: str,
                 advance: Callable[[int], None]) -> Digest | None:
        """Put ``file`` at ``staging / file.path``; return the digest to check it against."""


class _ModelCache:
    """``<cache_root>/<scheme>/<id>/``: revision folders, staging folders, a lock."""

    def __init__(self, cache_root: Path, scheme: str, cache_id: tuple[str, ...]) -> None:
        self.directory = cache_root.expanduser() / scheme / Path(*map(_safe, cache_id))

    def complete(self, revision: str, source: ModelSource) -> Fetched | None:
        marker = self.directory / revision / COMPLETE_MARKER
        if not marker.is_file():
            return None
        files = tuple(f["path"] for f in json.loads(marker.read_text())["files"])
        return Fetched(self.directory / revision, revision, source.text, files)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held while one process downloads; others wait, then find the revision complete."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def staging(self, revision: str) -> Path:
        """This revision's staging folder, kept from a killed run; other revisions' removed."""
        for stale in self.directory.glob(_STAGING_PREFIX + "*"):
            if stale.name != _STAGING_PREFIX + revision:
                shutil.rmtree(stale, ignore_errors=True)
        leftover = self.directory / revision
        if leftover.exists():  # a revision folder without its marker: not ours to trust
            shutil.rmtree(leftover)
        staging = self.directory / (_STAGING_PREFIX + revision)
        staging.mkdir(exist_ok=True)
        for partial in staging.rglob("*.incomplete"):  # huggingface_hub's, never resumed
            partial.unlink()
        return staging

    def publish(self, staging: Path, revision: str, files: list[RemoteFile],
                source: ModelSource) -> Fetched:
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's local_dir state
        marker = {"source": source.public, "revision": revision,
                  "files": [{"path": f.path, "size": f.size} for f in files]}
        with open(staging / COMPLETE_MARKER, "w") as out:
            json.dump(marker, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.rename(staging, self.directory / revision)
        return Fetched(self.directory / revision, revision, source.text,
                       tuple(f.path for f in files))


def _fetch_remote(remote: _Remote, source: ModelSource, cache_root: Path,
                  progress: Progress | None) -> Fetched:
    cache = _ModelCache(cache_root, source.scheme, remote.cache_id)
    pinned = remote.pinned()
    if pinned and (hit := cache.complete(pinned, source)):
        return hit
    revision, files = remote.listing()
    if not _REVISION.fullmatch(revision):  # it becomes a folder name: never a path
        raise ArtifactError(f"model source {source.public}: the store named revision "
                            f"{revision[:60]!r}, not a sha (40 or 64 hexadecimal digits)")
    if pinned and revision != pinned:  # S3: objects changed since the revision was pinned
        raise ArtifactError(f"model source {source.public}: the store now holds revision "
                            f"{revision}, not the pinned {pinned} (objects changed since); "
                            f"prepare again without the pin to take the new one")
    if hit := cache.complete(revision, source):
        return hit
    with cache.locked():
        if hit := cache.complete(revision, source):
            return hit
        _check_space(source, cache.directory / (_STAGING_PREFIX + revision), files)
        staging = cache.staging(revision)
        tracker = _Tracker(progress, files, staging)
        try:
            for file in files:
                digest = remote.download(file, staging, revision, tracker.advance)
                _verify(file, staging / file.path, digest)
        except _Mismatch as mismatch:
            shutil.rmtree(staging, ignore_errors=True)
            raise ArtifactError(f"model source {source.public}: {mismatch}") from None
        return cache.publish(staging, revision, files, source)


def _check_space(source: ModelSource, staging: Path, files: list[RemoteFile]) -> None:
    """Fail before the first byte when the listed sizes do not fit, not halfway through
    (files a killed run left whole in the staging folder count as there)."""
    need = sum(f.size or 0 for f in files if not _whole(staging / f.path, f.size))
    free = shutil.disk_usage(_existing(staging)).free
    if need > free:
        raise ArtifactError(f"model source {source.public}: needs {_human(need)} ({need} bytes) "
                            f"in {staging.parent}, but only {_human(free)} ({free} bytes) are "
                            f"free")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


class _Tracker:
    """Adds up the bytes of all files for one progress callback."""

    def __init__(self, progress: Progress | None, files: list[RemoteFile], staging: Path) -> None:
        self.progress = progress
        self.total = sum(f.size or 0 for f in files)
        self.done = sum(f.size or 0 for f in files if _whole(staging / f.path, f.size))
        self.advance(0)

    def advance(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


def _verify(file: RemoteFile, path: Path, digest: Digest | None) -> None:
    size = path.stat().st_size
    if file.size is not None and size != file.size:
        raise _Mismatch(f"{file.path} has {size} bytes, the store lists {file.size}")
    if digest is None:
        return
    got = _digest(path, digest, size)
    if got != digest.value:
        raise _Mismatch(f"{file.path} does not match its {digest.kind} hash: expected "
                        f"{digest.value}, got {got}")


def _digest(path: Path, digest: Digest, size: int) -> str:
    """The hash of ``path`` computed the way ``digest`` was."""
    if digest.kind == "s3-multipart":
        parts = []
        with open(path, "rb") as data:
            for part in iter(lambda: data.read(digest.part_size), b""):
                parts.append(hashlib.md5(part).digest())
        return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"
    hasher = {"sha256": hashlib.sha256, "md5": hashlib.md5, "git-sha1": hashlib.sha1}[digest.kind]()
    if digest.kind == "git-sha1":
        hasher.update(f"blob {size}\0".encode())
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(_CHUNK), b""):
            hasher.update(block)
    return hasher.hexdigest()


# --- Hugging Face Hub ------------------------------------------------------------------------

class _Hub:
    """A hub repository through huggingface_hub: ``model_info`` lists, ``hf_hub_download`` gets.

    huggingface_hub checks sizes only, so the files are hashed here against the listing
    (sha256 of LFS files, git blob ids of the others). It resumes a dropped connection within
    one call; across a killed process, whole files already in the staging folder are kept.
    """

    def __init__(self, source: ModelSource, env: Mapping[str, str], timeout: float) -> None:
        self.source = source
        self.endpoint = env.get("HF_ENDPOINT") or None
        self.token = env.get("HF_TOKEN") or None
        self.timeout = timeout
        org, name = source.name.split("/")
        self.cache_id = (org, name, *((source.path,) if source.path else ()))

    def pinned(self) -> str | None:
        return self.source.exact_revision

    def listing(self) -> tuple[str, list[RemoteFile]]:
        from huggingface_hub import HfApi

        with _hub_online(), self._errors():
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                self.source.name, revision=self.source.revision, files_metadata=True,
                timeout=self.timeout)
        listed = {}
        for sibling in info.siblings or []:
            digest: Digest | None
            size: int | None
            if sibling.lfs is not None:
                digest = Digest("sha256", sibling.lfs.sha256)
                size = sibling.lfs.size
            else:
                digest = Digest("git-sha1", sibling.blob_id) if sibling.blob_id else None
                size = sibling.size
            listed[sibling.rfilename] = RemoteFile(sibling.rfilename, size, digest)
        if info.sha is None or not _SHA1.fullmatch(info.sha):  # it names a folder here
            raise ArtifactError(f"model source {self.source.public}: the hub named no commit "
                                f"sha (40 hexadecimal digits), got {str(info.sha)[:60]!r}")
        chosen = select_files(list(listed), self.source, named=self.source.path)
        return info.sha, [listed[p] for p in chosen]

    def download(self, file: RemoteFile, staging: Path, revision: str,
                 advance: Callable[[int], None]) -> Digest | None:
        from huggingface_hub import hf_hub_download

        with _hub_online(), self._errors():
            # cache_dir inside the staging folder: the user's own hub cache is neither read
            # nor written, so what lands here depends on the source alone.
            hf_hub_download(self.source.name, file.path, revision=revision, local_dir=staging,
                            cache_dir=staging / ".cache" / "hub", endpoint=self.endpoint,
                            token=self.token, etag_timeout=self.timeout,
                            tqdm_class=_bar_class(advance))
        return file.digest

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """huggingface_hub's exceptions as messages that name the source and what to do."""
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"model source {self.source.public}"
        repo = self.source.name
        try:
            yield
        except GatedRepoError:
            raise ArtifactError(f"{where}: {repo} is gated: accept its terms on the Hub and set "
                                f"HF_TOKEN (credentials) to a token of that account") from None
        except RepositoryNotFoundError as err:
            status = err.response.status_code
            why = "HF_TOKEN has no access to it" if self.token else "no HF_TOKEN was given"
            raise ArtifactError(f"{where}: repository {repo} not found, or private and {why} "
                                f"(HTTP {status}); check the name and the credentials") from None
        except RevisionNotFoundError:
            raise ArtifactError(f"{where}: revision {self.source.revision!r} not found in "
                                f"{repo} (HTTP 404)") from None
        except HfHubHTTPError as err:
            status = err.response.status_code
            if status in (401, 403):
                raise ArtifactError(f"{where}: the hub refused the credentials (HTTP {status}); "
                                    f"check HF_TOKEN") from None
            raise ArtifactError(f"{where}: the hub answered HTTP {status}") from None
        except OfflineModeIsEnabled:
            raise ArtifactError(f"{where}: HF_HUB_OFFLINE is set and this revision is not in "
                                f"the cache") from None
        except httpx2.TimeoutException:
            raise ArtifactError(f"{where}: timed out waiting for {self._host()}") from None
        except (httpx2.TransportError, OSError) as err:
            raise ArtifactError(f"{where}: cannot download from {self._host()}: {err}") from None

    def _host(self) -> str:
        from huggingface_hub import constants

        return self.endpoint or constants.ENDPOINT


class _HubOnline:
    """huggingface_hub's offline switch lifted while this module talks to a hub.

    The client reads ``HF_HUB_OFFLINE`` once, at import, into ``constants``. Pods set it for
    their serving containers, where transformers and tokenizers load from folders and must
    never reach out; the download step is the one place that should, and only to the
    endpoint it was given (``env``'s ``HF_ENDPOINT``). Telemetry is switched off for the
    same time: with it on, the client would ask ``constants.ENDPOINT`` (huggingface.co,
    unless ``HF_ENDPOINT`` was in the process environment at import) for its registry of
    agent harnesses. Counted, so that concurrent fetches restore the switches once, last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = (False, False)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        from huggingface_hub import constants

        with self._lock:
            if self._users == 0:
                self._saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY)
                constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY = False, True
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY = self._saved


_hub_online = _HubOnline()


def _bar_class(advance: Callable[[int], None]) -> type:
    """A tqdm class for huggingface_hub's ``tqdm_class`` that forwards byte counts."""
    from tqdm import tqdm

    class _Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            advance(int(n or 0))
            return super().update(n)

    return _Bar


# --- S3 --------------------------------------------------------------------------------------

class _S3:
    """An S3 prefix through boto3; each object pinned to its listed ETag while it downloads."""

    def __init__(self, source: ModelSource, env: Mapping[str, str], timeout: float) -> None:
        import boto3
        from botocore.config import Config

        self.source = source
        self.bucket = source.name
        # A prefix ending in .gguf names one object: its folder is listed, the file taken.
        folder, self.named = source.path, ""
        if source.path.endswith(".gguf"):
            folder, _, self.named = source.path.rpartition("/")
        self.prefix = f"{folder}/" if folder else ""
        self.cache_id = (source.name, *source.path.split("/")) if source.path else (source.name,)
        endpoint = source.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        session = boto3.session.Session(
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
            region_name=source.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            or "us-east-1")
        config = Config(connect_timeout=timeout, read_timeout=timeout,
                        retries={"max_attempts": _RETRIES, "mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint else None)
        self.client = session.client("s3", endpoint_url=endpoint, config=config)

    def pinned(self) -> str | None:
        return self.source.exact_revision

    def listing(self) -> tuple[str, list[RemoteFile]]:
        listed: dict[str, RemoteFile] = {}
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):
                        path = item["Key"][len(self.prefix):]
                        listed[path] = RemoteFile(path, item["Size"], None, item["Key"],
                                                  item["ETag"])
        if not listed:
            raise ArtifactError(f"model source {self.source.public}: no objects under "
                                f"s3://{self.bucket}/{self.prefix}")
        files = [listed[p] for p in select_files(list(listed), self.source, self.named)]
        pinned = "".join(f"{f.key}\t{f.etag}\n" for f in sorted(files, key=lambda f: f.key))
        return hashlib.sha256(pinned.encode()).hexdigest(), files

    def download(self, file: RemoteFile, staging: Path, revision: str,
                 advance: Callable[[int], None]) -> Digest | None:
        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ResponseStreamingError,
        )

        cut = (ConnectionError, ConnectionClosedError, IncompleteReadError, ResponseStreamingError)
        with self._errors(file.path):
            digest = self._expected(file)
            target = staging / file.path
            if not _whole(target, file.size):
                _resumable(target, file.size, advance, self.source, cut,
                           lambda start: self._open(file.key, file.etag, start))
        return digest

    def _expected(self, file: RemoteFile) -> Digest | None:
        """md5 for a single-part ETag; for ``<md5>-N``, the md5 of the parts' md5s, with the
        part size the store reports for part 1. None where the ETag is no md5 (SSE-KMS/-C)."""
        value = file.etag.strip('"')
        multipart = re.fullmatch(r"[0-9a-f]{32}-(\d+)", value)
        head = self.client.head_object(Bucket=self.bucket, Key=file.key, IfMatch=file.etag,
                                       **({"PartNumber": 1} if multipart else {}))
        if (head.get("ServerSideEncryption", "AES256") != "AES256"
                or head.get("SSECustomerAlgorithm")):
            return None
        if multipart:
            part_size = head["ContentLength"]
            whole = file.size is None or part_size >= file.size
            return None if whole else Digest("s3-multipart", value, part_size)
        return Digest("md5", value) if re.fullmatch(r"[0-9a-f]{32}", value) else None

    def _open(self, key: str, etag: str, start: int) -> tuple[Any, bool]:
        extra = {"Range": f"bytes={start}-"} if start else {}
        response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag, **extra)
        return response["Body"].iter_chunks(_CHUNK), bool(start and response.get("ContentRange"))

    @contextmanager
    def _errors(self, path: str = "") -> Iterator[None]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            FlexibleChecksumError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"model source {self.source.public}"
        try:
            yield
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                        "ExpiredToken", "InvalidToken") or status in (401, 403):
                raise ArtifactError(f"{where}: the store refused the credentials ({code}, HTTP "
                                    f"{status}); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                                    f"and what they may read") from None
            if code == "NoSuchBucket":
                raise ArtifactError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in ("PreconditionFailed", "412"):
                raise ArtifactError(f"{where}: {path} changed while it was downloaded; "
                                    f"prepare again") from None
            raise ArtifactError(f"{where}: {code or 'error'} (HTTP {status})") from None
        except NoCredentialsError:
            raise ArtifactError(f"{where}: no credentials; set AWS_ACCESS_KEY_ID and "
                                f"AWS_SECRET_ACCESS_KEY") from None
        except FlexibleChecksumError as err:
            raise _Mismatch(f"{path} does not match its stored checksum ({err})") from None
        except (ReadTimeoutError, ConnectTimeoutError):
            raise ArtifactError(f"{where}: timed out waiting for the store") from None
        except BotoCoreError as err:
            raise ArtifactError(f"{where}: {err}") from None


# --- https -----------------------------------------------------------------------------------

class _Https:
    """One file over HTTP(S), resumed with ``Range``, checked against the required sha256."""

    def __init__(self, source: ModelSource, timeout: float) -> None:
        self.source = source
        self.timeout = timeout
        url = urlsplit(source.name)
        self.name = PurePosixPath(url.path).name or "model"
        self.cache_id = (url.netloc, *[p for p in url.path.split("/") if p])

    def pinned(self) -> str | None:
        return self.source.exact_revision

    def listing(self) -> tuple[str, list[RemoteFile]]:
        assert self.source.sha256 is not None
        with self._errors(), urllib.request.urlopen(
                urllib.request.Request(self.source.name, method="HEAD"),
                timeout=self.timeout) as head:
            length = head.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        return self.source.sha256, [RemoteFile(self.name, size, Digest("sha256",
                                                                       self.source.sha256))]

    def download(self, file: RemoteFile, staging: Path, revision: str,
                 advance: Callable[[int], None]) -> Digest | None:
        target = staging / file.path
        if not _whole(target, file.size):
            cut = (ConnectionError, http.client.IncompleteRead, urllib.error.ContentTooShortError)
            with self._errors():
                _resumable(target, file.size, advance, self.source, cut, self._open)
        return file.digest

    def _open(self, start: int) -> tuple[Any, bool]:
        headers = {"Range": f"bytes={start}-"} if start else {}
        response = urllib.request.urlopen(urllib.request.Request(self.source.name,
                                                                 headers=headers),
                                          timeout=self.timeout)
        chunks = iter(lambda: response.read(_CHUNK), b"")
        return chunks, response.status == 206

    @contextmanager
    def _errors(self) -> Iterator[None]:
        where = f"model source {self.source.public}"
        try:
            yield
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise ArtifactError(f"{where}: HTTP {err.code}: the server wants credentials "
                                    f"this URL does not carry") from None
            raise ArtifactError(f"{where}: HTTP {err.code} {err.reason}") from None
        except TimeoutError:
            raise ArtifactError(f"{where}: timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise ArtifactError(f"{where}: timed out after {self.timeout:g} s") from None
            raise ArtifactError(f"{where}: cannot reach the server: {err.reason}") from None
        except (ValueError, http.client.InvalidURL) as err:  # its text may hold a password
            raise ArtifactError(f"{where}: not a URL that can be opened "
                                f"({type(err).__name__})") from None


def _whole(path: Path, size: int | None) -> bool:
    return path.is_file() and path.stat().st_size == size


def _resumable(target: Path, size: int | None, advance: Callable[[int], None],
               source: ModelSource, cut: tuple[type[Exception], ...],
               open_at: Callable[[int], tuple[Any, bool]]) -> None:
    """Stream into ``<target>.part`` from where it ends, retrying a ``cut`` connection; rename
    it to ``target`` when whole. ``open_at(start)`` gives the chunks and whether the server
    honoured the range (one that sends the whole file again starts the part over)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    advance(have)
    for attempt in range(_RETRIES + 1):
        try:
            chunks, ranged = open_at(have)
            with open(part, "ab" if ranged else "wb") as out:
                if have and not ranged:
                    advance(-have)
                    have = 0
                for chunk in chunks:
                    out.write(chunk)
                    have += len(chunk)
                    advance(len(chunk))
            if size is None or have >= size:
                break
        except cut:
            if attempt == _RETRIES:
                raise ArtifactError(f"model source {source.public}: the connection was cut "
                                    f"{_RETRIES + 1} times while downloading {target.name}; "
                                    f"prepare again to resume") from None
    os.rename(part, target)


# --- local sources ---------------------------------------------------------------------------

def _local(source: ModelSource, base_dir: Path | None) -> Fetched:
    from tritonop.artifacts.sources import locate

    path = Path(source.name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if source.scheme == "path" and path.is_file():
        return Fetched(path.parent, None, source.text, (path.name,))
    return Fetched(locate(source.text, base_dir), None, source.text, ())


def _is_hub_id(text: str, base_dir: Path | None) -> bool:
    repo = text.partition("@")[0]
    if not _HUB_ID.fullmatch(repo):
        return False
    path = Path(text)
    return not (base_dir / path if base_dir is not None else path).exists()


def _parse_hub(text: str, rest: str) -> tuple[str, str, str | None]:
    """``org/name[/file.gguf][@revision]`` into (repo id, GGUF path, revision)."""
    location, _, revision = rest.partition("@")
    parts = location.strip("/").split("/")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    if not _HUB_ID.fullmatch(repo) or (path and not path.endswith(".gguf")) or ".." in parts:
        raise ArtifactError(f"model source {text}: write hf://<org>/<name>[@<revision>], or "
                            f"hf://<org>/<name>/<file>.gguf[@<revision>] for one GGUF")
    if "@" in rest and not revision:
        raise ArtifactError(f"model source {text}: empty revision after '@'")
    return repo, path, revision or None


def _safe(component: str) -> str:
    """A path component that stays one folder inside the cache, whatever the source said."""
    quoted = quote(component, safe="@+-_=,")
    return quoted if quoted not in ("", ".", "..") and not quoted.startswith(".") else "%" + quoted


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


@contextmanager
def console_progress(description: str) -> Iterator[Progress]:
    """A tqdm bar on the terminal for :func:`fetch`'s ``progress`` (``tritonop serve``)."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=None)

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        bar.close()
