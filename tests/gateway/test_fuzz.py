"""Thousands of malformed bodies across every route: never a 5xx, always an OpenAI error
object naming the problem, and the gateway still answers valid requests after each hundred.
Then thousands of requests to every route, known or not, with any method, whose headers are
mutated too (content types, lying lengths, huge and malformed headers, API keys right and
wrong, with and without keys configured): never a 5xx, every error an OpenAI error object,
and nothing of the inside (a traceback, an exception's class, Triton's address) in any
answer.

Nearly all bodies are refused by the gateway's own validation before Triton; a few are
valid for the gateway but refused by the model (a prompt longer than the context), so that
Triton's refusals are checked to arrive as 400s naming the field too.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import httptools
import httpx
import pytest

from tests.support.triton import free_port, read_to_close
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import gateway_config
from tritonop.gateway.connections import MAX_HEADER_BYTES
from tritonop.gateway.server import GatewayThread

pytestmark = pytest.mark.triton

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1,
        "temperature": 0}
COMPLETION = {"model": "chat", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
EMBEDDING = {"model": "news", "input": ["hello", "world"]}
SEARCH = {"model": "news", "text": "europe climate change storm", "num_results": 3}

GENERATION_BAD = {
    "max_tokens": [0, -1, 1.5, "10", True, 10**6, 257, [], {}],
    "temperature": [-0.1, 2.5, "hot", True, [], {"a": 1}],
    "top_p": [0, 1.5, -1, "x", False],
    "top_k": [-1, 0.5, "x", 10**7, True],
    "repetition_penalty": [0, -1, "x", 1000],
    "repeat_last_n": [-1, 1.5, "x", 10**9],
    "seed": [-1, 2**64, 1.5, "x", True],
    "stop": ["", [""], 5, [1], ["a"] * 17, {}, [None]],
    "n": [17, 0, "1", True, -3],
    "stream": ["yes", 1, [], {}],
    "stream_options": [{"include_usage": True}, "x", {"other": 1}],
    "logprobs": ["yes", 21], "top_logprobs": [21],
    "presence_penalty": [0.5], "frequency_penalty": [-1],
    "echo": [True], "best_of": [3], "tools": [[{"type": "function"}]],
    "unknown_field": [1, "x", {}],
}
FIELDS = {
    "/v1/chat/completions": (CHAT, {
        **GENERATION_BAD,
        "model": [None, 1, "", "nope", ["chat"], "news", {}],
        "messages": [None, [], "hi", [1], [{"role": "bot", "content": "x"}],
                     [{"role": "user"}], [{"role": "user", "content": 5}],
                     [{"content": "x"}], [{"role": "user", "content": [{"type": "image"}]}],
                     [{"role": "user", "content": "x", "extra": 1}], {"role": "user"}],
        "max_completion_tokens": [0, "5", 10**6, 2.5],
    }),
    "/v1/completions": (COMPLETION, {
        **GENERATION_BAD,
        "model": [None, 7, "nope", "news"],
        "prompt": [None, "", "   ", 5, [1, 2, 3], ["a", "b"], {}, [[1]]],
        "suffix": ["x"],
    }),
    "/v1/embeddings": (EMBEDDING, {
        "model": [None, 1, "nope", "chat", []],
        "input": [None, [], 5, [1, 2], [[1]], [None], ["ok", 3], {"a": 1}, ["x"] * 2049, True],
        "encoding_format": ["int8", 5, [], ""],
        "dimensions": [100, "x"], "unknown_field": [1],
    }),
    "/v1/search": (SEARCH, {
        "model": [None, 1, "nope", "chat"],
        "text": [None, "", "  ", 5, ["a"], {}],
        "num_results": [0, 101, -1, "5", 1.5, True, []],
        "top_k": [3, 0], "query": [5, ""], "unknown_field": [{}],
    }),
}
RAW = [b"", b"not json", b"{", b'{"model": "chat",', b"[1, 2]", b'"text"', b"null", b"3",
       b'{"model": NaN}', b'{"model": Infinity}', b'{"model": "\xff\xfe"}', b"\xc3\x28",
       b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 5000 + b"1" + b"}" * 5000]
SURROGATE = b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}'


@dataclass
class Case:
    route: str
    body: bytes
    fields: set[str]  # the answer must name one of these ("body" for unparseable ones)


def cases(rng: random.Random) -> Iterator[Case]:
    """Bodies that are each wrong in one to three named ways; deterministic per seed."""
    for raw in RAW:
        for route in FIELDS:
            yield Case(route, raw, {"body"})
    yield Case("/v1/chat/completions", SURROGATE, {"messages[0].content"})
    yield Case("/v1/embeddings", b" " * (9 * 1024 * 1024), {"body"})  # above the body limit
    for route, (valid, bad) in FIELDS.items():
        for field, values in bad.items():  # every bad value once, alone
            for value in values:
                yield _mutated(route, valid, {field: value})
    while True:  # then random combinations
        route = rng.choice(list(FIELDS))
        valid, bad = FIELDS[route]
        chosen = rng.sample(sorted(bad), rng.randint(1, 3))
        yield _mutated(route, valid, {f: rng.choice(bad[f]) for f in chosen})


def _mutated(route: str, valid: dict, changes: dict) -> Case:
    body = dict(valid)
    for field, value in changes.items():
        if value is None and field in body:
            del body[field]  # "missing"
        else:
            body[field] = value
    names = set(changes)
    if {"top_k", "query"} & names and route == "/v1/search":
        names |= {"text", "num_results"}  # an alias given twice names the pair
    if "stream_options" in names:
        names.add("stream")
    return Case(route, json.dumps(body).encode(), names)


def check_error(answer: httpx.Response, case: Case) -> None:
    assert answer.status_code < 500, (case, answer.text)
    assert not leaks(answer.text), (case, answer.text)
    assert 400 <= answer.status_code < 500, (case, answer.text)
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"]
    named = {error["param"], error["message"].split(":")[0]}
    assert any(n and n.split("[")[0].split(".")[0] in {f.split("[")[0] for f in case.fields}
               for n in named), (case, error)


def test_malformed_bodies_get_named_400s_and_the_server_keeps_serving(stack):
    rng = random.Random(12)
    source = cases(rng)
    sent = 0
    with httpx.Client(base_url=stack.gateway.url, timeout=120) as client:
        while sent < 2100:
            case = next(source)
            answer = client.post(case.route, content=case.body,
                                 headers={"Content-Type": "application/json"})
            check_error(answer, case)
            sent += 1
            if sent % 100 == 0:
                route, body = [("/v1/search", SEARCH), ("/v1/chat/completions", CHAT),
                               ("/v1/embeddings", EMBEDDING)][(sent // 100) % 3]
                good = client.post(route, json=body)
                assert good.status_code == 200, good.text
                assert good.json()["object"] in ("list", "chat.completion")


def test_prompt_longer_than_the_context_is_a_400_from_the_model(stack):
    long = "storm " * 3000  # far beyond the 512-token context of the test service
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        for route, body, field in [
            ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long}]},
             "messages"),
            ("/completions", {**COMPLETION, "prompt": long}, "prompt"),
            ("/chat/completions", {**CHAT, "stream": True,
                                   "messages": [{"role": "user", "content": long}]},
             "messages")]:
            answer = client.post(route, json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == field and "tokens" in error["message"]


def test_wrong_routes_and_methods_are_error_objects(stack):
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as client:
        for method, path, status in [("GET", "/v1/chat/completions", 405),
                                     ("POST", "/v1/models", 405),
                                     ("GET", "/v2/nothing", 404),
                                     ("GET", "/v1/models/nope", 404)]:
            answer = client.request(method, path)
            assert answer.status_code == status
            assert answer.json()["error"]["message"]


# Mutated requests over every route ----------------------------------------------------

KEY = "sk-fuzz-0123456789abcdef"
POST_ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION,
               "/v1/embeddings": EMBEDDING, "/v1/search": SEARCH}
GET_ROUTES = ["/v1/models", "/v1/models/chat", "/v1/models/news", "/health/live",
              "/health/ready", "/metrics"]
OPEN_ROUTES = {"/health/live", "/health/ready", "/metrics"}  # no key needed
UNKNOWN_ROUTES = ["/", "/v1", "/v1/nothing", "/v2/models/news/infer",
                  "/v2/repository/models/news/unload", "/v1/models/nope", "/v1/models/%00",
                  "/v1/models/" + "a" * 3000, "/v1/chat/completions/",
                  "/v1/search/../models", "/V1/MODELS", "/v1/search?debug=1", "/%ff%fe"]
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON"]
OTHER_TYPES = ["text/plain", "application/x-www-form-urlencoded", "application/jsonx",
               "multipart/form-data; boundary=zz", "", "application/*", "a" * 2000,
               "text/html; charset=utf-8"]
# (headers, whether they carry the valid key)
AUTH = [
    ({"Authorization": f"Bearer {KEY}"}, True),
    ({"authorization": f"bearer {KEY}"}, True),
    ({"x-api-key": KEY}, True),
    ({"Authorization": f"Bearer   {KEY}"}, True),
    ({"Authorization": "Basic Zm9vOmJhcg==", "x-api-key": KEY}, True),
    ({}, False),
    ({"Authorization": "Bearer"}, False),
    ({"Authorization": KEY}, False),
    ({"Authorization": f"Bearer {KEY[:-1]}"}, False),
    ({"Authorization": f"Bearer {KEY}x"}, False),
    ({"Authorization": f"Bearer {KEY.upper()}"}, False),
    ({"Authorization": "Basic Zm9vOmJhcg=="}, False),
    ({"Authorization": "Bearer " + "k" * 5000}, False),
    ({"x-api-key": ""}, False),
    ({"x-api-key": "k" * 5000}, False),
    ({"Authorization": "Bearer wrong", "x-api-key": KEY}, False),
    ({"Authorization": b"Bearer \xe9\xe8"}, False),
]
# Never in any answer; and in an error, nothing that names code or a connection either.
INTERNALS = re.compile(r"Traceback|File \"|127\.0\.0\.1:|localhost:")
IN_ERRORS = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b|ipv4:|grpc|/site-packages/|"
                       r"\.py\b")


def leaks(text: str, ports: tuple[int, ...] = (), error: bool = True) -> list[str]:
    """What in an answer tells a client about the inside (a search answer holds corpus
    texts, which may name anything but a traceback or an address)."""
    found = INTERNALS.findall(text) + (IN_ERRORS.findall(text) if error else [])
    return found + [f":{port}" for port in ports if f":{port}" in text]


@dataclass
class Mutated:
    method: str
    path: str
    headers: dict[str, str | bytes] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None  # sent as it is on a connection of its own
    expect: int | None = None  # the status when it is certain


def mutated_requests(rng: random.Random, keyed: bool) -> Iterator[Mutated]:
    """Requests to every route with mutated bodies and headers; deterministic per seed."""
    bodies = cases(rng)
    while True:
        roll = rng.random()
        auth, authorized = rng.choice(AUTH) if keyed and rng.random() < 0.3 else (
            {"Authorization": f"Bearer {KEY}"}, True)
        if roll < 0.5:  # a POST route, a malformed body or a valid one, any content type
            route = rng.choice(list(POST_ROUTES))
            body = (json.dumps(POST_ROUTES[route]).encode() if rng.random() < 0.15
                    else next(bodies).body)
            json_type = rng.random() < 0.8
            ctype = rng.choice(JSON_TYPES if json_type else OTHER_TYPES)
            request = Mutated("POST", route, {**auth, "Content-Type": ctype}, body)
            if keyed and not authorized:
                request.expect = 401
            elif not json_type:
                request.expect = 415
            yield request
        elif roll < 0.7:  # a GET route
            path = rng.choice(GET_ROUTES)
            request = Mutated("GET", path, dict(auth))
            if keyed and not authorized and path not in OPEN_ROUTES:
                request.expect = 401
            elif path != "/health/ready":
                request.expect = 200
            yield request
        elif roll < 0.8:  # an unknown route, or a known one with the wrong method
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
            path = rng.choice(UNKNOWN_ROUTES + GET_ROUTES + list(POST_ROUTES))
            request = Mutated(method, path, {**auth, "Content-Type": rng.choice(JSON_TYPES)},
                              b"{}" if method in ("POST", "PUT", "PATCH") else b"")
            if keyed and not authorized and path not in OPEN_ROUTES:
                request.expect = 401
            yield request
        elif roll < 0.86:  # headers too large for the bound, or just under it
            route = rng.choice(list(POST_ROUTES) + GET_ROUTES)
            method = "POST" if route in POST_ROUTES else "GET"
            huge = rng.random() < 0.6
            size = MAX_HEADER_BYTES + rng.randint(1, 3 * MAX_HEADER_BYTES) if huge else \
                rng.randint(1000, MAX_HEADER_BYTES // 2)
            headers: dict[str, str | bytes] = {**auth, "Content-Type": "application/json"}
            if rng.random() < 0.5:
                headers["X-Padding"] = "p" * size
            else:
                headers.update({f"X-Pad-{i}": "p" * 60 for i in range(size // 70)})
            body = json.dumps(POST_ROUTES[route]).encode() if method == "POST" else b""
            yield Mutated(method, route, headers, body, expect=431 if huge else None)
        else:  # on a raw connection: lying lengths, malformed headers, smuggling
            yield _raw_request(rng, auth)


# Header values an HTTP client library refuses to send (trailing or only white space).
RAW_AUTH = [{"Authorization": "Bearer "}, {"Authorization": f"Bearer {KEY}  "},
            {"x-api-key": " "}, {"Authorization": "\t"}]


def _raw_request(rng: random.Random, auth: dict[str, str | bytes]) -> Mutated:
    if rng.random() < 0.2:
        auth = rng.choice(RAW_AUTH)
    route = rng.choice(list(POST_ROUTES))
    body = json.dumps(POST_ROUTES[route]).encode()
    auth_lines = b"".join(b"%s: %s\r\n" % (k.encode(), v if isinstance(v, bytes)
                                            else v.encode()) for k, v in auth.items())
    head = b"POST %s HTTP/1.1\r\nHost: gateway\r\n%sContent-Type: application/json\r\n" % (
        route.encode(), auth_lines)
    length = len(body)
    variants = [
        head + b"Content-Length: %d\r\n\r\n%s" % (length - rng.randint(1, length), body),
        head + b"Content-Length: %d\r\n\r\n%s" % (length + rng.randint(1, 10**6), body),
        head + b"Content-Length: -1\r\n\r\n" + body,
        head + b"Content-Length: abc\r\n\r\n" + body,
        head + b"Content-Length: 99999999999999999999\r\n\r\n" + body,
        head + b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n%s" % (length, body),
        head + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body,
        head + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n" + body,
        head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (length, body),
        head + b"X-Bad: a\x00b\r\nContent-Length: %d\r\n\r\n%s" % (length, body),
        head + b"NoColonHere\r\nContent-Length: %d\r\n\r\n%s" % (length, body),
        b"POST %s HTTP/1.0\r\n%s\r\n%s" % (route.encode(), auth_lines, body),
        b"GET /v1/models HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.randrange(256)
                                                             for _ in range(200)),
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))),
    ]
    return Mutated("RAW", route, raw=rng.choice(variants))


class _Replies:
    """Every HTTP response in a byte stream, as (status, headers, body)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.replies: list[tuple[int, dict[str, str], bytes]] = []
        self.headers: dict[str, str] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.replies.append((self.parser.get_status_code(), self.headers, self.body))
        self.headers, self.body = {}, b""


