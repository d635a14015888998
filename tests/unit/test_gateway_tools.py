"""Tool calls and n choices in the gateway's pure parts: parsing, prompts, answers, deltas.

The served behaviour (a real model behind a real tritonserver) is in tests/gateway/test_tools.py
and test_choices.py; here each rule is pinned on its own.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tritonop.gateway.admission import AdmissionBound
from tritonop.gateway.config import Admission, ModelEntry
from tritonop.gateway.errors import APIError
from tritonop.gateway.protocol import parse_chat, parse_completion
from tritonop.gateway.tools import AutoStream, CallStream, parse_auto, parse_calls, split_call
from tritonop_backend.llm.chat_tools import parse_chat as read_chat
from tritonop_backend.llm.chat_tools import parse_constraint as parse_response_format

MODELS = {"chat": ModelEntry("chat", "chat", Admission(2, 2), max_tokens_limit=100,
                             max_choices=4)}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "noop"}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def chat(**body):
    return parse_chat({"model": "chat", "messages": ASK, **body}, MODELS)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name", "is required"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name", "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "tools[0].function.name", "1 to 64"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "thing"}}}]}, "tools[0].function.parameters", "Invalid type: thing"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string", "pattern": "(("}}}]}, "tools[0].function.parameters", "unclosed"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools[0].function.parameters", "JSON Schema"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "must be function"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools[1].function.name", "names two tools"),
    ({"tools": {"a": 1}}, "tools", "must be a list"),
    ({"tools": [TOOLS[1]] * 65}, "tools", "at most 64"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "not one of the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "noop"}}},
     "tool_choice.function.name", "not one of the tools"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "must be none"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"n": 5}, "n", "[1, 4]"),
    ({"n": 0}, "n", "[1, 4]"),
])
def test_bad_tools_and_n_are_400s_naming_the_field(body, param, words):
    with pytest.raises(APIError) as caught:
        chat(**body)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message
    assert words in caught.value.message


def test_completions_refuse_tools_and_take_n():
    with pytest.raises(APIError) as caught:
        parse_completion({"model": "chat", "prompt": "x", "tools": TOOLS}, MODELS)
    assert caught.value.param == "tools"
    assert parse_completion({"model": "chat", "prompt": "x", "n": 3}, MODELS).n == 3


def test_required_and_named_choices_constrain_the_output_to_calls():
    for choice, names in [("required", ("get_weather", "noop")),
                          ({"type": "function", "function": {"name": "get_weather"}},
                           ("get_weather",))]:
        args = chat(tools=TOOLS, tool_choice=choice)
        assert args.tools is not None and args.tools.names == names
        constraint = parse_response_format(args.response_format)
        assert constraint is not None and constraint.type == "tool_calls"
        sent = json.loads(args.response_format)
        assert sent["mode"] == "required" and sent["parallel"] is (choice == "required")
        assert [tool["name"] for tool in sent["tools"]] == list(names)
    single = json.loads(chat(tools=TOOLS, parallel_tool_calls=False).response_format)
    assert single["mode"] == "auto" and single["parallel"] is False
    formatted = chat(tools=TOOLS, response_format={"type": "json_object"})
    assert json.loads(formatted.response_format) == {"type": "json_object"}
    none = chat(tools=TOOLS, tool_choice="none")
    assert none.tools.names == () and "get_weather" not in none.prompt


def test_the_conversation_goes_to_the_model_with_its_calls_and_tools():
    """The model's template renders tools, calls and results (tests/unit/
    test_llm_chat_tools.py); the gateway sends them as they came, checked."""
    args = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "noop"}},
                messages=[
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])
    sent = json.loads(args.prompt)
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather", "noop"]
    assert sent["tool_choice"] == "noop"
    assert sent["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert sent["messages"][3] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    read = read_chat(args.prompt)  # what the LLM model reads back
    assert read.choice == "noop" and list(read.messages) == sent["messages"]
    assert json.loads(chat().prompt) == ASK  # no tools: the plain list, as before


def test_choice_seeds_follow_the_first():
    args = chat(n=3, seed=7, temperature=0.5)
    assert [args.choice(i).sampling["seed"] for i in range(3)] == [7, 8, 9]
    unseeded = chat(n=2)
    assert "seed" not in unseeded.choice(1).sampling


def test_answers_are_parsed_into_calls():
    names = ("get_weather", "noop")
    written = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    assert split_call(written, names) == ("get_weather", '{"city": "Paris", "unit": "c"}')
    assert split_call('{"name": "other", "arguments": {}}', names) is None
    assert split_call('{"name": "noop", "arguments": 3}', names) is None
    assert parse_auto("Sure.\n<tool_call>\n" + written + "\n</tool_call>", names) == (
        "Sure.", [("get_weather", '{"city": "Paris", "unit": "c"}')])
    two = f"<tool_call>{written}</tool_call>\n<tool_call>" + '{"name": "noop", "arguments": {}}'
    assert [c[0] for c in parse_auto(two, names)[1]] == ["get_weather", "noop"]
    assert parse_auto("[TOOL_CALLS] [" + written + "]", names)[1][0][0] == "get_weather"
    assert parse_auto(written, names) == (None, [("get_weather",
                                                  '{"city": "Paris", "unit": "c"}')])
    for text in ("Paris is sunny.", "<tool_call>{broken</tool_call>",
                 '<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "{not json"):
        assert parse_auto(text, names) == (text, [])


def test_streamed_call_deltas_join_into_the_call():
    written = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    stream = CallStream(("noop", "get_weather"))
    deltas = [d for i in range(0, len(written), 3) for d in stream.push(written[i:i + 3])]
    tail, is_call = stream.finish()
    deltas += tail
    assert is_call
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function"
    assert first["id"].startswith("call_") and first["function"] == {
        "name": "get_weather", "arguments": ""}
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert arguments == '{"city": "Paris"}'


def test_auto_stream_sends_text_and_holds_calls():
    stream = AutoStream(("noop",))
    pieces = ["Let me check", " <tool", "_call>", '{"name": "noop", ', '"arguments": {}}',
              "</tool_call>"]
    deltas = [d for piece in pieces for d in stream.push(piece)]
    assert "".join(d["content"] for d in deltas) == "Let me check "
    tail, is_call = stream.finish()
    assert is_call and tail[0]["tool_calls"][0]["function"] == {"name": "noop",
                                                                "arguments": "{}"}
    text = AutoStream(("noop",))
    sent = [d for piece in ["A <tool", "box> here"] for d in text.push(piece)]
    tail, is_call = text.finish()
    assert not is_call and "".join(d["content"] for d in sent + tail) == "A <toolbox> here"


@pytest.mark.parametrize("call", [
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
])
def test_a_control_token_call_after_text_is_content_then_a_call(call):
    """Under ``auto`` the model keeps the control token that begins a call in the text:
    the text before it is the content (streamed first), the rest the call."""
    names = ("get_weather", "noop")
    text = "Let me see. " + call
    assert parse_auto(text, names) == ("Let me see.", [("get_weather", '{"city": "Rome"}')])
    for size in (1, 4, 9):
        stream = AutoStream(names)
        deltas = [d for i in range(0, len(text), size) for d in stream.push(text[i:i + size])]
        assert "".join(d["content"] for d in deltas) == "Let me see. "
        tail, is_call = stream.finish()
        assert is_call and [d["tool_calls"][0]["function"] for d in tail] == [
            {"name": "get_weather", "arguments": '{"city": "Rome"}'}]


def test_admission_takes_all_places_of_a_request_at_once():
    async def run() -> list[str]:
        bound = AdmissionBound(3, 4)
        order: list[str] = []
        await bound.acquire(2)
        big = asyncio.ensure_future(bound.acquire(3))  # needs the whole bound
        await asyncio.sleep(0)
        small = asyncio.ensure_future(bound.acquire(1))  # waits behind it, in line
        await asyncio.sleep(0)
        assert not big.done() and not small.done() and bound.in_flight == 2
        bound.release(2)
        await big
        order.append(f"big {bound.in_flight}")
        bound.release(3)
        await small
        order.append(f"small {bound.in_flight}")
        bound.release(1)
        await bound.acquire(10)  # more than the bound: the whole bound
        order.append(f"all {bound.in_flight}")
        return order

    assert asyncio.run(run()) == ["big 3", "small 1", "all 3"]


@pytest.mark.parametrize(("text", "allowed"), [
    ("Paris is sunny today.", True),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     True),
    ('<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}\n</tool_call>', True),
    ('Let me see. <tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>', True),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}', False),
    ('<tool_call>\n{"name": "rm", "arguments": {}}', False),
    ('The <tool_call> tag', False),
])
def test_auto_grammar_allows_text_or_valid_calls(text, allowed):
    """What ``tool_choice: auto`` lets the model write, checked byte by byte: anything until
    a call begins (the watch sees ``<tool_call>``), the grammar from there."""
    import llguidance

    from tritonop_backend.llm.grammar import CallWatch

    constraint = parse_response_format(chat(tools=TOOLS).response_format)
    assert constraint.trigger is not None
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer("byte"), constraint.grammar,
                                   log_level=0)
    watch, data, consumed = CallWatch(constraint.trigger, frozenset()), text.encode(), True
    for at, byte in enumerate(data):
        back = watch.push(byte, bytes([byte]))
        if back is not None:
            consumed = all(matcher.consume_token(b) for b in data[at + 1 - back:])
            break
    else:
        back = None
    assert (back is None or (consumed and matcher.is_accepting())) == allowed
    if allowed:  # the gateway reads it: the text before the marker is the content
        content, calls = parse_auto(text, ("get_weather", "noop"))
        assert bool(calls) == (back is not None)
        assert content == (text.split("<tool_call>")[0].strip() or None)


@pytest.mark.parametrize(("value", "field"), [
    ({"type": "tool_calls", "tools": []}, "response_format.tools"),
    ({"type": "tool_calls", "tools": [{"name": "a b"}]}, "response_format.tools[0].name"),
    ({"type": "tool_calls", "tools": [{"name": "f", "parameters": {"type": "thing"}}]},
     "response_format.tools[0].parameters"),
    ({"type": "tool_calls", "tools": [{"name": "f"}], "extra": 1}, "response_format.extra"),
])
def test_triton_refuses_bad_tool_call_formats_naming_the_part(value, field):
    from tritonop_backend.errors import RequestError

    with pytest.raises(RequestError) as caught:
        parse_response_format(json.dumps(value))
    assert caught.value.field == field


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P{a}\\"ris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>',
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "P{a}\\"ris"}}, '
    '{"name": "noop", "arguments": {}}]',
    '[{"name": "get_weather", "arguments": {"city": "P{a}\\"ris"}}, '
    '{"name": "noop", "arguments": {}}]',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "P{a}\\"ris"}}; '
    '{"name": "noop", "parameters": {}}',
    '[TOOL_CALLS]get_weather[ARGS]{"city": "P{a}\\"ris"}[TOOL_CALLS]noop[ARGS]{}',
])
def test_calls_are_read_and_streamed_in_every_format(text):
    """Hermes' blocks, Mistral's list (its marker a control token, usually dropped) and
    Llama's objects: parsed whole, and streamed call by call, argument pieces joining into
    the same arguments, whatever the pieces' boundaries (braces inside strings included)."""
    names = ("get_weather", "noop")
    calls = [("get_weather", '{"city": "P{a}\\"ris"}'), ("noop", "{}")]
    assert parse_calls(text, names) == calls
    assert parse_auto(text, names) == (None, calls)
    for size in (1, 2, 5, 7):
        stream = CallStream(names)
        deltas = [d for i in range(0, len(text), size) for d in stream.push(text[i:i + size])]
        tail, whole = stream.finish()
        assert whole
        got: list[list[str]] = []
        for delta in deltas + tail:
            (entry,) = delta["tool_calls"]
            if "id" in entry:
                got.append([entry["function"]["name"], ""])
                assert entry["index"] == len(got) - 1
            else:
                got[-1][1] += entry["function"]["arguments"]
        assert [tuple(call) for call in got] == calls


