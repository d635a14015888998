"""Tool calls in the model's own chat format, on tiny decoders with the families' templates.

The conversation goes the whole way a chat request goes (the gateway's parsing, the LLM
model's ``parse_request``, the engine's templating and grammar); the references are
independent: ``transformers``' ``apply_chat_template(messages, tools=...)`` for the prompt,
``jsonschema`` for the calls' arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest

from tests.support import decoders
from tests.support.llm import run
from tests.support.tool_templates import MISTRAL_V11, TOOL_DECODERS, make_tool_decoder
from tritonop.gateway.config import Admission, ModelEntry
from tritonop.gateway.protocol import GenerationArgs, parse_chat
from tritonop.gateway.tools import CallStream, parse_auto, parse_calls
from tritonop_backend.errors import RequestError
from tritonop_backend.llm.chat_tools import (
    Chat,
    detect_tool_format,
    native_messages,
    parse_constraint,
    render_chat,
)
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=400, default_temperature=0.0,
                          max_context_tokens=2048)
MODELS = {"chat": ModelEntry("chat", "chat", Admission(2, 2), max_tokens_limit=400)}
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 10},
                                           "limit": {"type": "integer", "maximum": 50}},
          "required": ["query"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool.",
                                           "parameters": schema}}
         for name, schema in SCHEMAS.items()]
CALL_ID = "Ab3dE6g8h"  # Mistral's template takes ids of 9 letters and digits only
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C."},
    {"role": "user", "content": "And in Rome, and search for a package?"},
]


@pytest.fixture(scope="module")
def tool_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("tool-decoders")
    return {name: load_causal_lm(make_tool_decoder(name, root / name), "float32", "cpu")
            for name in TOOL_DECODERS}


def engine_of(loaded: LoadedModel) -> LLMEngine:
    return LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)


def gateway_args(messages: list[dict[str, Any]], **body: Any) -> GenerationArgs:
    return parse_chat({"model": "chat", "messages": messages, **body}, MODELS)


def model_request(args: GenerationArgs, policy: GenerationPolicy,
                  max_tokens: int = 300) -> GenerationRequest:
    """What the LLM model reads from the gateway's Triton inputs."""
    values: dict[str, Any] = {"text_input": args.prompt, "prompt_format": args.prompt_format,
                              "max_tokens": max_tokens, "temperature": 0.0}
    if args.response_format is not None:
        values["response_format"] = args.response_format
    return parse_request(values, policy)


def reference_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as transformers' documentation passes it to a template: calls'
    arguments as objects, and no ``tool_calls`` key on turns without calls."""
    out = []
    for message in messages:
        copy = {"role": message["role"], "content": message["content"] or ""}
        if message.get("tool_calls"):
            copy["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"],
                "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]]
        if "tool_call_id" in message:
            copy["tool_call_id"] = message["tool_call_id"]
        out.append(copy)
    return out


@pytest.mark.parametrize("name", list(TOOL_DECODERS))
def test_the_format_is_read_from_the_template(
        name: str, tool_models: dict[str, LoadedModel]) -> None:
    assert engine_of(tool_models[name]).policy.tool_format == TOOL_DECODERS[name][3]


def test_templates_without_tools_fall_back(tiny_decoders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    for name in ("qwen2", "llama", "mistral", "gemma3", "phi3"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_decoders[name])
        render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
        assert detect_tool_format(render) == "fallback"


@pytest.mark.parametrize("name", list(TOOL_DECODERS))
def test_the_prompt_is_the_templates_own_rendering(
        name: str, tool_models: dict[str, LoadedModel]) -> None:
    loaded = tool_models[name]
    engine = engine_of(loaded)
    for messages, body in [(HISTORY, {"tools": TOOLS}),
                           (HISTORY[1:2], {"tools": TOOLS, "tool_choice": "required"}),
                           (HISTORY, {})]:
        request = model_request(gateway_args(messages, **body), engine.policy)
        expected = loaded.tokenizer.apply_chat_template(
            reference_messages(messages), tools=body.get("tools"), add_generation_prompt=True,
            tokenize=False)
        assert ("search tool." in expected) == bool(body)  # the tools are shown
        assert engine.encode_request(request) == loaded.tokenizer(
            expected, add_special_tokens=False)["input_ids"]


def test_mistral_ids_are_made_the_nine_characters_its_template_demands() -> None:
    calls = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0123456789abcdef", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "call_0123456789abcdef"}]
    native = native_messages(calls, "mistral")
    made = native[0]["tool_calls"][0]["id"]
    assert len(made) == 9 and made.isalnum() and native[1]["tool_call_id"] == made
    assert native_messages(calls, "hermes")[1]["tool_call_id"] == "call_0123456789abcdef"


def test_a_conversation_the_template_refuses_is_a_request_error(
        tool_models: dict[str, LoadedModel]) -> None:
    """Llama 3.1's template renders one call per assistant turn."""
    engine = engine_of(tool_models["llama-3.1"])
    two = {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function",
         "function": {"name": "search", "arguments": '{"query": "x"}'}} for i in range(2)]}
    request = model_request(gateway_args([HISTORY[1], two, {"role": "user", "content": "?"}],
                                         tools=TOOLS), engine.policy)
    with pytest.raises(RequestError) as caught:
        engine.encode_request(request)
    assert caught.value.field == "messages" and "single tool-calls" in caught.value.problem


