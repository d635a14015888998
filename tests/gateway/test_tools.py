"""Tool calls through the gateway, on SmolLM2 behind a real tritonserver.

Clients are the real ones agents use: the official ``openai`` client and LangChain's
``ChatOpenAI``. A call's arguments are checked by ``jsonschema`` (or the Pydantic model, or
the Python function they are passed to), not by the grammar engine that shaped them; the
rendered prompt is checked against the model's own tokenizer applying its chat template.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.triton

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 30},
    "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "The weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search_packages",
                                           "description": "Search Debian packages.",
                                           "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search_packages": SEARCH}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


def check_call(call, names=tuple(SCHEMAS)) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 11}],
                         ids=["greedy", "sampled"])
def test_a_demanded_call_validates_against_its_schema(client, choice, sampling):
    answer = client.chat.completions.create(model="chat", messages=ASK, tools=TOOLS,
                                            tool_choice=choice, max_tokens=120, **sampling)
    choice_ = answer.choices[0]
    assert choice_.finish_reason == "tool_calls"
    assert choice_.message.content is None and len(choice_.message.tool_calls) == 1
    names = ("get_weather",) if choice is NAMED else tuple(SCHEMAS)
    check_call(choice_.message.tool_calls[0], names)


def test_streamed_deltas_reassemble_into_the_same_call(client):
    body = {"model": "chat", "messages": ASK, "tools": TOOLS, "tool_choice": NAMED,
            "max_tokens": 120, "temperature": 0}
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [call for chunk in chunks if chunk.choices
              for call in chunk.choices[0].delta.tool_calls or []]
    first = deltas[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0, "function", "get_weather", "")
    assert first.id.startswith("call_") and all(d.id is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments came in fragments
    arguments = "".join(d.function.arguments for d in deltas[1:])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0]
    assert whole.function.arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER)


def test_parse_gives_pydantic_arguments(client):
    class GetWeather(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=20)
        days: int = Field(ge=1, le=7)

    answer = client.chat.completions.parse(
        model="chat", messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", max_tokens=120, temperature=0)
    call = answer.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert call.function.parsed_arguments == GetWeather.model_validate_json(
        call.function.arguments)


def test_tools_and_their_history_reach_the_model_through_its_template(client, smol_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model="chat", messages=history, tools=TOOLS,
                                            max_tokens=24, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    described = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in TOOLS)
    turns = [{"role": "system", "content": f"# Tools\n\nYou may call one or more functions to "
              "assist with the user query.\n\nYou are provided with function signatures "
              f"within <tools></tools> XML tags:\n<tools>\n{described}\n</tools>\n\nFor each "
              "function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
              "\"arguments\": <args-json-object>}\n</tool_call>"},
             *ASK,
             {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", '
              '"arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'},
             {"role": "user", "content": "<tool_response>\n18 degrees, sunny\n"
              "</tool_response>"}]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert answer.usage.prompt_tokens == expected
    plain = client.chat.completions.create(model="chat", messages=ASK, max_tokens=1,
                                           tools=TOOLS, tool_choice="none")
    alone = client.chat.completions.create(model="chat", messages=ASK, max_tokens=1)
    assert plain.usage.prompt_tokens == alone.usage.prompt_tokens  # none: tools not shown


def test_auto_answers_text_or_valid_calls_streamed_alike(client):
    """``auto``: free text, and from a ``<tool_call>`` on, calls whose arguments validate."""
    for seed in range(4):
        body = {"model": "chat", "messages": ASK, "tools": TOOLS, "max_tokens": 80,
                "temperature": 1.0, "seed": seed}
        answer = client.chat.completions.create(**body)
        message, reason = answer.choices[0].message, answer.choices[0].finish_reason
        chunks = list(client.chat.completions.create(stream=True, **body))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls
                 or []]
        assert chunks[-1].choices[0].finish_reason == reason
        if reason == "tool_calls":
            for call in message.tool_calls:
                check_call(call)
            assert [(c.function.name, c.function.arguments) for c in calls] == [
                (c.function.name, c.function.arguments) for c in message.tool_calls]
            assert streamed == (message.content or "")
        else:
            assert reason in ("stop", "length") and message.tool_calls is None and not calls
            assert streamed == message.content
            if reason == "stop":  # text, not a call cut short by max_tokens
                assert "<tool_call>" not in message.content


def test_triton_generate_takes_the_auto_grammar(stack):
    tools = [{"name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    prompt = ('Answer with <tool_call>\n{"name": "get_weather", "arguments": {"city": '
              '"Paris", "unit": "celsius"}}\n</tool_call> to check the weather. '
              "What is the weather in Rome?")
    for seed in range(3):
        status, body = stack.triton.generate("chat", {
            "text_input": prompt, "max_tokens": 80, "temperature": 1.0, "seed": seed,
            "response_format": json.dumps({"type": "tool_calls", "tools": tools})})
        assert status == 200, body
        text = body["text_output"]
        start = text.find("<tool_call>")
        if start < 0:
            continue  # no call begun: free text
        if body["finish_reason"] == "stop":  # from the marker on, calls only
            for block in text[start:].split("<tool_call>\n")[1:]:
                call = json.loads(block.split("\n</tool_call>")[0])
                jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    status, body = stack.triton.generate("chat", {
        "text_input": prompt, "max_tokens": 8, "response_format": json.dumps(
            {"type": "tool_calls", "tools": [{"name": "no spaces"}]})})
    assert status == 400 and body["error"].startswith("response_format.tools[0].name:"), body


def test_each_of_n_choices_is_a_call(client):
    answer = client.chat.completions.create(model="chat", messages=ASK, tools=TOOLS, n=2,
                                            tool_choice="required", max_tokens=120,
                                            temperature=0.9, seed=5)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        check_call(choice.message.tool_calls[0])


def get_weather(city: str, unit: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name.
        unit: celsius or fahrenheit.
    """
    return f"18 degrees {unit} in {city}"


