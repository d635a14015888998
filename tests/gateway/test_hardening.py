"""Inputs bounded before work, slow and stuck clients, hung calls and faults, on the real
stack: each gateway here is one more GatewayThread in front of the session's tritonserver,
with the limits a resource's ``spec.api.limits`` would give it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.gateway.test_admission import gauge, settle
from tests.support.triton import free_port, read_to_close
from tritonop.gateway.app import EMBEDDING_CHUNKS_IN_FLIGHT
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import Admission, InputLimits, gateway_config
from tritonop.gateway.protocol import MAX_BODY_BYTES
from tritonop.gateway.server import GatewayThread

pytestmark = pytest.mark.triton

SEARCH = {"model": "news", "text": "europe climate change storm", "num_results": 3}
# A raw prompt the model continues for as long as it may: no early end of sequence.
COUNTING = {"model": "chat", "prompt": ", ".join(str(i) for i in range(1, 30)) + ",",
            "max_tokens": 256, "temperature": 0}


@contextmanager
def gateway(stack, address: TritonAddress | None = None, header_timeout: float = 10,
            **models: dict[str, Any]) -> Iterator[GatewayThread]:
    """A gateway for the stack's resources, with ``models[name]`` replacing entry fields."""
    config = gateway_config(list(stack.triton.resources.values()))
    entries = {name: replace(entry, **models.get(name, {}))
               for name, entry in config.models.items()}
    address = address or TritonAddress(stack.grpc, stack.triton.server.http_url)
    thread = GatewayThread(replace(config, models=entries), address, free_port(),
                           header_timeout=header_timeout).start()
    try:
        yield thread
    finally:
        thread.stop()


def rss_mb() -> float:
    """This process's resident memory; the gateway runs here, on a thread."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def triton_metric(stack, name: str, **labels: str) -> float:
    url = f"http://localhost:{stack.triton.server.ports.metrics}/metrics"
    return gauge(httpx.get(url).text, name, **labels)


def gateway_metric(thread: GatewayThread, name: str, **labels: str) -> float:
    return gauge(httpx.get(f"{thread.url}/metrics").text, name, **labels)


def tokenizer_requests(stack) -> int:
    """Requests the embedding pipeline's first step has taken, once none is pending."""
    settle(lambda: triton_metric(stack, "nv_inference_pending_request_count",
                                 model="news_tokenizer") == 0)
    stats = stack.triton.model_stats("news_tokenizer")["inference_stats"]
    return int(stats["success"]["count"]) + int(stats["fail"]["count"])


def embeddings_done(stack) -> int:
    """Requests the embedding ensemble has answered in full."""
    stats = stack.triton.model_stats("news_embedding")["inference_stats"]
    return int(stats["success"]["count"])


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_512_mib_body_is_refused_413_without_the_gateway_holding_it(stack, declared):
    size, piece = 512 * 1024 * 1024, b" " * 65536

    def body() -> Iterator[bytes]:  # streamed: the client holds 64 KiB at a time
        for _ in range(size // len(piece)):
            yield piece

    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(size)
    before = rss_mb()
    answer = httpx.post(f"{stack.base_url}/embeddings", content=body(), headers=headers,
                        timeout=120)
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "body" and str(MAX_BODY_BYTES) in error["message"]
    assert rss_mb() - before < 50


def test_blank_or_oversized_embedding_inputs_are_400s_that_never_reach_triton(stack):
    limits = InputLimits(max_embedding_inputs=2048, max_input_characters=1000)
    with gateway(stack, news={"limits": limits}) as thread:
        before = tokenizer_requests(stack)
        for inputs, bound in [([" "] * 2048, "empty"), (["x" * 1001] * 2048, "1000")]:
            answer = httpx.post(f"{thread.url}/v1/embeddings",
                                json={"model": "news", "input": inputs}, timeout=120)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == "input[0]" and bound in error["message"]
        assert tokenizer_requests(stack) == before


def test_a_chunk_that_fails_in_triton_cancels_the_others(stack):
    """The gateway lets a text through that Triton's tokenizer refuses (its bound is the
    resource's 32,768 characters): its chunk fails there, and the 63 chunks after it are
    never sent, where they used to run on, orphaned, after the client had its 400.

    Sent are at most the chunks in flight when it failed plus one for each chunk that
    finished before (each freed a slot): a chunk after it may finish first on a busy
    machine, so the bound counts those rather than assuming none did."""
    limits = InputLimits(max_embedding_inputs=2048, max_input_characters=100_000)
    with gateway(stack, news={"limits": limits}) as thread:
        sent, done = tokenizer_requests(stack), embeddings_done(stack)
        texts = ["storm " * 7000] + ["europe climate change"] * 2047
        answer = httpx.post(f"{thread.url}/v1/embeddings",
                            json={"model": "news", "input": texts}, timeout=120)
        finished_first = embeddings_done(stack) - done
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "input"
        assert finished_first < 8, finished_first  # the failing chunk is the first sent
        assert tokenizer_requests(stack) - sent <= EMBEDDING_CHUNKS_IN_FLIGHT + finished_first
        assert gateway_metric(thread, "tritonop_gateway_requests_in_flight", model="news") == 0


def test_a_client_that_leaves_a_bulk_embedding_stops_its_chunks(stack):
    """2,048 texts are 64 chunks of 32; the client gives up after the first few, and the
    gateway sends no more (they used to run on to the last, for nobody)."""
    limits = InputLimits(max_embedding_inputs=2048, max_input_characters=100_000)
    with gateway(stack, news={"limits": limits}) as thread:
        sent = tokenizer_requests(stack)
        texts = [f"europe climate change storm number {i}" for i in range(2048)]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{thread.url}/v1/embeddings", json={"model": "news", "input": texts},
                       timeout=httpx.Timeout(30, read=0.3))
        settle(lambda: gateway_metric(thread, "tritonop_gateway_requests_in_flight",
                                      model="news") == 0)
        assert tokenizer_requests(stack) - sent < 64