def assert_calls(text: str, names: tuple[str, ...], most: int) -> list[tuple[str, str]]:
    calls = parse_calls(text, names)
    assert calls is not None and 1 <= len(calls) <= most, text
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return calls


@pytest.mark.parametrize("name", list(TOOL_DECODERS))
def test_a_required_call_parses_and_validates(
        name: str, tool_models: dict[str, LoadedModel]) -> None:
    engine = engine_of(tool_models[name])
    ask = [HISTORY[1]]
    bodies = {"any": {"tools": TOOLS, "tool_choice": "required"},
              "one": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
              "named": {"tools": TOOLS,
                        "tool_choice": {"type": "function", "function": {"name": "search"}}},
              "sampled": {"tools": TOOLS, "tool_choice": "required", "temperature": 1.0,
                          "seed": 5}}
    requests = {}
    for key, body in bodies.items():
        args = gateway_args(ask, **body)
        requests[key] = model_request(args, engine.policy)
        if key == "sampled":
            requests[key] = parse_request(
                {"text_input": args.prompt, "prompt_format": "messages", "max_tokens": 300,
                 "temperature": 1.0, "seed": 5, "response_format": args.response_format},
                engine.policy)
    outcomes = run(engine, requests)
    most = 1 if name == "llama-3.1" else 8
    for key, outcome in outcomes.items():
        assert outcome.last.finish_reason == "stop", (key, outcome.text)
        calls = assert_calls(outcome.text, ("get_weather", "search"),
                             1 if key in ("one", "named") else most)
        if key == "named":
            assert {call[0] for call in calls} == {"search"}
        assert streamed([event.text for event in outcome.events]) == calls
        # Mistral v11 writes each call as [TOOL_CALLS]name[ARGS]{...}; v3 as a list.
        v11 = "".join(rf"\[TOOL_CALLS\]{n}\[ARGS\]{re.escape(a)}" for n, a in calls)
        assert bool(re.fullmatch(v11, outcome.text)) == (name == "mistral-v11"), outcome.text


