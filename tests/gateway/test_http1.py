"""The gateway's HTTP/1.1 client and Triton's HTTP errors, against a real local server.

The server is asyncio's own streams API on a free port, speaking HTTP/1.1 by hand, so
each test can make it do what Triton might: keep a connection alive or close it while
idle, answer in chunks, or take its time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import uvloop

from tritonop.gateway.backend import _binary_outputs, http_error
from tritonop.gateway.http1 import HTTPPool, Reply

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine on asyncio's own loop, then on uvloop's, which the gateway runs on
    under uvicorn (its transports are not asyncio's classes)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def running(coroutine):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)
    return running


async def _serve(handler: Handler) -> tuple[asyncio.Server, list[int]]:
    """A server calling ``handler(request body, writer)`` per request; it returns whether to
    keep the connection. Also returns a list that counts the connections accepted."""
    accepted: list[int] = []

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = await reader.readexactly(length)
                if not await handler(body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    return server, accepted


def _reply(status: int, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _echo(body: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(_reply(200, b"echo:" + body))
    await writer.drain()
    return True


def _address(server: asyncio.Server) -> str:
    return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_requests_reuse_one_kept_alive_connection_and_concurrent_ones_open_more(run):
    async def main() -> None:
        server, accepted = await _serve(_echo)
        pool = HTTPPool(_address(server))
        for i in range(5):
            reply = await pool.request("POST", "/x", b"%d" % i)
            assert (reply.status, reply.body) == (200, b"echo:%d" % i)
        assert len(accepted) == 1
        replies = await asyncio.gather(*(pool.request("POST", "/x", b"%d" % i)
                                         for i in range(4)))
        assert [r.body for r in replies] == [b"echo:%d" % i for i in range(4)]
        assert len(accepted) == 4  # one connection per request in flight, none shared
        pool.close()
        server.close()

    run(main())


def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error(run):
    async def once(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(_reply(200, body))
        await writer.drain()
        return False  # closes after each answer, though the reply did not say so

    async def main() -> None:
        server, accepted = await _serve(once)
        pool = HTTPPool(_address(server))
        for i in range(3):
            await asyncio.sleep(0.05)  # the close reaches the client first, or not: both work
            assert (await pool.request("POST", "/", b"%d" % i)).body == b"%d" % i
        assert len(accepted) == 3
        pool.close()
        server.close()

    run(main())


def test_chunked_replies_and_headers_are_read_whole(run):
    async def chunked(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\nX-Name: V\r\n\r\n"
                     b"5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)  # the reply arrives in two reads
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> Reply:
        server, _ = await _serve(chunked)
        pool = HTTPPool(_address(server))
        reply = await pool.request("POST", "/", b"{}")
        pool.close()
        server.close()
        return reply

    reply = run(main())
    assert (reply.status, reply.body, reply.headers["x-name"]) == (400, b"hello world", "V")


def test_a_cancelled_request_closes_its_connection_and_the_next_one_gets_a_fresh_one(run):
    async def slow(body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.3 if body == b"slow" else 0)
        writer.write(_reply(200, body))
        await writer.drain()
        return True

    async def main() -> None:
        server, accepted = await _serve(slow)
        pool = HTTPPool(_address(server))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.request("POST", "/", b"slow"), 0.05)
        # The slow reply must not be read as the answer to the next request.
        assert (await pool.request("POST", "/", b"fast")).body == b"fast"
        assert len(accepted) == 2
        await asyncio.sleep(0.4)
        assert (await pool.request("POST", "/", b"again")).body == b"again"
        pool.close()
        server.close()

    run(main())


def test_nothing_listening_is_a_connection_error_naming_the_address(run):
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        address = _address(server)
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionError, match=address.replace(".", r"\.")):
            await HTTPPool(address).request("GET", "/v2/health/ready")

    run(main())


def test_a_malformed_reply_is_a_connection_error_not_a_hang(run):
    async def garbage(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> None:
        server, _ = await _serve(garbage)
        with pytest.raises(ConnectionError, match="malformed"):
            await asyncio.wait_for(HTTPPool(_address(server)).request("POST", "/", b"x"), 5)
        server.close()

    run(main())


def _error(status: int, message: str) -> Reply:
    return Reply(status, {}, json.dumps({"error": message}).encode())


def test_triton_http_errors_become_openai_errors_with_the_clients_field_names(caplog):
    fields = {"text": "input"}
    err = http_error(_error(400, "in ensemble 'news', text: expected 1 element"), fields)
    assert (err.status, err.param) == (400, "input")
    assert err.body()["error"]["message"] == "input: expected 1 element"
    busy = http_error(_error(503, "Exceeds maximum queue size"), fields)
    assert (busy.status, busy.code, busy.headers()["Retry-After"]) == (503, "model_busy", "1")
    # Triton's own words about a fault go to the operator's log, not to the client.
    fault = http_error(_error(500, "Python model 'search' crashed in /opt/x/model.py"), fields)
    assert (fault.status, fault.code) == (502, "upstream_error")
    not_json = http_error(Reply(502, {}, b"<html>bad gateway</html>"), fields)
    assert not_json.status == 502
    for answer in (fault, not_json, busy):
        message = answer.body()["error"]["message"]
        assert "model.py" not in message and "bad gateway" not in message
        assert "queue size" not in message
    assert "model.py" in caplog.text and "bad gateway" in caplog.text


def test_binary_outputs_are_read_in_the_order_of_the_json_header():
    embedding = np.arange(6, dtype="<f4").reshape(2, 3)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype="<i8")
    header = json.dumps({"outputs": [
        {"name": "embedding", "datatype": "FP32", "shape": [2, 3],
         "parameters": {"binary_data_size": embedding.nbytes}},
        {"name": "attention_mask", "datatype": "INT64", "shape": [2, 3],
         "parameters": {"binary_data_size": mask.nbytes}}]}).encode()
    reply = Reply(200, {"inference-header-content-length": str(len(header))},
                  header + embedding.tobytes() + mask.tobytes())
    tensors = _binary_outputs(reply)
    np.testing.assert_array_equal(tensors["embedding"], embedding)
    np.testing.assert_array_equal(tensors["attention_mask"], mask)
