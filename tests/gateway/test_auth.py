"""API keys on the gateway, in front of the session's real Triton: every route but the
probes refuses a missing or wrong key with OpenAI's 401, the clients OpenAI ships work
with a key, a rotated Secret takes effect without a restart, each key's limits refuse
that key alone, and no key ever reaches the metrics or the access log."""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.test_admission import gauge, settle
from tests.support.podrunner import write_config_map
from tests.support.tls import self_signed
from tests.support.triton import free_port
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import ClientLimits, GatewayConfig, gateway_config
from tritonop.gateway.server import GatewayThread, TLSFiles

pytestmark = pytest.mark.triton

KEYS = {name: f"sk-{name}-{secrets.token_hex(16)}"
        for name in ("alice", "bob", "rpm", "tpm", "share")}
ALICE, BOB = KEYS["alice"], KEYS["bob"]
# Named limits on both models; alice and bob have none. chat takes 2 requests in flight.
LIMITS = {"rpm": ClientLimits(requests_per_minute=2),
          "tpm": ClientLimits(tokens_per_minute=20),
          "share": ClientLimits(max_in_flight_share=0.5)}
CHAT = {"model": "chat", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}
SEARCH = {"model": "news", "text": "europe climate change storm", "num_results": 3}
ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/chat", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "chat", "prompt": "Hello", "max_tokens": 4}),
    ("POST", "/v1/embeddings", {"model": "news", "input": ["hello"]}),
    ("POST", "/v1/search", SEARCH),
    ("GET", "/nope", None),  # unknown routes answer as known ones: no route is revealed
    ("POST", "/v2/models/chat/generate", {"text_input": "hi"}),
    ("DELETE", "/v1/models", None),
]


def _one_changed(key: str) -> str:
    return key[:-1] + ("a" if key[-1] != "a" else "b")


BAD = {
    "missing": {},
    "empty bearer": {"Authorization": "Bearer"},
    "empty x-api-key": {"x-api-key": ""},
    "wrong": {"Authorization": f"Bearer sk-{secrets.token_hex(16)}"},
    # Beyond the 1 KiB a key may have, within the 32 KiB the request head may have (more
    # is a 431 before any key is looked at).
    "oversized": {"Authorization": "Bearer " + "k" * 20_000},
    "one char changed": {"Authorization": f"Bearer {_one_changed(ALICE)}"},
    "prefix": {"Authorization": f"Bearer {ALICE[:-1]}"},
    "key plus a char": {"x-api-key": ALICE + "x"},
    "basic scheme": {"Authorization": f"Basic {ALICE}"},
    "another header": {"api-key": ALICE},
}