def streamed(pieces: list[str]) -> list[tuple[str, str]]:
    """The calls OpenAI's streamed deltas add up to, checked to be in their shape: a first
    delta per call with index, id, type and name, then pieces of its arguments."""
    stream = CallStream(("get_weather", "search"))
    deltas = [delta for piece in pieces for delta in stream.push(piece)]
    tail, whole = stream.finish()
    assert whole
    calls: list[list[str]] = []
    for delta in deltas + tail:
        (entry,) = delta["tool_calls"]
        if "id" in entry:
            assert entry["index"] == len(calls) and entry["type"] == "function"
            assert entry["id"].startswith("call_") and entry["function"]["arguments"] == ""
            calls.append([entry["function"]["name"], ""])
        else:
            assert set(entry) == {"index", "function"} and entry["index"] == len(calls) - 1
            calls[-1][1] += entry["function"]["arguments"]
    return [(name, arguments) for name, arguments in calls]


FORMAT_TEXTS = {
    "hermes": ('<tool_call>\n{"name": "search", "arguments": {"query": "vim"}}\n</tool_call>',
               "\n"),
    "fallback": ('<tool_call>\n{"name": "search", "arguments": {"query": "vim"}}\n'
                 "</tool_call>", "\n"),
    "mistral": ('{"name": "search", "arguments": {"query": "vim"}}', ", "),
    "llama3_json": ('{"name": "search", "parameters": {"query": "vim"}}', "; "),
}


def allowed(grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer("byte"), grammar, log_level=0)
    return all(matcher.consume_token(byte) for byte in text.encode()) and matcher.is_accepting()


@pytest.mark.parametrize("tool_format", list(FORMAT_TEXTS))
def test_each_formats_grammar_writes_what_its_parser_reads(tool_format: str) -> None:
    call, separator = FORMAT_TEXTS[tool_format]
    wrap = (lambda calls: "[" + ", ".join(calls) + "]") if tool_format == "mistral" else (
        lambda calls: separator.join(calls))
    spec = {"type": "tool_calls", "tools": [{"name": n, "parameters": s}
                                            for n, s in SCHEMAS.items()]}
    grammars = {(mode, parallel): parse_constraint(
        json.dumps({**spec, "mode": mode, "parallel": parallel}), tool_format).grammar
        for mode in ("auto", "required") for parallel in (True, False)}
    one, two = wrap([call]), wrap([call, call])
    bad = wrap([call.replace('"vim"', "7")])
    for (mode, parallel), grammar in grammars.items():
        assert allowed(grammar, one)
        assert allowed(grammar, two) == (parallel and tool_format != "llama3_json" and not (
            tool_format == "fallback" and mode == "required"))
        assert not allowed(grammar, bad)
        # Under auto the grammar applies from where a call begins (its trigger): text
        # before it is the watch's, not the grammar's, to let through.
        assert not allowed(grammar, "Paris is sunny.")
        assert allowed(grammar, "Sure. " + one) == (mode == "auto" and "<" in one)
        assert not allowed(grammar, wrap([call.replace('"search"', '"rm"')]))
    assert parse_auto(one, ("search",)) == (None, [("search", '{"query": "vim"}')])
    assert parse_auto("Paris is sunny.", ("search",)) == ("Paris is sunny.", [])


