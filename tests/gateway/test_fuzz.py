"""Thousands of malformed bodies across every route: never a 5xx, always an OpenAI error
object naming the problem, and the gateway still answers valid requests after each hundred.

Nearly all bodies are refused by the gateway's own validation before Triton; a few are
valid for the gateway but refused by the model (a prompt longer than the context), so that
Triton's refusals are checked to arrive as 400s naming the field too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

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
    "n": [2, 0, "1", True, -3],
    "stream": ["yes", 1, [], {}],
    "stream_options": [{"include_usage": True}, "x", {"other": 1}],
    "logprobs": [True], "presence_penalty": [0.5], "frequency_penalty": [-1],
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
