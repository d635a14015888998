"""Structured outputs through the gateway and Triton's own endpoint, on SmolLM2.

The official ``openai`` client's ``parse`` sends a pydantic model as a strict JSON Schema and
parses the answer into that model; streamed chunks must join into JSON that validates;
Triton's ``/generate`` takes the same ``response_format`` as a string input. What the
model wrote is checked by ``jsonschema`` and pydantic, not by the grammar engine that made it.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import requests
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.triton

ASK = [{"role": "user", "content": "Describe a Debian package for playing music as JSON."}]


class Package(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=24)
    version: int = Field(ge=0, le=99)
    section: Literal["sound", "video", "text"]
    tags: list[str] = Field(max_length=3)


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
    "rivers": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2}},
    "required": ["city", "population", "rivers"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                 "strict": True}}


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 3}],
                         ids=["greedy", "sampled"])
def test_parse_returns_the_pydantic_object(client, sampling):
    completion = client.chat.completions.parse(model="chat", messages=ASK, max_tokens=200,
                                               response_format=Package, **sampling)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Package)
    assert Package.model_validate_json(choice.message.content) == choice.message.parsed


def test_streamed_chunks_join_into_valid_json(client):
    chunks = client.chat.completions.create(
        model="chat", max_tokens=200, temperature=0, stream=True, response_format=FORMAT,
        messages=[{"role": "user", "content": "Tell me about Paris."}])
    pieces, reasons = [], []
    for chunk in chunks:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "stop" and len([p for p in pieces if p]) > 3
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA)
    whole = client.chat.completions.create(
        model="chat", max_tokens=200, temperature=0, response_format=FORMAT,
        messages=[{"role": "user", "content": "Tell me about Paris."}])
    assert whole.choices[0].message.content == "".join(pieces)


def test_completions_follow_the_schema(client):
    answer = client.completions.create(model="chat", prompt="Facts about Berlin in JSON:",
                                       max_tokens=200, temperature=0.7, seed=5,
                                       extra_body={"response_format": FORMAT})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].text), SCHEMA)


def test_json_object_is_a_json_object(client):
    answer = client.chat.completions.create(
        model="chat", max_tokens=200, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the name and age of a person in JSON."}])
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_triton_generate_takes_response_format(stack):
    status, body = stack.triton.generate("chat", {
        "text_input": "Tell me about Rome.", "max_tokens": 200, "temperature": 0,
        "response_format": json.dumps(FORMAT)})
    assert status == 200, body
    assert body["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["text_output"]), SCHEMA)


@pytest.mark.parametrize(("response_format", "param", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}},
     "response_format.json_schema.schema", "Invalid type: thing"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}, "response_format.json_schema.schema",
     "unclosed group"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 70_000}}}, "response_format",
     "at most 65536"),
    ({"type": "yaml"}, "response_format.type", "must be one of"),
    ("json_object", "response_format", "must be an object"),
])
def test_bad_response_formats_are_400_naming_the_field(stack, client, response_format, param,
                                                      words):
    body = {"model": "chat", "messages": ASK, "max_tokens": 8,
            "response_format": response_format}
    reply = requests.post(f"{stack.base_url}/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"]
    if isinstance(response_format, dict):  # Triton's own check says the same, as a 400
        status, answer = stack.triton.generate("chat", {
            "text_input": "hi", "max_tokens": 8, "response_format": json.dumps(response_format)})
        assert status == 400 and answer["error"].startswith(param + ":") and words in answer[
            "error"], answer
    after = client.chat.completions.create(model="chat", messages=ASK, max_tokens=4,
                                           temperature=0)
    assert after.choices[0].finish_reason == "length"