def test_the_fallback_writes_tools_and_calls_into_plain_turns(
        tiny_decoders: dict[str, Path]) -> None:
    """A template without tools (the tiny ChatML one) gets Hermes' words and blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoders["qwen2"])
    args = gateway_args(HISTORY, tools=TOOLS, tool_choice="required")
    chat = parse_request({"text_input": args.prompt, "prompt_format": "messages"},
                         POLICY).chat
    assert isinstance(chat, Chat)
    prompt = render_chat(lambda m, **o: tokenizer.apply_chat_template(m, tokenize=False, **o),
                         chat, "fallback")
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '{"type": "function", "function": {"name": "search"' in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert "Call one of these functions now." in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "c"}}\n</tool_call><|im_end|>') in prompt
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>" in prompt


def test_mistral_v11s_grammar_writes_its_control_tokens(
        tool_models: dict[str, LoadedModel]) -> None:
    """``[TOOL_CALLS]name[ARGS]{...}`` on the model's own tokens (the control tokens by their
    ids): required from ``[TOOL_CALLS]``, auto from after it (the trigger's token)."""
    from llguidance.hf import from_tokenizer

    engine = engine_of(tool_models["mistral-v11"])
    tokenizer = engine.tokenizer
    tokens = dict(engine.policy.tool_tokens)
    assert set(tokens) == {"[TOOL_CALLS]", "[ARGS]"}
    vocabulary = from_tokenizer(tokenizer)

    def ids(text: str) -> list[int]:
        out: list[int] = []
        for part in re.split(r"(\[TOOL_CALLS\]|\[ARGS\])", text):
            out += [tokens[part]] if part in tokens else tokenizer(
                part, add_special_tokens=False)["input_ids"]
        return out

    def takes(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return all(matcher.consume_token(token) for token in ids(text)) and (
            matcher.is_accepting())

    spec = {"type": "tool_calls", "tools": [{"name": n, "parameters": s}
                                            for n, s in SCHEMAS.items()]}
    one = '[TOOL_CALLS]search[ARGS]{"query": "vim"}'
    for mode in ("auto", "required"):
        for parallel in (True, False):
            constraint = parse_constraint(json.dumps({**spec, "mode": mode,
                                                      "parallel": parallel}),
                                          "mistral_v11", tokens)
            assert constraint is not None
            grammar = constraint.grammar
            skip = len("[TOOL_CALLS]") if mode == "auto" else 0  # the trigger's token
            assert takes(grammar, one[skip:])
            assert takes(grammar, (one + one)[skip:]) == parallel
            assert not takes(grammar, one[skip:].replace('"vim"', "7"))
            assert not takes(grammar, one[skip:].replace("search", "rm"))
            assert not takes(grammar, '{"name": "search", "arguments": {"query": "vim"}}')
            assert not takes(grammar, one[skip:].replace("[ARGS]", ""))
            assert (constraint.trigger is not None) == (mode == "auto")
    with pytest.raises(ValueError):  # without the ids there is no grammar
        parse_constraint(json.dumps(spec), "mistral_v11")


def test_mistral_v11_needs_its_control_tokens_in_the_vocabulary(tmp_path: Path) -> None:
    """A template that writes v11 calls on a tokenizer where ``[ARGS]`` is no single token:
    its calls could not be written, so tools take the fallback; with it, v11."""
    base = decoders.DECODERS["mistral"]
    control = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
               "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
    formats = {}
    for name, extra in (("without", ()), ("with", ("[ARGS]",))):
        family = dataclasses.replace(base.family, style="bytelevel", template=MISTRAL_V11,
                                     special=(*base.family.special, *control, *extra))
        folder = decoders.make_decoder(dataclasses.replace(base, family=family),
                                       tmp_path / name)
        loaded = load_causal_lm(folder, "float32", "cpu")
        render = functools.partial(loaded.tokenizer.apply_chat_template, tokenize=False)
        assert detect_tool_format(render) == "mistral_v11"
        policy = LLMEngine(loaded.model, loaded.tokenizer,
                           dataclasses.replace(POLICY, max_context_tokens=512)).policy
        formats[name] = (policy.tool_format, dict(policy.tool_tokens))
    assert formats["without"] == ("fallback", {})
    assert formats["with"][0] == "mistral_v11"
    assert set(formats["with"][1]) == {"[TOOL_CALLS]", "[ARGS]"}


def test_mistral_v3_is_untouched_by_v11(tool_models: dict[str, LoadedModel]) -> None:
    """A Mistral v3 template keeps its format, grammar tokens none, and its control token
    alone is shown in an auto answer's text."""
    engine = engine_of(tool_models["mistral-v3"])
    assert engine.policy.tool_format == "mistral" and engine.policy.tool_tokens == ()
    request = model_request(gateway_args([HISTORY[1]], tools=TOOLS, tool_choice="required"),
                            engine.policy)
    text = run(engine, {"v3": request})["v3"].text
    assert "[ARGS]" not in text and "[TOOL_CALLS]" not in text
    assert text.startswith('[{"name": ')
