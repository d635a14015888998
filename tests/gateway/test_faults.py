"""Faults the real stack cannot be made to show on demand, each at the narrowest real level:
a completion the model server cancels (it happens when Triton unloads the model mid-answer),
the embeddings fan-out when a chunk fails, and request heads that are too big or malformed
(a real gateway on a real socket; no Triton is needed before a request is complete).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.triton import free_port, read_to_close
from tritonop.gateway.app import create_app, gather_bounded
from tritonop.gateway.backend import Piece, TritonAddress
from tritonop.gateway.config import Admission, GatewayConfig, ModelEntry
from tritonop.gateway.connections import MAX_HEADER_BYTES
from tritonop.gateway.server import GatewayThread

CONFIG = GatewayConfig({"chat": ModelEntry("chat", "chat", Admission(1, 1),
                                           max_tokens_limit=64)})
NOWHERE = TritonAddress(f"localhost:{free_port()}", f"localhost:{free_port()}")


class CancellingBackend:
    """Triton's LLM model as it answers while it unloads: some text, then "cancelled"."""

    async def generate(self, args, fields, timeout=None) -> AsyncIterator[Piece]:
        yield Piece("Par", None, 7, 1)
        yield Piece("", "cancelled", 7, 1)


def _ask(body: dict) -> httpx.Response:
    async def main() -> httpx.Response:
        app = create_app(CONFIG, NOWHERE)
        gateway = app.state.gateway
        gateway.backend, gateway.ready = CancellingBackend(), {"chat": True}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://gateway") as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(main())


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Capital of France?"}]}


def test_a_completion_the_server_cancels_is_503_with_retry_after_not_a_200():
    answer = _ask(CHAT)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "cancelled"


def test_a_streamed_completion_the_server_cancels_ends_with_an_error_event():
    answer = _ask({**CHAT, "stream": True})
    assert answer.status_code == 200  # the headers went out with the first piece
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "cancelled" and "retry" in error["message"]
    assert not any('"finish_reason": "cancelled"' in event for event in events)


def test_embedding_chunks_run_two_at_a_time_and_a_failure_cancels_the_rest():
    async def main() -> tuple[int, list[int], list[int]]:
        running, started, finished = 0, [], []
        most = 0

        async def call(index: int) -> int:
            nonlocal running, most
            started.append(index)
            running += 1
            most = max(most, running)
            try:
                await asyncio.sleep(0.05 if index != 1 else 0.01)
                if index == 1:
                    raise ValueError("chunk 1 refused")
                finished.append(index)
                return index
            finally:
                running -= 1

        assert await gather_bounded(call, [0, 2, 3], 2) == [0, 2, 3]
        started.clear(), finished.clear()
        with pytest.raises(ValueError):
            await gather_bounded(call, list(range(64)), 2)
        await asyncio.sleep(0.1)  # anything left running would finish now
        return most, started, finished

    most, started, finished = asyncio.run(main())
    assert most == 2
    assert started == [0, 1] and finished == []  # chunk 0 was cancelled, none started after


@pytest.fixture(scope="module")
def nowhere_gateway():
    gateway = GatewayThread(CONFIG, NOWHERE, free_port(), header_timeout=1).start()
    yield gateway
    gateway.stop()


def _raw(gateway: GatewayThread, data: bytes, timeout: float = 10) -> bytes:
    """What the gateway answers to ``data`` on a fresh connection, up to its close."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # closed while sending: the answer may still be there
            pass
        return read_to_close(sock)


def _status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_request_head_above_the_bound_is_431_and_closed(nowhere_gateway):
    answer = _raw(nowhere_gateway, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: "
                  + b"a" * (4 * MAX_HEADER_BYTES))
    status, error = _status_and_error(answer)
    assert status == 431 and str(MAX_HEADER_BYTES) in error["message"]


def test_malformed_http_is_a_400_error_object(nowhere_gateway):
    status, error = _status_and_error(_raw(nowhere_gateway, b"GARBAGE\x00 / HTTP/9\r\n\r\n"))
    assert status == 400 and error["code"] == "invalid_http"


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(nowhere_gateway):
    assert _raw(nowhere_gateway, b"", timeout=5) == b""
    status, error = _status_and_error(_raw(nowhere_gateway, b"GET /v1/mod", timeout=5))
    assert status == 408 and error["code"] == "request_timeout"


def test_a_request_head_above_the_bound_in_one_packet_is_431_too(nowhere_gateway):
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 60) for i in range(1000))
    status, error = _status_and_error(
        _raw(nowhere_gateway, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"))
    assert status == 431 and str(MAX_HEADER_BYTES) in error["message"]
