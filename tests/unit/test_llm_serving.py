"""The adapter's loop (``serving.Server``) on the real engine: clients that go away,
sends that fail, requests that cannot be read, unloading with requests in flight.

Handles stand in for Triton's response senders and record what each client got; the
engine, the model and the text are real, and greedy texts are checked against
``transformers``' ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.test_llm_engine import POLICY, reference
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel
from tritonop_backend.llm.serving import INTERNAL, INVALID, UNAVAILABLE, Outputs, Refusal, Server

PROMPTS = ["What is the capital of France?", "Name three colors.",
           "Write one sentence about the sea.", "Count from 1 to 10."]
TOKENS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Client:
    """Records every response; can be told to fail its n-th send or to go away."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.responses: list[tuple[Outputs | None, bool, Refusal | None]] = []
        self.fail_on = fail_on
        self.cancelled = False

    def send(self, outputs: Outputs | None, final: bool, error: Refusal | None = None) -> None:
        if self.fail_on is not None and len(self.responses) + 1 == self.fail_on:
            self.fail_on = None
            raise RuntimeError("the client went away")
        assert not self.finals, "nothing after the final response"
        self.responses.append((outputs, final, error))

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def finals(self) -> int:
        return sum(final for _, final, _ in self.responses)

    @property
    def text(self) -> str:
        return "".join(o["text_output"][0, 0].decode() for o, _, _ in self.responses if o)

    @property
    def finish_reason(self) -> str:
        outputs = self.responses[-1][0]
        assert outputs is not None, self.responses[-1]
        return str(outputs["finish_reason"][0, 0].decode())

    @property
    def error(self) -> Refusal | None:
        return self.responses[-1][2] if self.responses else None


def body(prompt: str, **values: Any) -> dict[str, Any]:
    return {"text_input": prompt, "max_tokens": TOKENS, "temperature": 0.0, "stream": True,
            **values}


@pytest.fixture
def server(smol: LoadedModel) -> Iterator[Server]:
    engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=3, max_waiting=4)
    served = Server(engine)
    yield served
    served.shutdown(timeout=5)


def serve_until_done(server: Server, clients: list[Client], limit: int = 300) -> None:
    for _ in range(limit):
        if not server.engine.has_work():
            break
        server.run_once()
    assert not server.engine.has_work()
    assert all(client.finals == 1 for client in clients), [c.responses for c in clients]


def expected_text(smol: LoadedModel, server: Server, prompt: str) -> str:
    tokens = reference(smol, server.engine, prompt, TOKENS)
    return str(smol.tokenizer.decode(tokens, skip_special_tokens=True))


def test_a_failing_send_cancels_only_its_request(smol: LoadedModel, server: Server) -> None:
    clients = [Client(), Client(fail_on=2), Client()]
    for client, prompt in zip(clients, PROMPTS, strict=False):
        server.accept(lambda prompt=prompt: body(prompt), client)
    serve_until_done(server, [clients[0], clients[2]])
    for index in (0, 2):
        assert clients[index].text == expected_text(smol, server, PROMPTS[index])
        assert clients[index].finish_reason in ("stop", "length")
    assert len(clients[1].responses) == 1 and clients[1].finals == 0  # gone after one delta
    assert server.open_requests == 0 and not server.deliveries.open


def test_a_failing_final_send_leaves_the_others_deliveries(
    smol: LoadedModel, server: Server
) -> None:
    """Same prompt and length: all three finish in the same step, the first send fails."""
    clients = [Client(fail_on=1), Client(), Client()]
    for client in clients:
        server.accept(lambda: body(PROMPTS[0], stream=False), client)
    serve_until_done(server, clients[1:])
    for client in clients[1:]:
        assert client.text == expected_text(smol, server, PROMPTS[0])
    assert clients[0].responses == [] and server.open_requests == 0


def test_a_client_that_goes_away_is_cancelled(smol: LoadedModel, server: Server) -> None:
    clients = [Client(), Client()]
    server.accept(lambda: body(PROMPTS[3], max_tokens=200), clients[0])
    server.accept(lambda: body(PROMPTS[1]), clients[1])
    for _ in range(3):
        server.run_once()
    clients[0].cancelled = True
    server._cancel_disconnected()
    serve_until_done(server, clients)
    assert clients[0].finish_reason == "cancelled"
    assert clients[1].text == expected_text(smol, server, PROMPTS[1])


def test_requests_that_cannot_be_read_or_queued_fail_alone(
    smol: LoadedModel, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable() -> dict[str, Any]:
        raise MemoryError("cannot map the input tensor")

    encode = server.engine.encode_prompt

    def encode_or_fail(prompt: str) -> list[int]:
        if prompt == "boom":
            raise KeyError("tokenizer state")
        return encode(prompt)

    monkeypatch.setattr(server.engine, "encode_prompt", encode_or_fail)
    clients = [Client() for _ in range(5)]
    batch = [lambda: body(PROMPTS[0]), unreadable, lambda: body("boom"),
             lambda: body(PROMPTS[1], top_p=3.0), lambda: body(PROMPTS[1])]
    for read, client in zip(batch, clients, strict=True):
        server.accept(read, client)
    assert clients[1].error == Refusal(
        INTERNAL, "the request could not be queued: MemoryError: cannot map the input tensor")
    assert clients[2].error is not None and clients[2].error.kind == INTERNAL
    assert "KeyError" in clients[2].error.message
    assert clients[3].error == Refusal(INVALID, "top_p: must lie in (0, 1], got 3.0")
    serve_until_done(server, clients)
    assert clients[0].text == expected_text(smol, server, PROMPTS[0])
    assert clients[4].text == expected_text(smol, server, PROMPTS[1])
    assert server.open_requests == 0


def test_shutdown_gives_every_request_in_flight_its_final_response(server: Server) -> None:
    """Three decoding, two queued: each is cancelled and told so, then the loop stops."""
    clients = [Client() for _ in range(5)]
    for index, client in enumerate(clients):
        server.accept(lambda index=index: body(PROMPTS[index % 4], max_tokens=200), client)
    server.start()
    deadline = time.monotonic() + 60
    while not clients[0].responses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.running == 3 and server.engine.waiting == 2
    server.shutdown(timeout=30)
    for client in clients:
        assert client.finals == 1 and client.finish_reason == "cancelled"
    assert server.open_requests == 0 and not server.engine.has_work()
    assert not server.ready and not server._running()
    late = Client()
    server.accept(lambda: body(PROMPTS[0]), late)
    assert late.error == Refusal(UNAVAILABLE,
                                 "the service cannot take requests: the model is being unloaded")


def test_a_failed_engine_is_not_ready_and_refuses_work(server: Server) -> None:
    server.engine.failure = "the device failed (RuntimeError: CUDA error: an illegal access)"
    assert not server.ready
    client = Client()
    server.accept(lambda: body(PROMPTS[0]), client)
    assert client.error is not None and client.error.kind == UNAVAILABLE
    assert "CUDA error" in client.error.message