def test_slowloris_connections_do_not_stop_a_valid_request_and_are_closed(stack):
    timeout = 5.0
    head = (b"POST /v1/search HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"X-Padding: " + b"a" * 200)
    with gateway(stack, header_timeout=timeout) as thread:
        host, port = thread.url.removeprefix("http://").rsplit(":", 1)
        opened = time.monotonic()
        held = [socket.create_connection((host, int(port))) for _ in range(300)]
        stop = threading.Event()

        def trickle() -> None:  # one byte per connection every 0.2 s, never the blank line
            for index in range(len(head)):
                for sock in held:
                    try:
                        sock.send(head[index:index + 1])
                    except OSError:
                        pass
                if stop.wait(0.2):
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            answer = httpx.post(f"{thread.url}/v1/search", json=SEARCH, timeout=30)
            assert answer.status_code == 200 and len(answer.json()["data"]) == 3
            assert time.monotonic() - opened < timeout  # all 300 were open meanwhile
            for sock in held:
                sock.settimeout(max(0.1, opened + timeout + 5 - time.monotonic()))
                answer_ = read_to_close(sock)
                assert answer_ == b"" or answer_.startswith(b"HTTP/1.1 408"), answer_[:200]
        finally:
            stop.set()
            sender.join()
            for sock in held:
                sock.close()


def test_a_client_that_stops_reading_a_stream_frees_its_place_within_the_stall_time(stack):
    stall = 1.0
    chat = {"limits": InputLimits(stream_stall_seconds=stall), "admission": Admission(1, 0)}
    with gateway(stack, chat=chat) as thread:
        host, port = thread.url.removeprefix("http://").rsplit(":", 1)
        tokens_before = triton_metric(stack, "tritonop_llm_generated_tokens_total",
                                      model="chat")
        body = json.dumps({**COUNTING, "stream": True}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's least
        stalled.connect((host, int(port)))
        try:
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
            sent = time.monotonic()
            settle(lambda: gateway_metric(thread, "tritonop_gateway_requests_in_flight",
                                          model="chat") == 1)
            settle(lambda: gateway_metric(thread, "tritonop_gateway_requests_in_flight",
                                          model="chat") == 0, timeout=60)
            freed = time.monotonic() - sent
            settle(lambda: triton_metric(stack, "tritonop_llm_running_sequences",
                                         model="chat") == 0)
            generated = triton_metric(stack, "tritonop_llm_generated_tokens_total",
                                      model="chat") - tokens_before
            # The one place is free again: a request that needs it is admitted.
            answer = httpx.post(f"{thread.url}/v1/completions",
                                json={**COUNTING, "max_tokens": 1}, timeout=60)
            assert answer.status_code == 200, answer.text
        finally:
            stalled.close()
    assert generated < COUNTING["max_tokens"]  # cancelled, not run to its end
    # From the request: its first few events fill the client's buffer, then the stall.
    assert freed < stall + 6, (freed, generated)


def test_a_generation_slower_than_the_triton_timeout_is_a_504_and_cancelled(stack):
    with gateway(stack, chat={"limits": InputLimits(triton_timeout_seconds=1)}) as thread:
        tokens_before = triton_metric(stack, "tritonop_llm_generated_tokens_total",
                                      model="chat")
        started = time.monotonic()
        # Not streamed: the model sends its one response at the end, 256 tokens away.
        answer = httpx.post(f"{thread.url}/v1/completions", json=COUNTING, timeout=120)
        took = time.monotonic() - started
        assert answer.status_code == 504, answer.text
        error = answer.json()["error"]
        assert error["code"] == "upstream_timeout" and "1 s" in error["message"]
        assert took < 5
        settle(lambda: triton_metric(stack, "tritonop_llm_running_sequences",
                                     model="chat") == 0)
        generated = triton_metric(stack, "tritonop_llm_generated_tokens_total",
                                  model="chat") - tokens_before
        assert generated < COUNTING["max_tokens"]
        assert gateway_metric(thread, "tritonop_gateway_requests_in_flight", model="chat") == 0


@contextmanager
def hung_http() -> Iterator[str]:
    """An HTTP endpoint that says it is ready and never answers an infer call: a Triton
    whose model hangs, as the gateway sees it."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def handle(conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\r\n\r\n" in buffer:
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in connections:
            conn.close()


def test_a_triton_http_call_that_hangs_is_a_504(stack):
    with hung_http() as address:
        triton = TritonAddress(stack.grpc, address)
        limits = InputLimits(triton_timeout_seconds=1)
        with gateway(stack, address=triton, news={"limits": limits}) as thread:
            for route, body in [("/v1/search", SEARCH),
                                ("/v1/embeddings", {"model": "news", "input": ["hello"]})]:
                started = time.monotonic()
                answer = httpx.post(f"{thread.url}{route}", json=body, timeout=30)
                assert answer.status_code == 504, answer.text
                assert answer.json()["error"]["code"] == "upstream_timeout"
                assert address not in answer.text
                assert time.monotonic() - started < 5
            assert gateway_metric(thread, "tritonop_gateway_requests_in_flight",
                                  model="news") == 0


def test_an_unexpected_fault_is_a_500_error_object_counted_in_the_metrics(stack):
    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("disk /var/lib/tritonop/secret.bin unreadable")

    with gateway(stack) as thread:
        thread.server.config.app.state.gateway.backend.embed = broken
        answer = httpx.post(f"{thread.url}/v1/embeddings",
                            json={"model": "news", "input": ["hello"]}, timeout=30)
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert "RuntimeError" not in answer.text and "secret" not in answer.text
        assert gateway_metric(thread, "tritonop_gateway_requests_total",
                              route="/v1/embeddings", status="500") == 1
        # The place is given back and the gateway keeps serving.
        assert httpx.post(f"{thread.url}/v1/search", json=SEARCH).status_code == 200


def test_an_unreachable_triton_is_a_503_that_does_not_say_where_triton_is(stack):
    closed = free_port()
    triton = TritonAddress(f"127.0.0.1:{closed}", stack.triton.server.http_url)
    with gateway(stack, address=triton) as thread:
        answer = httpx.post(f"{thread.url}/v1/chat/completions", timeout=30, json={
            "model": "chat", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "model_not_ready"
        for internal in (str(closed), "127.0.0.1", "localhost", "ipv4", "Error"):
            assert internal not in answer.text, answer.text


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain",
                                          None])
def test_a_post_not_declared_json_is_415_as_a_web_page_would_send_it(stack, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    for route, body in [("/search", SEARCH), ("/embeddings", {"model": "news", "input": "a"}),
                        ("/chat/completions", {"model": "chat", "messages": []}),
                        ("/completions", {"model": "chat", "prompt": "a"})]:
        answer = httpx.post(f"{stack.base_url}{route}", content=json.dumps(body),
                            headers=headers, timeout=30)
        assert answer.status_code == 415, answer.text
        error = answer.json()["error"]
        assert error["param"] == "Content-Type" and "application/json" in error["message"]
    answer = httpx.post(f"{stack.base_url}/search", content=json.dumps(SEARCH), timeout=30,
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert answer.status_code == 200
