"""Admission: a burst beyond a model's bound is refused at once with 429 and Retry-After,
every accepted request completes as it would alone, and a client that leaves frees its
place and its engine slot. Plus 503 while Triton is not there."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.gateway.conftest import CHAT_BOUND
from tests.support.triton import free_port
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import Admission, GatewayConfig, ModelEntry
from tritonop.gateway.server import GatewayThread

pytestmark = pytest.mark.triton

BODY = {"model": "chat", "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}]}


def gauge(text: str, name: str, **labels: str) -> float:
    """The sum of a metric over the series that carry ``labels``."""
    values = [float(value) for series, value in re.findall(rf"^{name}{{(.*)}} (\S+)$", text, re.M)
              if all(f'{k}="{v}"' in series for k, v in labels.items())]
    assert values, f"{name} {labels} not exported"
    return sum(values)


def settle(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "did not settle"
        time.sleep(0.1)


def test_burst_beyond_the_bound_gets_429_at_once_and_the_rest_complete(stack):
    alone = httpx.post(f"{stack.base_url}/chat/completions", json=BODY, timeout=300).json()
    bound = CHAT_BOUND["maxInFlight"] + CHAT_BOUND["maxWaiting"]

    async def burst() -> list[tuple[int, float, dict, dict]]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client:
            async def one() -> tuple[int, float, dict, dict]:
                answer = await client.post("/chat/completions", json=BODY)
                return (answer.status_code, time.monotonic(), dict(answer.headers),
                        answer.json())
            return await asyncio.gather(*(one() for _ in range(bound + 6)))

    answers = asyncio.run(burst())
    accepted = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 429]
    assert len(accepted) == bound and len(refused) == 6
    # Refusals come back while the accepted requests are still generating.
    assert max(a[1] for a in refused) < min(a[1] for a in accepted)
    for _, _, headers, body in refused:
        assert headers["retry-after"] == "1"
        assert body["error"]["type"] == "rate_limit_error"
    for *_, body in accepted:
        assert body["choices"][0]["message"]["content"] == alone["choices"][0]["message"][
            "content"]
    metrics = httpx.get(f"{stack.gateway.url}/metrics").text
    assert gauge(metrics, "tritonop_gateway_requests_in_flight", model="chat") == 0
    assert gauge(metrics, "tritonop_gateway_requests_waiting", model="chat") == 0
    assert gauge(metrics, "tritonop_gateway_requests_total", route="/v1/chat/completions",
                 model="chat", status="429") >= 6


def _generated_tokens(stack) -> float:
    url = f"http://localhost:{stack.triton.server.ports.metrics}/metrics"
    return gauge(httpx.get(url).text, "tritonop_llm_generated_tokens_total", model="chat")


def _settled_after_leaving(stack) -> float:
    """Tokens the engine generated until the request's slot and place were free again."""
    triton_metrics = f"http://localhost:{stack.triton.server.ports.metrics}/metrics"
    settle(lambda: gauge(httpx.get(triton_metrics).text, "tritonop_llm_running_sequences",
                         model="chat") == 0)
    settle(lambda: gauge(httpx.get(f"{stack.gateway.url}/metrics").text,
                         "tritonop_gateway_requests_in_flight", model="chat") == 0)
    return _generated_tokens(stack)


LONG = {**BODY, "max_tokens": 200,
        "messages": [{"role": "user", "content": "Tell a long story about a dragon."}]}


@pytest.fixture(scope="module")
def long_alone(stack) -> int:
    """Tokens the long request generates when nobody leaves."""
    answer = httpx.post(f"{stack.base_url}/chat/completions", json=LONG, timeout=300).json()
    assert answer["usage"]["completion_tokens"] >= 60, answer
    return answer["usage"]["completion_tokens"]


def test_a_client_that_leaves_mid_stream_cancels_its_triton_request(stack, long_alone):
    before = _generated_tokens(stack)
    with httpx.stream("POST", f"{stack.base_url}/chat/completions",
                      json={**LONG, "stream": True}, timeout=300) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # Closed after the first event: the gateway cancels its Triton stream and the engine
    # ends the sequence long before it would have finished.
    assert _settled_after_leaving(stack) - before < long_alone / 2


def test_a_client_that_leaves_before_the_answer_cancels_its_triton_request(stack, long_alone):
    before = _generated_tokens(stack)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/chat/completions", json=LONG,
                   timeout=httpx.Timeout(60, read=0.5))
    assert _settled_after_leaving(stack) - before < long_alone / 2


def test_503_while_triton_is_not_there():
    config = GatewayConfig({"chat": ModelEntry("chat", "chat", Admission(1, 0),
                                               max_tokens_limit=64)})
    nowhere = TritonAddress(f"localhost:{free_port()}", f"localhost:{free_port()}")
    gateway = GatewayThread(config, nowhere, free_port()).start()
    try:
        answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=BODY, timeout=30)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "not ready" in answer.json()["error"]["message"]
        assert httpx.get(f"{gateway.url}/health/ready").status_code == 503
        assert httpx.get(f"{gateway.url}/health/live").status_code == 200
    finally:
        gateway.stop()
