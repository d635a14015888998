"""Tool calls in the model's own chat format: detection, prompts and the grammar of calls.

Pure (no Triton, no torch): the engine hands it the model's tokenizer, the OpenAI gateway
the request's tools.

A chat template that supports tools (``tokenizer.apply_chat_template(messages, tools=...)``
renders them: Qwen2/2.5/3, Hermes, Llama 3.1, Mistral v3) is used as it is: the prompt is
the template's own rendering of the messages, the tools, the assistant's earlier
``tool_calls`` and the ``tool`` results. :func:`detect_tool_format` reads which format the
template writes a call in by rendering a probe call with it:

- ``hermes`` (Hermes, Qwen): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  blocks, one per call;
- ``mistral`` (Mistral v3): ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``;
- ``mistral_v11`` (Mistral Small 3.2, Magistral, Devstral: tokenizer v11 and later):
  ``[TOOL_CALLS]name[ARGS]{...}``, one ``[TOOL_CALLS]`` per call, no list and no id;
- ``llama3_json`` (Llama 3.1): one ``{"name": ..., "parameters": {...}}`` object.

A template without tools, or one whose calls are in none of these formats, gets the
``fallback``: the tools described in the system turn in Hermes' words, earlier calls and
results written into the turns as ``<tool_call>`` and ``<tool_response>`` blocks, and calls
read in Hermes' format (what every model got before formats were detected).

The grammar of calls (:func:`tool_grammar`) follows the format, so a constrained answer
always parses: ``required`` (or a named function) allows only calls; ``auto`` lets the model
write freely until a call begins (:data:`TRIGGERS`: Hermes' ``<tool_call>`` anywhere, Mistral's
``[TOOL_CALLS]`` or Llama's ``<|python_tag|>`` control token anywhere, or ``[`` / ``{`` as the
answer's first character), and from there allows only calls, to the end of the answer;
one call when ``parallel_tool_calls`` is false or a named function is demanded (and always
for Llama 3.1, whose template renders one call per turn, and for ``required`` in the
fallback, where a model that was not taught the format tends to repeat its call until
``max_tokens``: SmolLM2-135M does), else up to :data:`MAX_PARALLEL_CALLS`. Control tokens
(Mistral's ``[TOOL_CALLS]``, Llama's ``<|python_tag|>``) are not written by the grammar: they
are special tokens, dropped from the text anyway; the list or object that follows them is.
Except in ``mistral_v11``, where they are the call's syntax (:data:`GRAMMAR_TOKENS`): the
grammar writes ``[TOOL_CALLS]`` (under ``auto``, from the second call on) and ``[ARGS]`` by
their ids in the model's vocabulary, and the text shows them by name (the engine's
``shown`` tokens), so that the gateway reads the calls from it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
import llguidance

from tritonop_backend.errors import RequestError
from tritonop_backend.llm.grammar import (
    COMPILE_OPTIONS,
    MAX_SCHEMA_NAME,
    ResponseFormat,
    Trigger,
    compile_schema,
    parse_response_format,
)

FORMATS = ("hermes", "mistral", "mistral_v11", "llama3_json", "fallback")
MAX_PARALLEL_CALLS = 8
"""Calls one answer may make when parallel calls are allowed."""
MAX_TOOLS = 64
MAX_MESSAGES = 2048
"""Messages one conversation may hold (each costs the chat template a turn)."""
ROLES = ("system", "user", "assistant", "tool")
FIELD = "response_format"
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TRIGGERS = {
    "hermes": Trigger(marker=CALL_OPEN),
    "fallback": Trigger(marker=CALL_OPEN),
    "mistral": Trigger(controls=("[TOOL_CALLS]",), first="["),
    "mistral_v11": Trigger(controls=("[TOOL_CALLS]",)),
    "llama3_json": Trigger(controls=("<|python_tag|>",), first="{"),
}
"""Where a call begins in an ``auto`` answer, per format. Llama's bare ``{`` and Mistral's
``[`` count only at the start: inside text they are too common to mean a call."""
PROBE_NAME = "tritonop_probe_function"
PROBE_TOOL = {"type": "function", "function": {
    "name": PROBE_NAME, "description": "Probe.",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "integer"}}}}}
PROBE_CALL = re.compile(r'"name":\s*"' + PROBE_NAME + r'",\s*"(arguments|parameters)":\s*'
                        r'\{\s*"probe_arg":\s*7\s*\}')
PROBE_V11 = re.compile(r"\[TOOL_CALLS\]\s*" + PROBE_NAME + r'\[ARGS\]\s*\{\s*"probe_arg":\s*7\s*\}')
"""Mistral v11's call: the name between ``[TOOL_CALLS]`` and ``[ARGS]``, then the arguments
(a template that puts a ``[CALL_ID]`` between them is not this format)."""
GRAMMAR_TOKENS = {"mistral_v11": ("[TOOL_CALLS]", "[ARGS]")}
"""Control tokens a format's grammar writes: the model's vocabulary must have each as one
token (the engine gives the grammar their ids; without them the format is ``fallback``)."""


@dataclass(frozen=True)
class Chat:
    """A conversation as ``/v1/chat/completions`` sends it to the model.

    Attributes:
        messages: OpenAI's messages: ``role`` and ``content``, an assistant's ``tool_calls``
            (``arguments`` as JSON text), a ``tool`` message's ``tool_call_id``.
        tools: OpenAI's tool objects shown to the model (none with ``tool_choice: none``).
        choice: ``auto``, ``required``, or the name of the one function to call.
    """

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] = field(default=())
    choice: str = "auto"

    @property
    def characters(self) -> int:
        """What the prompt bound counts: the contents, the ids, names and arguments of
        calls, and the tools (the number of messages has its own bound)."""
        total = sum(len(m["content"]) + len(m.get("tool_call_id", "")) for m in self.messages)
        total += sum(len(c["id"]) + len(c["function"]["name"]) + len(c["function"]["arguments"])
                     for m in self.messages for c in m.get("tool_calls", ()))
        return total + (len(json.dumps(list(self.tools), ensure_ascii=False))
                        if self.tools else 0)


# The wire form --------------------------------------------------------------------------


def chat_json(chat: Chat) -> str:
    """``text_input`` of a chat: the messages' JSON list, or with tools an object
    ``{"messages", "tools", "tool_choice"}`` (read back by :func:`parse_chat`)."""
    messages = list(chat.messages)
    if not chat.tools:
        return json.dumps(messages, ensure_ascii=False)
    return json.dumps({"messages": messages, "tools": list(chat.tools),
                       "tool_choice": chat.choice}, ensure_ascii=False)


def parse_chat(text: str, field_name: str = "text_input") -> Chat:
    """The conversation in ``text_input`` (prompt_format ``messages``), checked.

    Raises:
        RequestError: naming the message or part at fault.
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError(field_name, "with prompt_format messages must be JSON") from None
    tools: list[Any] = []
    choice: Any = "auto"
    if isinstance(value, dict):
        extra = sorted(set(value) - {"messages", "tools", "tool_choice"})
        if extra:
            raise RequestError(f"{field_name}.{extra[0][:60]}", "is not a recognised field")
        tools, choice = value.get("tools") or [], value.get("tool_choice", "auto")
        value = value.get("messages")
    if not isinstance(value, list) or not value:
        raise RequestError(field_name, "with prompt_format messages must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise RequestError(field_name, f"at most {MAX_MESSAGES} messages, got {len(value)}")
    messages = tuple(_message(item, index) for index, item in enumerate(value))
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise RequestError("tools", f"must be a list of at most {MAX_TOOLS} tools")
    names = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RequestError(f"tools[{index}]", "must be {\"type\": \"function\", "
                               "\"function\": {\"name\": ...}} with a name of 1 to 64 "
                               "letters, digits, underscores or dashes")
        names.append(name)
    if not isinstance(choice, str) or choice not in ("auto", "required", *names):
        raise RequestError("tool_choice", "must be auto, required or the name of a tool")
    return Chat(messages, tuple(tools), choice)


def _message(item: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    role = item.get("role") if isinstance(item, dict) else None
    content = item.get("content") if isinstance(item, dict) else None
    if role not in ROLES or not isinstance(content, str):
        raise RequestError(where, f"needs a role in {ROLES} and a string content")
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "tool":
        if not isinstance(item.get("tool_call_id"), str):
            raise RequestError(f"{where}.tool_call_id", "is required: the id of the call")
        message["tool_call_id"] = item["tool_call_id"]
    calls = item.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise RequestError(f"{where}.tool_calls", "must be a list of tool calls")
        message["tool_calls"] = [_call(call, f"{where}.tool_calls[{i}]")
                                 for i, call in enumerate(calls)]
    return message


def _call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name or not isinstance(arguments, str):
        raise RequestError(where, "must be {\"id\", \"type\": \"function\", \"function\": "
                           "{\"name\", \"arguments\": JSON text}}")
    call_id = call.get("id", "")
    if not isinstance(call_id, str):
        raise RequestError(f"{where}.id", "must be a string")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


# Detection and prompts -------------------------------------------------------------------


Render = Callable[..., str]
"""``apply_chat_template`` with ``tokenize=False``: messages, then keyword arguments."""


def detect_tool_format(render: Render) -> str:
    """Which of :data:`FORMATS` a chat template writes tool calls in.

    The template must show a probe tool's name when given it (and not without it), and
    write a probe call in a known format; anything else, a template error included, is
    ``fallback``.
    """
    ask = [{"role": "user", "content": "Hi"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "probe0001", "type": "function",
         "function": {"name": PROBE_NAME, "arguments": {"probe_arg": 7}}}]}
    try:
        plain = render(ask, add_generation_prompt=True)
        shown = render(ask, tools=[PROBE_TOOL], add_generation_prompt=True)
        called = render([*ask, call], tools=[PROBE_TOOL], add_generation_prompt=False)
    except Exception:  # any template failure means: not usable for tools
        return "fallback"
    if PROBE_NAME in plain or PROBE_NAME not in shown:
        return "fallback"
    if PROBE_V11.search(called):
        return "mistral_v11"
    found = PROBE_CALL.search(called)
    if found is None:
        return "fallback"
    before = called[:found.start()].rstrip()
    if found.group(1) == "parameters":
        return "llama3_json"
    if before.endswith(CALL_OPEN + "\n{") or before.endswith(CALL_OPEN + "{"):
        return "hermes"
    if "[TOOL_CALLS]" in before[-40:]:
        return "mistral"
    return "fallback"


def render_chat(render: Render, chat: Chat, tool_format: str) -> str:
    """The prompt of a chat: the template's own rendering with the tools where it has a
    tool format, else (``fallback``) the tools and calls written into plain turns.

    Raises:
        RequestError: on ``messages`` when the template refuses the conversation (Llama
            3.1's takes one call per assistant turn, for one).
    """
    try:
        if tool_format == "fallback":
            return render(fallback_turns(chat), add_generation_prompt=True)
        tools = list(chat.tools) or None
        return render(native_messages(chat.messages, tool_format), tools=tools,
                      add_generation_prompt=True)
    except jinja2.TemplateError as error:  # raise_exception() in a template raises one
        raise RequestError("messages", f"the model's chat template refuses them: "
                           f"{str(error)[:200]}") from None


def native_messages(messages: Sequence[dict[str, Any]], tool_format: str
                    ) -> list[dict[str, Any]]:
    """Messages as chat templates take them (transformers' convention): a call's
    ``arguments`` as an object; Mistral's ids as the 9 letters and digits its template
    demands (the same id maps to the same letters in a call and its result)."""
    rename = _mistral_id if tool_format == "mistral" else (lambda text: text)
    out = []
    for message in messages:
        copy = {"role": message["role"], "content": message["content"]}
        if "tool_call_id" in message:
            copy["tool_call_id"] = rename(message["tool_call_id"])
        if message.get("tool_calls"):
            copy["tool_calls"] = [
                {"id": rename(call["id"]), "type": "function",
                 "function": {"name": call["function"]["name"],
                              "arguments": _arguments(call["function"]["arguments"])}}
                for call in message["tool_calls"]]
        out.append(copy)
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, dict) else text


def _mistral_id(call_id: str) -> str:
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    return hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:9]


