"""The gateway's HTTP/1.1 connections: uvicorn's httptools protocol with the bounds it lacks.

uvicorn closes a kept-alive connection that idles between requests, but nothing bounds a
request's head: a connection that sends its headers a byte at a time, or nothing at all,
is held for ever, and httptools buffers a header of any size (uvicorn's
``h11_max_incomplete_event_size`` applies to h11 only, which the gateway does not run).
:class:`GatewayProtocol` adds:

- a deadline for each request head, from the connection's opening or the head's first
  byte: a connection that has not finished its headers by then is closed (slowloris);
- a size bound on a request head, answered 431;
- OpenAI error objects where uvicorn answers plain text itself (malformed HTTP, 503 beyond
  ``limit_concurrency``);
- a probe of the connection in every request's scope (``scope["extensions"]``), so that a
  streamed answer can tell a client that takes no data from a model that is slow
  (:class:`StallGuard`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import struct
import termios
import time
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tritonop.gateway.errors import APIError

log = logging.getLogger(__name__)

HEADER_TIMEOUT_SECONDS = 10.0
"""How long a request head may take to arrive. Real clients send theirs in one packet."""
MAX_HEADER_BYTES = 32 * 1024
"""The most bytes of one request head (request line and headers); nginx's default is 32 KiB
too (``large_client_header_buffers 4 8k``)."""
CONNECTION_EXTENSION = "tritonop.connection"
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # Linux's SIOCOUTQ; absent on some systems


class ConnectionProbe:
    """What a route may ask of its connection: bytes not yet taken by the client, and an end.

    A client that stops reading shows first as bytes that stay in the kernel's send queue
    (its receive window is closed), and only once that queue and the client's receive
    buffer are full as a blocked write: up to megabytes later on a fast link. So the queue
    is read directly (``SIOCOUTQ``), beside the transport's own buffer.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def unsent(self) -> int:
        """Bytes written to this connection that the client has not acknowledged."""
        size = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and _OUTQ is not None:
            try:
                queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
                size += struct.unpack("i", queued)[0]
            except (OSError, ValueError):  # not a TCP socket, or already closed
                pass
        return size

    def abort(self) -> None:
        """Close at once, dropping what is still buffered: a client that takes nothing
        would hold a graceful close open for as long as it likes."""
        self.transport.abort()


class StallGuard:
    """Ends a response whose client has taken no data for ``seconds`` while data waits.

    Progress is what the client has taken: the bytes handed to ``send`` less those still
    unsent. A model that is merely slow leaves nothing unsent, so it never counts as a
    stall. Ending means aborting the connection: the server then reports a disconnect,
    which ends the response as a client that leaves would (its Triton request cancelled,
    its admission place freed).
    """

    def __init__(self, probe: ConnectionProbe, seconds: float) -> None:
        self.probe = probe
        self.seconds = seconds
        self.sent = 0
        self.stalled = False

    @classmethod
    def of(cls, scope: dict[str, Any], seconds: float) -> StallGuard | None:
        """A guard for the request of ``scope``, or None where the server offers no probe."""
        probe = (scope.get("extensions") or {}).get(CONNECTION_EXTENSION)
        return None if probe is None else cls(probe, seconds)

    def wrap(self, send: Any) -> Any:
        async def counted(message: dict[str, Any]) -> None:
            self.sent += len(message.get("body", b""))
            await send(message)

        return counted

    async def watch(self) -> None:
        """Run until cancelled, or until the client stalls (then abort its connection)."""
        interval = min(1.0, self.seconds / 4)
        taken, since = float("-inf"), time.monotonic()
        while True:
            await asyncio.sleep(interval)
            unsent = self.probe.unsent()
            now = time.monotonic()
            if unsent == 0 or self.sent - unsent > taken:
                taken, since = self.sent - unsent, now
            elif now - since >= self.seconds:
                log.info("a client took no data for %.0f s with %d bytes waiting: its "
                         "stream is ended", now - since, unsent)
                self.stalled = True
                self.probe.abort()
                return


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on request heads.

    Subclasses made by :func:`protocol_class` set the bounds; uvicorn builds one instance
    per connection.
    """

    header_timeout = HEADER_TIMEOUT_SECONDS
    max_header_bytes = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check answers plain text; the same check is made here instead.
        self.connection_limit, self.limit_concurrency = self.limit_concurrency, None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None  # of a request head not complete yet
        self._refused = False

    # A request head: from the connection's opening or its first byte to its end.
    def _await_head(self) -> None:
        if self._head_bytes is None:
            self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_done(self) -> None:
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(408, f"request head: not complete within {self.header_timeout:g} s",
                         "request_timeout")
        else:
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._head_bytes is not None
        if waiting:
            self._head_bytes += len(data)  # type: ignore[operator]
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        if not waiting:  # a head began within this data
            self._head_bytes += len(data)
        if self._head_bytes > self.max_header_bytes:
            self._refuse(431, f"request head: above the limit of {self.max_header_bytes} "
                         "bytes", "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_head()
        self.scope["extensions"] = {CONNECTION_EXTENSION: ConnectionProbe(self.transport)}

    def on_headers_complete(self) -> None:
        self._head_done()
        # A head that came in one read was never counted in data_received: count it here.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._refuse(431, f"request head: above the limit of {self.max_header_bytes} "
                         "bytes", "headers_too_large")
            raise _Refused  # stops the parser; uvicorn's handler then finds it answered
        limit = self.connection_limit
        busy = limit is not None and (len(self.connections) >= limit
                                      or len(self.tasks) >= limit)
        self.app = _too_many_connections if busy else self.config.loaded_app
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            self._refuse(400, "request: not valid HTTP/1.1", "invalid_http")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer an error object and close, before any request reached the app."""
        self._head_done()
        self._refused = True
        body = json.dumps(APIError(status, message, code=code).body()).encode()
        phrase = HTTPStatus(status).phrase
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), body))
        self.transport.close()


class _Refused(Exception):
    """Raised from a parser callback once the connection has been answered and closed."""


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    error = APIError(503, "the gateway holds as many connections as it takes; retry shortly",
                     code="too_many_connections", retry_after=1)
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def protocol_class(header_timeout: float = HEADER_TIMEOUT_SECONDS,
                   max_header_bytes: int = MAX_HEADER_BYTES) -> type[GatewayProtocol]:
    """A :class:`GatewayProtocol` with these bounds, for ``uvicorn.Config(http=...)``."""
    return type("BoundedGatewayProtocol", (GatewayProtocol,),
                {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes})