class Package(BaseModel):
    """A Debian package."""

    name: str = Field(max_length=20, description="the package's name")
    section: str = Field(max_length=10, description="its archive section")


def langchain_model(stack):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=stack.base_url, api_key="none", model="chat", temperature=0,
                      max_tokens=120, max_retries=0, timeout=300)


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_langchain_bind_tools_gets_a_call_it_can_run(stack, tool_choice):
    model = langchain_model(stack).bind_tools([get_weather], tool_choice=tool_choice)
    message = model.invoke("What is the weather like in Paris today?")
    assert len(message.tool_calls) == 1 and not message.invalid_tool_calls
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert get_weather(**call["args"]).startswith("18 degrees")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_is_an_object(stack, method):
    model = langchain_model(stack).with_structured_output(Package, method=method)
    package = model.invoke("Describe a Debian package for playing music.")
    assert isinstance(package, Package)


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [*ASK, {"role": "tool", "content": "18"}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"type": "function"}]}]},
     "messages[1].tool_calls[0]"),
])
def test_bad_tool_input_is_a_400_naming_the_field(stack, client, body, param):
    request = {"model": "chat", "messages": ASK, "max_tokens": 8, **body}
    reply = requests.post(f"{stack.base_url}/chat/completions", json=request, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    after = client.chat.completions.create(model="chat", messages=ASK, max_tokens=4,
                                           temperature=0)
    assert after.choices[0].finish_reason == "length"


# Models whose chat templates have tools -------------------------------------------------

NATIVE = {"qwen25-tools": "qwen2.5", "mistral-tools": "mistral-v3", "llama-tools": "llama-3.1"}
"""Served model -> family (tests/support/tool_templates.py): tiny random decoders, so their
calls are whatever the grammar lets a random model write."""
BOUNDED = {"get_weather": WEATHER, "search_packages": {**SEARCH, "properties": {
    "query": {"type": "string", "maxLength": 12}, "limit": {"type": "integer", "maximum": 9}}}}
BOUNDED_TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}}
                 for name, schema in BOUNDED.items()]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """One more tritonserver, for this module, with the three tiny tool-template models
    (the shared stack's SmolLM2 template has no tools: it tests the fallback above)."""
    from tests.gateway.conftest import llm
    from tests.support.tool_templates import make_tool_decoder
    from tests.support.triton import free_port, running_triton
    from tritonop.gateway.backend import TritonAddress
    from tritonop.gateway.config import gateway_config
    from tritonop.gateway.server import GatewayThread

    root, folders = tmp_path_factory.mktemp("tool-artifacts"), {}
    resources = []
    for name, family in NATIVE.items():
        folders[name] = make_tool_decoder(family, tmp_path_factory.mktemp(name) / "model")
        resources.append(llm(name, model={"source": str(folders[name]),
                                          "maxContextLength": 2048, "dtype": "float32"},
                             generation={"limits": {"maxTokens": 300},
                                         "defaults": {"maxTokens": 32}},
                             engine={"maxSequences": 2, "maxWaiting": 4, "threads": 1}))
    with running_triton(resources, root, tmp_path_factory.mktemp("tool-triton")) as triton:
        address = TritonAddress(triton.server.grpc_url, triton.server.http_url)
        gateway = GatewayThread(gateway_config(resources), address, free_port()).start()
        try:
            yield OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0,
                         timeout=300), folders
        finally:
            gateway.stop()


@pytest.mark.parametrize("model", list(NATIVE))
def test_native_tool_templates_shape_prompts_and_calls(native, model):
    """The prompt is the model's template with the tools (its token count equals the
    tokenizer's own rendering), and a demanded call, in the family's format, comes back as
    OpenAI's ``tool_calls``, streamed deltas adding up to the same calls."""
    from transformers import AutoTokenizer

    client, folders = native
    tokenizer = AutoTokenizer.from_pretrained(folders[model])
    body = {"model": model, "messages": ASK, "tools": BOUNDED_TOOLS, "tool_choice": "required",
            "max_tokens": 300, "temperature": 0}
    answer = client.chat.completions.create(**body)
    text = tokenizer.apply_chat_template(ASK, tools=BOUNDED_TOOLS, add_generation_prompt=True,
                                         tokenize=False)
    assert answer.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)[
        "input_ids"])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert 1 <= len(calls) <= (1 if model == "llama-tools" else 8)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), BOUNDED[call.function.name])
    chunks = list(client.chat.completions.create(stream=True, **body))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    joined: list[list[str]] = []
    for delta in (d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []):
        if delta.id is not None:
            assert delta.index == len(joined) and delta.function.arguments == ""
            joined.append([delta.function.name, ""])
        else:
            assert delta.index == len(joined) - 1 and delta.function.name is None
            joined[-1][1] += delta.function.arguments
    assert joined == [[c.function.name, c.function.arguments] for c in calls]
    single = client.chat.completions.create(parallel_tool_calls=False, **body)
    assert len(single.choices[0].message.tool_calls) == 1
