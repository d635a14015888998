"""How a gateway process stops: ``tritonop gateway`` as the pod runs it, in front of the real
Triton of the session's stack, told to stop by SIGTERM as the kubelet does.

Triton's HTTP port is reached through a relay that can hold one search on its way to Triton,
so that a request is in flight for as long as a test needs (no timing involved): readiness
fails at once, new requests are still answered during the drain, the listening socket closes
after it, and the process waits for the held request (or a stream) before it exits.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cluster import wait_for
from tests.support.triton import free_port
from tritonop.cli import main
from tritonop.gateway.config import gateway_config
from tritonop.gateway.server import Drain

DRAIN = 10.0  # long enough for the checks made within it, on a loaded machine


def test_drain_window_starts_once_and_ends_after_its_seconds():
    drain = Drain(10)
    assert not drain.draining and not drain.over(1e9)
    assert drain.begin(100.0) and drain.draining
    assert not drain.begin(103.0)  # a second signal does not restart the window
    assert not drain.over(109.9) and drain.over(110.0)
    at_once = Drain(0)
    assert not at_once.over(5.0) and at_once.begin(5.0) and at_once.over(5.0)


@pytest.mark.parametrize("value", ["-1", "121", "nan"])
def test_a_drain_out_of_bounds_is_refused_naming_the_option(value, capsys):
    assert main(["gateway", "--config", "gateway.json", "--drain-seconds", value]) == 2
    assert "--drain-seconds" in capsys.readouterr().err


class HoldingRelay:
    """A TCP relay to Triton's HTTP port that holds the first POST sent through it after
    :meth:`arm`, until :meth:`release` (health checks, GETs, pass)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = False
        self.holding = threading.Event()
        self.released = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        self.armed = True

    def release(self) -> None:
        self.released.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, gated: bool) -> None:
        try:
            while data := source.recv(65536):
                if gated and data.startswith(b"POST "):
                    with self.lock:
                        hold, self.armed = self.armed, False
                    if hold:
                        self.holding.set()
                        self.released.wait()
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.released.set()
        self.listener.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict


def request(port: int, method: str, path: str, body: dict | None = None) -> Answer:
    """One request on a connection of its own, as a client through a Service makes it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                      json.loads(response.read() or b"null"))
    finally:
        connection.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


@dataclass
class Gateway:
    process: subprocess.Popen
    port: int
    relay: HoldingRelay
    log: Path

    def search(self, text: str) -> Answer:
        return request(self.port, "POST", "/v1/search",
                       {"model": "news", "text": text, "num_results": 3})

    def held_search(self, text: str) -> tuple[threading.Thread, list]:
        """A search held at the relay on its way to Triton: in flight until released."""
        self.relay.arm()
        outcome: list = []

        def ask() -> None:
            try:
                outcome.append(self.search(text))
            except OSError as error:
                outcome.append(error)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        assert self.relay.holding.wait(60), self.log.read_text()
        return thread, outcome


@pytest.fixture
def gateway(stack, tmp_path) -> Iterator[Gateway]:
    """``tritonop gateway`` on a free port, Triton's HTTP port through a relay."""
    config = tmp_path / "gateway.json"
    config.write_text(gateway_config(list(stack.triton.resources.values())).to_json())
    relay = HoldingRelay(stack.triton.server.http_url)
    port, log = free_port(), tmp_path / "gateway.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tritonop.cli", "gateway", "--config", str(config),
             "--triton", stack.triton.server.grpc_url, "--triton-http", f"127.0.0.1:{relay.port}",
             "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", str(DRAIN)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        def started() -> bool:
            if process.poll() is not None:
                return True
            return accepts(port) and request(port, "GET", "/health/ready").status == 200

        wait_for(started, 120, "the gateway ready")
        assert process.poll() is None, log.read_text()
        yield Gateway(process, port, relay, log)
    finally:
        relay.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_fails_readiness_serves_the_drain_then_waits_for_requests_in_flight(gateway):
    before = gateway.search("europe climate change storm")
    assert before.status == 200 and len(before.body["data"]) == 3
    held, outcome = gateway.held_search("europe climate change storm")

    gateway.process.send_signal(signal.SIGTERM)
    # Readiness fails at once, without asking Triton; the gateway is still live.
    ready = request(gateway.port, "GET", "/health/ready")
    assert ready.status == 503 and ready.body["draining"] is True
    assert request(gateway.port, "GET", "/health/live").status == 200
    # A new request in the drain window, on a new connection, is answered, and the answer
    # asks a kept-alive client to reconnect (to another pod).
    during = gateway.search("storm damage in northern europe")
    assert during.status == 200 and len(during.body["data"]) == 3
    assert during.headers.get("connection") == "close"

    # After the drain the listening socket closes; the held request keeps the process up.
    wait_for(lambda: not accepts(gateway.port), DRAIN + 60, "the listening socket closed")
    assert gateway.process.poll() is None, gateway.log.read_text()
    assert held.is_alive()
    gateway.relay.release()
    held.join(60)
    (answer,) = outcome
    assert isinstance(answer, Answer) and answer.status == 200, answer
    assert answer.body["data"] == before.body["data"]
    assert gateway.process.wait(60) == 0, gateway.log.read_text()


def test_a_stream_started_before_the_signal_runs_to_its_end(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", headers={
        "Content-Type": "application/json"}, body=json.dumps({
            "model": "chat", "stream": True, "max_tokens": 128, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}]}))
    response = connection.getresponse()
    assert response.status == 200
    first = response.readline()
    while not first.startswith(b"data: "):
        first = response.readline()
    gateway.process.send_signal(signal.SIGTERM)
    assert request(gateway.port, "GET", "/health/ready").status == 503
    events = [first.decode()[6:].strip()] + [
        line.decode()[6:].strip() for line in response.read().splitlines()
        if line.startswith(b"data: ")]
    connection.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks[-3:]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()
    assert gateway.process.wait(60) == 0, gateway.log.read_text()


def test_a_second_signal_stops_at_once_without_waiting_for_requests_in_flight(gateway):
    held, outcome = gateway.held_search("europe climate change storm")
    gateway.process.send_signal(signal.SIGTERM)
    assert request(gateway.port, "GET", "/health/ready").status == 503
    gateway.process.send_signal(signal.SIGINT)
    gateway.process.wait(120)
    held.join(60)
    (answer,) = outcome
    assert isinstance(answer, OSError), answer  # its connection was closed unanswered
    log = gateway.log.read_text()
    assert "again: stopping now" in log
    # Not at the end of the drain and the graceful shutdown's timeout: the request was still
    # held at the relay when the process was gone.
    assert "timeout graceful shutdown exceeded" not in log and not gateway.relay.released.is_set()