def raw_exchange(url: str, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` on a new connection, then end sending: the replies until it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the gateway closed first: what it answered is still readable
            pass
        received = read_to_close(sock)
    replies = _Replies()
    try:
        replies.parser.feed_data(received)
    except httptools.HttpParserError:
        pytest.fail(f"not HTTP from the gateway: {received[:300]!r}")
    return replies.replies


def check_reply(request: Mutated, status: int, headers: dict[str, str], body: bytes,
                ports: tuple[int, ...]) -> None:
    text = body.decode("utf-8", "replace")
    where = (request.method, request.path[:80], status, text[:300])
    assert status < 500, where
    assert not leaks(text, ports, error=status >= 400), where
    if request.expect is not None:
        assert status == request.expect, where
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), where
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str) and error["type"], where


@pytest.fixture(scope="module", params=[False, True], ids=["open", "with-keys"])
def fuzz_gateway(request, stack) -> Iterator[tuple[GatewayThread, bool]]:
    """A gateway in front of the stack's Triton, with one API key or none; a short header
    timeout, so that a request that never completes its head is answered within seconds."""
    keyed = request.param
    address = TritonAddress(stack.grpc, stack.triton.server.http_url)
    thread = GatewayThread(gateway_config(list(stack.triton.resources.values())), address,
                           free_port(), api_key=KEY if keyed else None,
                           header_timeout=2).start()
    try:
        yield thread, keyed
    finally:
        thread.stop()


def test_mutated_requests_on_every_route_are_never_5xx_and_leak_nothing(fuzz_gateway, stack):
    thread, keyed = fuzz_gateway
    ports = tuple(getattr(stack.triton.server.ports, name)
                  for name in ("http", "grpc", "metrics"))
    rng = random.Random(19 + keyed)
    source = mutated_requests(rng, keyed)
    seen: set[tuple[str, str]] = set()
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=thread.url, timeout=60) as client:
        for _ in range(2600):
            request = next(source)
            seen.add((request.method, request.path))
            if request.raw is not None:
                replies = raw_exchange(thread.url, request.raw)
            else:
                answer = client.request(request.method, request.path, headers=request.headers,
                                        content=request.body or None)
                replies = [(answer.status_code, dict(answer.headers), answer.content)]
            for status, headers, body in replies:
                statuses[status] = statuses.get(status, 0) + 1
                check_reply(request, status, headers, body, ports)
    # Every route was reached, and the answers were not all one kind of refusal.
    assert {("POST", r) for r in POST_ROUTES} | {("GET", r) for r in GET_ROUTES} <= seen
    assert {200, 400, 404, 405, 415, 431} <= set(statuses), statuses
    assert (401 in statuses) == keyed, statuses