def fallback_turns(chat: Chat) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` turns: the tools described in the system turn, calls
    as ``<tool_call>`` blocks after the assistant's text, results as user turns holding a
    ``<tool_response>`` block (as Qwen2.5's template writes them)."""
    turns = []
    for message in chat.messages:
        content = message["content"]
        if message.get("tool_calls"):
            blocks = "\n".join(
                f"{CALL_OPEN}\n" + json.dumps(
                    {"name": c["function"]["name"],
                     "arguments": _arguments(c["function"]["arguments"])},
                    ensure_ascii=False) + f"\n{CALL_CLOSE}" for c in message["tool_calls"])
            content = f"{content}\n{blocks}" if content else blocks
        if message["role"] == "tool":
            turns.append({"role": "user", "content": f"<tool_response>\n{content}\n"
                                                     "</tool_response>"})
        else:
            turns.append({"role": message["role"], "content": content})
    text = system_text(chat)
    if not text:
        return turns
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def system_text(chat: Chat) -> str:
    """What the model is told about the tools in the fallback (Hermes / Qwen2.5's words)."""
    forced = chat.choice if chat.choice not in ("auto", "required") else None
    shown = [t for t in chat.tools if forced is None or t["function"]["name"] == forced]
    if not shown:
        return ""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in shown)
    text = ("# Tools\n\nYou may call one or more functions to assist with the user query."
            "\n\nYou are provided with function signatures within <tools></tools> XML "
            f"tags:\n<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if chat.choice == "auto":
        return text
    which = f"the function {forced}" if forced else "one of these functions"
    return f"{text}\n\nCall {which} now."


# The grammar of calls --------------------------------------------------------------------


def parse_constraint(value: object, tool_format: str = "hermes",
                     tokens: Mapping[str, int] | None = None) -> ResponseFormat | None:
    """A ``response_format`` as :func:`parse_response_format` reads it, and the gateway's
    ``{"type": "tool_calls", ...}`` (see :func:`tool_grammar`) in ``tool_format``."""
    return parse_response_format(value, lambda spec: tool_constraint(spec, tool_format, tokens))


def tool_constraint(spec: dict[str, Any], tool_format: str,
                    tokens: Mapping[str, int] | None = None) -> tuple[str, Trigger | None]:
    """The grammar of :func:`tool_grammar` and, under ``auto``, the format's trigger."""
    grammar = tool_grammar(spec, tool_format, tokens)
    return grammar, TRIGGERS[tool_format] if spec.get("mode", "auto") == "auto" else None


def tool_grammar(spec: dict[str, Any], tool_format: str,
                 tokens: Mapping[str, int] | None = None) -> str:
    """The llguidance grammar of an answer with calls in ``tool_format``.

    Args:
        spec: ``{"type": "tool_calls", "tools": [{"name", "parameters"}, ...], "mode":
            "auto" | "required", "parallel": bool}``: the functions the answer may call;
            ``auto``: the grammar of the answer from where a call begins (its trigger,
            :data:`TRIGGERS`): Hermes' from the token holding ``<tool_call>`` (a lazy
            lexeme reads the text up to it), the others' after the control token or from
            the token holding the first ``[`` / ``{`` (blanks before it allowed);
            ``parallel`` false allows one call (see the module's docstring for the other
            cases of one call).
        tool_format: one of :data:`FORMATS`.
        tokens: the ids of the format's :data:`GRAMMAR_TOKENS` in the model's vocabulary
            (``mistral_v11`` only).

    Raises:
        RequestError: naming the part of ``response_format`` at fault.
    """
    if tool_format not in FORMATS:
        raise ValueError(f"unknown tool format {tool_format!r}")
    extra = sorted(set(spec) - {"type", "tools", "mode", "parallel"})
    if extra:
        raise RequestError(f"{FIELD}.{extra[0][:60]}", "is not a recognised field")
    mode, parallel = spec.get("mode", "auto"), spec.get("parallel", True)
    if mode not in ("auto", "required"):
        raise RequestError(f"{FIELD}.mode", "must be auto or required")
    if not isinstance(parallel, bool):
        raise RequestError(f"{FIELD}.parallel", "must be a boolean")
    functions = _functions(spec.get("tools"))
    key = "parameters" if tool_format == "llama3_json" else "arguments"
    options = [{"type": "object", "properties": {"name": {"const": name}, key: parameters},
                "required": ["name", key], "additionalProperties": False}
               for name, parameters in functions]
    call = {**(options[0] if len(options) == 1 else {"anyOf": options}),
            "x-guidance": COMPILE_OPTIONS}
    single = not parallel or tool_format == "llama3_json" or (
        mode == "required" and tool_format == "fallback")
    most = 1 if single else MAX_PARALLEL_CALLS
    more = "" if most == 1 else f"({{sep}} call){{{{0,{most - 1}}}}}"
    if tool_format == "mistral_v11":
        return _v11_grammar(functions, mode, most, tokens or {})
    if tool_format == "mistral":
        lines = [f'calls: "[" call {more.format(sep=json.dumps(", "))} "]"',
                 f"call: %json {json.dumps(call)}"]
    elif tool_format == "llama3_json":
        lines = ["calls: call", f"call: %json {json.dumps(call)}"]
    else:
        lines = [f"calls: call {more.format(sep=json.dumps(chr(10)))}",
                 f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"',
                 f"body: %json {json.dumps(call)}"]
    if mode == "required":
        start = ["start: calls"]
    elif tool_format in ("mistral", "llama3_json"):
        start = ["start: calls | BLANKS calls", r"BLANKS: /[ \t\r\n]{1,8}/"]
    else:  # the call's first lines once <tool_call> is written, then the rest as above
        start = [f'start: head "\\n" body "\\n{CALL_CLOSE}" '
                 f"{more.format(sep=json.dumps(chr(10)))}",
                 f"head[lazy]: /(?s:.*){CALL_OPEN}/"]
    return _compiled("\n".join([*start, *lines]))


def _v11_grammar(functions: list[tuple[str, dict[str, Any]]], mode: str, most: int,
                 tokens: Mapping[str, int]) -> str:
    """``[TOOL_CALLS]name[ARGS]{...}``, up to ``most`` times; under ``auto`` from after the
    first ``[TOOL_CALLS]`` (the trigger's control token, which the grammar does not see)."""
    missing = [name for name in GRAMMAR_TOKENS["mistral_v11"] if name not in tokens]
    if missing:
        raise ValueError(f"mistral_v11 grammar needs the ids of {missing}")
    calls, args = (f"<[{tokens[name]}]>" for name in GRAMMAR_TOKENS["mistral_v11"])
    lines = ["call: " + " | ".join(f"fn{index}" for index in range(len(functions)))]
    for index, (name, parameters) in enumerate(functions):
        body = {**parameters, "x-guidance": COMPILE_OPTIONS}
        lines += [f"fn{index}: {json.dumps(name)} {args} args{index}",
                  f"args{index}: %json {json.dumps(body)}"]
    more = "" if most == 1 else f"({calls} call){{0,{most - 1}}}"
    start = f"start: {calls} call {more}" if mode == "required" else f"start: call {more}"
    return _compiled("\n".join([start, *lines]))


def _compiled(lark: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError, RecursionError) as error:
        raise RequestError(f"{FIELD}.tools", f"cannot be used: {str(error)[:300]}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        reason = " ".join((messages[0] if messages else "unknown error").split())[:300]
        raise RequestError(f"{FIELD}.tools", f"cannot be used: {reason}")
    return grammar


def _functions(tools: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise RequestError(f"{FIELD}.tools", f"must be a list of 1 to {MAX_TOOLS} functions")
    functions = []
    for index, tool in enumerate(tools):
        where = f"{FIELD}.tools[{index}]"
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_SCHEMA_NAME:
            raise RequestError(f"{where}.name", f"must be 1 to {MAX_SCHEMA_NAME} letters, "
                               "digits, underscores or dashes")
        if set(tool) - {"name", "parameters"}:
            raise RequestError(where, "must have only name and parameters")
        parameters = tool.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise RequestError(f"{where}.parameters", "must be a JSON Schema (an object)")
        compile_schema(parameters, f"{where}.parameters")
        functions.append((name, parameters))
    return functions
