"""API keys: who may call the gateway, decided in one place in front of every route.

Keys come from a folder laid out as a Kubernetes Secret volume (one file per client: the
file's name is the client's name, its content the key) and/or one key given on the
command line (the client ``default``). Only SHA-256 hashes of the keys are kept; a
presented key is hashed and compared in constant time with every stored hash. The folder
is re-read when it changes (the kubelet swaps its ``..data`` link atomically when the
Secret changes), so a rotated key takes effect without a restart.

:class:`RequireKey` is a pure ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a
task per request and buffers streams): it answers 401 before any route, known or not,
runs, and hands the client's name to the routes. :class:`AccessLog` writes one line per
request with that name, never the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
access_log = logging.getLogger("tritonop.gateway.access")

MAX_KEY_BYTES = 1024  # longer presented keys are refused before they are hashed
RELOAD_INTERVAL_SECONDS = 1.0
DEFAULT_CLIENT = "default"  # the name of the one key given with --api-key
NO_CLIENT = "-"  # the client's name where no key is needed
OPEN_PATHS = frozenset({"/health/live", "/health/ready"})  # probes carry no key
METRICS_PATH = "/metrics"
STATE_KEY = "api_client"  # scope["state"][STATE_KEY]: the client's name, for the routes

# The client the current request is served for: set by RequireKey for the request's task
# (and the tasks it starts), read where admission and metrics need the name.
current_client: ContextVar[str] = ContextVar("tritonop_api_client", default=NO_CLIENT)


class KeyStoreError(Exception):
    """The keys folder cannot be read at start."""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyStore:
    """Hashes of the keys clients may present, by client name.

    Args:
        directory: a folder of keys as a Secret volume lays it out, or None.
        key: one key for the client ``default`` (``--api-key``), or None.

    Raises:
        KeyStoreError: when ``directory`` cannot be read at start; a later failed re-read
            keeps the keys read before.
    """

    def __init__(self, directory: Path | None = None, key: str | None = None) -> None:
        self.directory = directory
        self._single: list[tuple[str, bytes]] = []
        if key is not None:
            single = key.strip().encode()
            if not single or len(single) > MAX_KEY_BYTES:
                raise KeyStoreError(f"--api-key: the key must have 1 to {MAX_KEY_BYTES} bytes")
            self._single = [(DEFAULT_CLIENT, _digest(single))]
        self._hashes: list[tuple[str, bytes]] = list(self._single)
        self._seen: tuple[object, ...] | None = None
        if directory is not None:
            try:
                self._read()
            except OSError as err:
                raise KeyStoreError(f"cannot read the API keys in {directory}: "
                                    f"{err.strerror or err}") from None

    @property
    def clients(self) -> list[str]:
        """The names of the clients that have a key (never the keys)."""
        return [name for name, _ in self._hashes]

    def lookup(self, presented: bytes | None) -> str | None:
        """The name of the client whose key ``presented`` is, or None.

        Every stored hash is compared, each in constant time, so the time taken does not
        tell how much of a key was right nor which client's key matched.
        """
        if not presented or len(presented) > MAX_KEY_BYTES:
            return None
        digest = _digest(presented)
        found = None
        for name, stored in self._hashes:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found

    def refresh(self) -> bool:
        """Re-read the folder if it changed; returns whether the keys were replaced.

        A read that fails keeps the previous keys, says why in the log, and is tried
        again at the next call.
        """
        if self.directory is None:
            return False
        try:
            if _fingerprint(self.directory) == self._seen:
                return False
            self._read()
        except OSError as err:
            self._seen = None
            log.warning("could not re-read the API keys in %s (%s); keeping the %d keys "
                        "read before", self.directory, err.strerror or type(err).__name__,
                        len(self._hashes))
            return False
        log.info("API keys re-read from %s: %d clients", self.directory, len(self._hashes))
        return True

    async def watch(self, interval: float = RELOAD_INTERVAL_SECONDS) -> None:
        """Refresh every ``interval`` seconds until cancelled (from the app's lifespan)."""
        while True:
            await asyncio.sleep(interval)
            self.refresh()

    def _read(self) -> None:
        assert self.directory is not None
        seen = _fingerprint(self.directory)
        hashes = [*_read_keys(_payload(self.directory)), *self._single]
        if not hashes:
            log.warning("no API keys in %s: every request that needs a key is refused",
                        self.directory)
        self._hashes = hashes
        self._seen = seen


def _payload(directory: Path) -> Path:
    """The folder to read: the one ``..data`` points at in a Secret volume.

    Reading through ``..data``'s target once, rather than through the per-key links, sees
    one version of the Secret whole even if the kubelet swaps it meanwhile.
    """
    data = directory / "..data"
    return directory / os.readlink(data) if data.is_symlink() else directory


def _read_keys(folder: Path) -> Iterable[tuple[str, bytes]]:
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if name.startswith(".") or not path.is_file():
            continue  # the kubelet's ..data and ..<timestamp> entries, folders
        key = path.read_bytes().strip()
        if not key:
            log.warning("API key of client %r is empty; it is ignored", name)
        elif len(key) > MAX_KEY_BYTES:
            log.warning("API key of client %r is longer than %d bytes; it is ignored",
                        name, MAX_KEY_BYTES)
        else:
            yield name, _digest(key)


def _fingerprint(directory: Path) -> tuple[object, ...]:
    """What changes when the keys do: ``..data``'s target, each entry's inode and mtime."""
    entries: list[object] = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") and name != "..data":
            continue
        path = directory / name
        stat = path.stat()
        entries.append((name, os.readlink(path) if path.is_symlink() else None,
                        stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """The key a request presents, and whether it sent an Authorization of another scheme.

    ``Authorization: Bearer <key>`` (as OpenAI's clients send it) wins over
    ``x-api-key: <key>`` (as Anthropic-style clients send it).
    """
    bearer: bytes | None = None
    api_key: bytes | None = None
    other_scheme = False
    for name, value in headers:
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                bearer = token.strip()
            else:
                other_scheme = True
        elif name == b"x-api-key" and api_key is None:
            api_key = value.strip()
    return (bearer if bearer is not None else api_key), other_scheme


def unauthorized_body(message: str) -> bytes:
    """An OpenAI error object, as OpenAI answers a bad key."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}}).encode()


class RequireKey:
    """Refuses every request without a valid key with 401, except the open paths.

    Args:
        app: the application behind.
        keys: the keys; None lets every request in (no auth configured).
        protect_metrics: whether ``/metrics`` needs a key too.
        on_refused: called once per refused request (a metric).
    """

    def __init__(self, app: ASGIApp, keys: KeyStore | None, protect_metrics: bool = False,
                 on_refused: Callable[[], None] | None = None) -> None:
        self.app = app
        self.keys = keys
        self.open = OPEN_PATHS if protect_metrics else OPEN_PATHS | {METRICS_PATH}
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = NO_CLIENT
        if self.keys is not None and not (scope["type"] == "http"
                                          and scope["path"] in self.open):
            key, other_scheme = presented_key(scope["headers"])
            found = self.keys.lookup(key)
            if found is None:
                if self.on_refused is not None:
                    self.on_refused()
                await self._refuse(scope, send, key, other_scheme)
                return
            client = found
        scope.setdefault("state", {})[STATE_KEY] = client
        token = current_client.set(client)
        try:
            await self.app(scope, receive, send)
        finally:
            current_client.reset(token)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, key: bytes | None, other_scheme: bool) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if key:
            message = "invalid API key"
            if len(key) > MAX_KEY_BYTES:
                message += f" (longer than {MAX_KEY_BYTES} bytes)"
        elif other_scheme:
            message = ("Authorization: only the Bearer scheme is accepted "
                       "(Authorization: Bearer <key>, or x-api-key: <key>)")
        else:
            message = ("missing API key: send Authorization: Bearer <key> "
                       "(or x-api-key: <key>)")
        body = unauthorized_body(message)
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One line per HTTP request on ``tritonop.gateway.access``: method, path, status,
    duration and the client's name. Neither the query string nor any header is logged,
    so a key never is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500
            raise
        finally:
            access_log.info("%s %s %d %.1fms client=%s", scope["method"],
                            _printable(scope["path"]), status,
                            (time.perf_counter() - started) * 1000,
                            scope.get("state", {}).get(STATE_KEY, NO_CLIENT))


def _printable(path: str, limit: int = 200) -> str:
    """The path as one log line: control characters escaped, long paths cut."""
    text = path if path.isprintable() else path.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."