def unlabelled(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not exported"
    return float(found.group(1))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed_config(stack, keys_dir: Path | None, **changes) -> GatewayConfig:
    """The stack's models, with the named limits and keys from ``keys_dir``."""
    config = gateway_config(list(stack.triton.resources.values()))
    models = {name: dataclasses.replace(entry, named_limits=LIMITS)
              for name, entry in config.models.items()}
    return dataclasses.replace(config, models=models,
                               api_keys=str(keys_dir) if keys_dir else None, **changes)


@contextmanager
def gateway(stack, config: GatewayConfig, **options) -> Iterator[GatewayThread]:
    """A second gateway in front of the stack's Triton."""
    address = TritonAddress(stack.triton.server.grpc_url, stack.triton.server.http_url)
    thread = GatewayThread(config, address, free_port(), **options).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def keyed(stack, tmp_path_factory) -> Iterator[GatewayThread]:
    keys_dir = tmp_path_factory.mktemp("api-keys")
    write_config_map(keys_dir, {name: key + "\n" for name, key in KEYS.items()})
    with gateway(stack, keyed_config(stack, keys_dir)) as thread:
        yield thread


def assert_refused(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert error["param"] is None


@pytest.mark.parametrize("bad", sorted(BAD))
def test_every_route_refuses_a_missing_or_wrong_key_alike(keyed, bad):
    with httpx.Client(base_url=keyed.url, timeout=30) as client:
        bodies = []
        for method, path, body in ROUTES:
            answer = client.request(method, path, json=body, headers=BAD[bad])
            assert answer.http_version == "HTTP/1.1"
            assert_refused(answer)
            bodies.append(answer.json())
        assert all(body == bodies[0] for body in bodies), "a route answered differently"


def test_with_the_key_the_same_routes_answer(keyed):
    with httpx.Client(base_url=keyed.url, timeout=300, headers=bearer(ALICE)) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/search", json=SEARCH).status_code == 200
        assert client.get("/nope").status_code == 404
    answer = httpx.post(f"{keyed.url}/v1/embeddings", headers={"x-api-key": BOB},
                        json={"model": "news", "input": ["hello"]}, timeout=300)
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1


def test_a_streaming_request_without_a_key_gets_the_401_and_no_stream(keyed):
    for headers in (BAD["missing"], BAD["one char changed"]):
        with httpx.stream("POST", f"{keyed.url}/v1/chat/completions", headers=headers,
                          json={**CHAT, "stream": True}, timeout=30) as answer:
            answer.read()
            assert answer.headers["content-type"] == "application/json"
            assert_refused(answer)
    with httpx.stream("POST", f"{keyed.url}/v1/chat/completions", headers=bearer(ALICE),
                      json={**CHAT, "stream": True}, timeout=300) as answer:
        assert answer.status_code == 200
        assert list(answer.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_the_openai_client_works_with_its_key_and_raises_without(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=ALICE, max_retries=0,
                           timeout=300)
    assert {model.id for model in client.models.list()} == {"news", "chat"}
    answer = client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content
    chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    stranger = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=_one_changed(ALICE),
                             max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.chat.completions.create(**CHAT)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_the_probes_stay_open_and_metrics_are_open_unless_protected(stack, keyed):
    assert httpx.get(f"{keyed.url}/health/live").status_code == 200
    assert httpx.get(f"{keyed.url}/health/ready", timeout=30).status_code == 200
    assert httpx.get(f"{keyed.url}/metrics").status_code == 200
    local = secrets.token_hex(16)
    with gateway(stack, keyed_config(stack, None, protect_metrics=True),
                 api_key=local) as protected:
        assert httpx.get(f"{protected.url}/health/live").status_code == 200
        assert httpx.get(f"{protected.url}/health/ready", timeout=30).status_code == 200
        assert_refused(httpx.get(f"{protected.url}/metrics"))
        answer = httpx.get(f"{protected.url}/metrics", headers=bearer(local))
        assert answer.status_code == 200
        assert unlabelled(answer.text, "tritonop_gateway_unauthorized_total") == 1


def test_a_rotated_key_takes_effect_without_a_restart(stack, tmp_path):
    keys_dir = tmp_path / "api-keys"
    old, new = f"sk-old-{secrets.token_hex(16)}", f"sk-new-{secrets.token_hex(16)}"
    write_config_map(keys_dir, {"alice": old, "bob": BOB})
    with gateway(stack, keyed_config(stack, keys_dir)) as thread:
        assert httpx.get(f"{thread.url}/v1/models", headers=bearer(old)).status_code == 200
        write_config_map(keys_dir, {"alice": new, "bob": BOB})  # the kubelet swaps ..data
        swapped = time.monotonic()
        while httpx.get(f"{thread.url}/v1/models", headers=bearer(new)).status_code != 200:
            assert time.monotonic() - swapped < 5, "the new key was not taken"
            time.sleep(0.1)
        assert_refused(httpx.get(f"{thread.url}/v1/models", headers=bearer(old)))
        assert httpx.get(f"{thread.url}/v1/models", headers=bearer(BOB)).status_code == 200
        write_config_map(keys_dir, {"bob": BOB})  # alice's entry removed from the Secret
        removed = time.monotonic()
        while httpx.get(f"{thread.url}/v1/models", headers=bearer(new)).status_code != 401:
            assert time.monotonic() - removed < 5, "the removed key still works"
            time.sleep(0.1)


def assert_limited(answer: httpx.Response, limit: str) -> int:
    assert answer.status_code == 429, answer.text
    error = answer.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and limit in error["message"]
    return int(answer.headers["retry-after"])


def test_requests_per_minute_refuse_that_key_alone(keyed):
    with httpx.Client(base_url=keyed.url, timeout=300) as client:
        for _ in range(2):
            assert client.post("/v1/search", json=SEARCH, headers=bearer(KEYS["rpm"])
                               ).status_code == 200
        answer = client.post("/v1/search", json=SEARCH, headers=bearer(KEYS["rpm"]))
        assert 50 <= assert_limited(answer, "requestsPerMinute") <= 61
        assert client.post("/v1/search", json=SEARCH, headers=bearer(ALICE)).status_code == 200


def test_tokens_per_minute_refuse_that_key_once_its_answers_used_them(keyed):
    with httpx.Client(base_url=keyed.url, timeout=300) as client:
        first = client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEYS["tpm"]))
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 20
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEYS["tpm"]))
        assert 50 <= assert_limited(answer, "tokensPerMinute") <= 61
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers=bearer(ALICE)).status_code == 200