def test_a_cut_call_is_not_a_call():
    stream = CallStream(("noop",))
    stream.push('<tool_call>\n{"name": "noop", "arguments": {"a": ')
    assert stream.finish()[1] is False
    assert parse_calls('[{"name": "noop", "arguments": {}}', ("noop",)) is None


V11_ONE = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
V11_TWO = V11_ONE + '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "unit": "c"}'


@pytest.mark.parametrize("text", [V11_ONE, V11_TWO])
def test_mistral_v11_calls_are_read_whole_and_streamed(text):
    """Mistral v11 (Small 3.2, Magistral, Devstral): ``[TOOL_CALLS]name[ARGS]{...}`` per
    call, both control tokens kept in the text; read whole, as a constrained stream (the
    arguments' pieces join into the arguments as written) and as an ``auto`` stream after
    text, whatever the pieces' sizes."""
    names = ("get_weather", "noop")
    expected = [("get_weather", '{"city": "Paris"}')]
    if text == V11_TWO:
        expected.append(("get_weather", '{"city": "Rome", "unit": "c"}'))
    assert parse_calls(text, names) == expected
    assert parse_auto(text, names) == (None, expected)
    assert parse_auto("Checking. " + text, names) == ("Checking.", expected)
    for size in (1, 4, 9):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        stream = CallStream(names)
        deltas = [d for piece in pieces for d in stream.push(piece)]
        tail, whole = stream.finish()
        assert whole and not tail
        got: list[list[str]] = []
        for delta in deltas:
            (entry,) = delta["tool_calls"]
            if "id" in entry:
                assert entry["index"] == len(got) and entry["id"].startswith("call_")
                got.append([entry["function"]["name"], entry["function"]["arguments"]])
            else:
                assert entry["index"] == len(got) - 1
                got[-1][1] += entry["function"]["arguments"]
        assert [tuple(call) for call in got] == expected
        auto = AutoStream(names)
        sent = [d for piece in ["Checking. ", *pieces] for d in auto.push(piece)]
        assert "".join(d["content"] for d in sent) == "Checking. "
        tail, is_call = auto.finish()
        assert is_call and [(d["tool_calls"][0]["index"], d["tool_calls"][0]["function"])
                            for d in tail] == [
            (index, {"name": name, "arguments": arguments})
            for index, (name, arguments) in enumerate(expected)]


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS]rm[ARGS]{"city": "Paris"}',  # not one of the tools
    "[TOOL_CALLS]get_weather[ARGS][1]",  # arguments not an object
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} and more',
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Par',  # cut
    '[TOOL_CALLS]get_weather{"city": "Paris"}',  # no [ARGS]
])
def test_a_broken_mistral_v11_answer_is_text(text):
    names = ("get_weather", "noop")
    assert parse_calls(text, names) is None
    assert parse_auto(text, names) == (text, [])
    stream = CallStream(names)
    stream.push(text)
    assert stream.finish()[1] is False
