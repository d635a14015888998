"""``n`` choices through the gateway, on SmolLM2 behind a real tritonserver.

Each choice is a Triton request of its own, seeded seed + index: n=3 with seed s must equal
three separate requests with seeds s, s + 1 and s + 2, streamed or not, and its usage must
count the prompt once and every choice's completion.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from openai import OpenAI

pytestmark = pytest.mark.triton

ASK = [{"role": "user", "content": "Write one sentence about a cat."}]
SAMPLING = {"max_tokens": 24, "temperature": 1.0, "top_p": 0.95}


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


def test_three_choices_equal_three_requests_with_the_next_seeds(client):
    answer = client.chat.completions.create(model="chat", messages=ASK, n=3, seed=40,
                                            **SAMPLING)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(model="chat", messages=ASK, seed=40 + i,
                                            **SAMPLING) for i in range(3)]
    assert [c.message.content for c in answer.choices] == [
        a.choices[0].message.content for a in alone]
    assert [c.finish_reason for c in answer.choices] == [a.choices[0].finish_reason
                                                         for a in alone]
    assert len({c.message.content for c in answer.choices}) > 1  # sampled apart
    assert answer.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert answer.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_streamed_choices_join_into_the_same_answers(client):
    whole = client.chat.completions.create(model="chat", messages=ASK, n=3, seed=7,
                                           **SAMPLING)
    chunks = list(client.chat.completions.create(
        model="chat", messages=ASK, n=3, seed=7, stream=True,
        stream_options={"include_usage": True}, **SAMPLING))
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions_take_n_too(client):
    answer = client.completions.create(model="chat", prompt="The cat", n=2, seed=3,
                                       **SAMPLING)
    alone = client.completions.create(model="chat", prompt="The cat", seed=4, **SAMPLING)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[1].text == alone.choices[0].text


def test_each_choice_follows_the_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
              "required": ["name"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="chat", messages=ASK, n=2, seed=1, max_tokens=60, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat",
                                                                "schema": schema}})
    for choice in answer.choices:  # a name of at most 12 characters fits in 60 tokens
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("n", [5, 0, 2.5, "3"])
def test_n_beyond_the_limit_is_a_400_naming_n(stack, client, n):
    reply = requests.post(f"{stack.base_url}/chat/completions", timeout=60, json={
        "model": "chat", "messages": ASK, "max_tokens": 4, "n": n})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "n"
    if n == 5:
        assert "[1, 4]" in error["message"]  # the spec's default maxChoices
    after = client.chat.completions.create(model="chat", messages=ASK, max_tokens=4,
                                           temperature=0)
    assert after.choices[0].finish_reason == "length"