def test_a_key_at_its_share_of_places_is_refused_while_others_get_the_rest(keyed):
    long = {**CHAT, "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "Tell a long story about a dragon."}]}
    with httpx.Client(base_url=keyed.url, timeout=300) as client:
        # share 0.5 of chat's 2 places: the stream holds the key's one place.
        with client.stream("POST", "/v1/chat/completions", json=long,
                           headers=bearer(KEYS["share"])) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            answer = client.post("/v1/chat/completions", json=CHAT,
                                 headers=bearer(KEYS["share"]))
            assert assert_limited(answer, "maxInFlightShare") == 1
            assert client.post("/v1/chat/completions", json=CHAT,
                               headers=bearer(BOB)).status_code == 200
        # The stream closed: its place is the key's again once the gateway has seen it go.
        settle(lambda: gauge(client.get("/metrics").text, "tritonop_gateway_requests_in_flight",
                             model="chat") == 0)
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers=bearer(KEYS["share"])).status_code == 200


def test_metrics_and_the_access_log_name_the_client_never_the_key(keyed, caplog):
    with caplog.at_level(logging.INFO, logger="tritonop.gateway.access"):
        assert httpx.post(f"{keyed.url}/v1/search", json=SEARCH, headers=bearer(ALICE),
                          timeout=300).status_code == 200
        assert_refused(httpx.post(f"{keyed.url}/v1/search?api_key={ALICE}x", json=SEARCH,
                                  headers={"x-api-key": _one_changed(ALICE)}))
    lines = [r.getMessage() for r in caplog.records if r.name == "tritonop.gateway.access"]
    assert any(line.startswith("POST /v1/search 200 ") and line.endswith("client=alice")
               for line in lines), lines
    assert any(line.startswith("POST /v1/search 401 ") and line.endswith("client=-")
               for line in lines), lines
    text = httpx.get(f"{keyed.url}/metrics").text
    assert gauge(text, "tritonop_gateway_requests_total", route="/v1/search", model="news",
                 status="200", key="alice") >= 1
    assert unlabelled(text, "tritonop_gateway_unauthorized_total") >= 1
    for key in [*KEYS.values(), _one_changed(ALICE)]:
        assert key not in text
        assert key not in caplog.text
        assert key[3:] not in caplog.text  # nor the key's body without its prefix


def test_without_keys_the_client_label_is_a_dash(stack):
    httpx.post(f"{stack.base_url}/search", json=SEARCH, timeout=300)
    text = httpx.get(f"{stack.gateway.url}/metrics").text
    assert gauge(text, "tritonop_gateway_requests_total", route="/v1/search", model="news",
                 status="200", key="-") >= 1


def test_https_with_a_certificate_the_client_trusts_and_its_renewal(stack, tmp_path):
    tls_dir = tmp_path / "tls"  # as the kubelet mounts a kubernetes.io/tls Secret
    first = self_signed("127.0.0.1")
    write_config_map(tls_dir, first)
    with gateway(stack, keyed_config(stack, None), api_key=ALICE,
                 tls=TLSFiles(tls_dir / "tls.crt", tls_dir / "tls.key")) as thread:
        assert thread.url.startswith("https://")
        trusting = httpx.Client(verify=trusting_only(first), timeout=300)
        client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key=ALICE, max_retries=0,
                               http_client=trusting)
        assert client.chat.completions.create(**CHAT).choices[0].message.content
        assert_refused(trusting.get(f"{thread.url}/v1/models"))
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{thread.url}/health/live", timeout=5)  # the system's CAs only
        # Renewed in the Secret: new connections get the new certificate, no restart.
        second = self_signed("127.0.0.1")
        write_config_map(tls_dir, second)
        renewed = time.monotonic()
        while True:
            try:
                with httpx.Client(verify=trusting_only(second), timeout=5) as fresh:
                    assert fresh.get(f"{thread.url}/health/live").status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() - renewed < 5, "the renewed certificate was not used"
                time.sleep(0.1)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            with httpx.Client(verify=trusting_only(first), timeout=5) as stale:
                stale.get(f"{thread.url}/health/live")


def trusting_only(pem: dict[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pem["tls.crt"])


