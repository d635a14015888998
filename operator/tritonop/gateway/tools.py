"""Tool calls on ``/v1/chat/completions`` (pure: no I/O, no framework).

A request's ``tools`` and ``tool_choice`` are checked here (each function's ``parameters``
compiled by llguidance, as a ``response_format`` schema is) before the request takes an
admission place. The conversation goes to the model as it came: messages with their
``tool_calls`` and ``tool`` results, and the tools beside them; the model's chat template
renders them in its own format where it has one (Qwen/Hermes, Mistral v3, Llama 3.1), and
Hermes' ``<tool_call>`` text otherwise (:mod:`tritonop_backend.llm.chat_tools`, which also
builds the grammar of calls in that format).

- ``tool_choice: "required"``: a grammar allows only calls (up to 8; one when
  ``parallel_tool_calls`` is false, and see :mod:`tritonop_backend.llm.chat_tools` for the
  formats that take one), each of a known function with arguments that follow its schema;
  the answer carries them as ``tool_calls``. A named function: one call of it.
- ``"auto"``: free text until a call begins (its format's marker), the grammar of calls
  from there (unless the request has its own ``response_format``, which then shapes the
  output instead).
- ``"none"``: the tools are not shown; the model answers with text.

Answers are read in every format the grammar writes (:func:`parse_calls`): ``<tool_call>``
blocks, Mistral v11's ``[TOOL_CALLS]name[ARGS]{...}`` calls one after another (both control
tokens kept in the text), Mistral v3's ``[TOOL_CALLS] [...]`` list (the marker is a control
token: absent from the text under ``required``, kept there under ``auto``, where it marks the
call's start after text, as Llama's ``<|python_tag|>`` does), and bare ``{"name", "arguments" |
"parameters"}`` objects, one or a list; calls of unknown functions, or with arguments that
are not an object, make the whole answer text. The streamed forms (:class:`CallStream`,
:class:`AutoStream`) turn text pieces into OpenAI's deltas: per call, first a delta with its
index, id, type, name and ``arguments: ""``, then fragments of the arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tritonop.gateway.errors import invalid
from tritonop_backend.errors import RequestError
from tritonop_backend.llm.chat_tools import Chat
from tritonop_backend.llm.grammar import compile_schema

MAX_TOOLS = 64
MAX_TOOLS_BYTES = 32 * 1024
"""The ``tools`` list's JSON at most: every function's schema is compiled, and the call
grammar of them all is compiled again in the model."""
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
FUNCTION_KEYS = ("name", "description", "parameters", "strict")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
"""A function without `parameters` takes none (OpenAI: "an empty parameter list")."""
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (CALL_OPEN, MISTRAL_CALLS, PYTHON_TAG)
ARGS_MARK = "[ARGS]"
V11_START = re.compile(r"\[TOOL_CALLS\]([a-zA-Z0-9_-]{1,64})\[ARGS\]")
"""How Mistral v11 (Small 3.2, Magistral, Devstral) begins a call: ``[TOOL_CALLS]name[ARGS]``,
the arguments object after it."""
CALL_START = re.compile(r'\{"name": "([a-zA-Z0-9_-]{1,64})", "(?:arguments|parameters)": |'
                        + V11_START.pattern)
"""How the grammar begins a call: an object (compact JSON, the name first), or Mistral v11's
name between control tokens."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any] | bool


@dataclass(frozen=True)
class ToolUse:
    """A request's validated tools and choice.

    Attributes:
        functions: the tools, in the request's order.
        choice: ``none``, ``auto``, ``required`` or ``function`` (one named function).
        forced: the function's name when ``choice`` is ``function``.
        parallel: ``parallel_tool_calls``: whether an answer may make more than one call.
    """

    functions: tuple[Function, ...]
    choice: str
    forced: str | None = None
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        """The output must be a call: a grammar makes it one."""
        return self.choice in ("required", "function")

    @property
    def names(self) -> tuple[str, ...]:
        """Functions the answer may call."""
        if self.forced is not None:
            return (self.forced,)
        return () if self.choice == "none" else tuple(f.name for f in self.functions)

    def response_format(self) -> dict[str, Any]:
        """The ``response_format`` whose grammar shapes the output, in the model's call
        format (:func:`tritonop_backend.llm.chat_tools.tool_grammar`): calls only
        (``required``, a named function), or calls from where one begins (``auto``)."""
        return {"type": "tool_calls",
                "tools": [{"name": f.name, "parameters": f.parameters}
                          for f in self.functions if f.name in self.names],
                "mode": "required" if self.constrained else "auto",
                "parallel": self.parallel and self.forced is None}

    def shown(self) -> tuple[dict[str, Any], ...]:
        """The tools as the model's template is given them (none with ``none``)."""
        if self.choice == "none":
            return ()
        return tuple({"type": "function", "function": _function_json(f)}
                     for f in self.functions)


def _function_json(function: Function) -> dict[str, Any]:
    body: dict[str, Any] = {"name": function.name}
    if function.description is not None:
        body["description"] = function.description
    body["parameters"] = function.parameters
    return body


def parse_tools(tools: Any, choice: Any, parallel: Any) -> ToolUse | None:
    """Check ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

    Returns:
        None when no tool may be called (no tools, or ``tool_choice: "none"`` without
        tools), else the tools and choice.

    Raises:
        APIError: 400 naming the field at fault.
    """
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "must be a boolean")
    functions = _functions(tools)
    names = [f.name for f in functions]
    if choice is None:
        choice = "auto" if functions else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid("tool_choice", 'must be none, auto, required or {"type": '
                          f'"function", "function": {{"name": ...}}}}, got {choice[:60]!r}')
        if choice == "required" and not functions:
            raise invalid("tool_choice", "required needs tools")
        return ToolUse(functions, choice, None, parallel is not False) if functions else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or set(choice) - {
            "type", "function"}:
        raise invalid("tool_choice", 'must be none, auto, required or {"type": "function", '
                      '"function": {"name": ...}}')
    named = choice.get("function")
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(named, dict) or set(named) - {"name"} or not isinstance(name, str):
        raise invalid("tool_choice.function", "must be an object with the function's name")
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise invalid("tool_choice.function.name", f"{name[:64]!r} is not one of the tools "
                      f"(tools: {known})")
    return ToolUse(functions, "function", name, parallel is not False)


def _functions(tools: Any) -> tuple[Function, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise invalid("tools", "must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    size = len(json.dumps(tools, ensure_ascii=False).encode("utf-8"))
    if size > MAX_TOOLS_BYTES:
        raise invalid("tools", f"is {size} bytes of JSON; at most {MAX_TOOLS_BYTES} are allowed")
    functions: list[Function] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise invalid(where, "must be an object with type and function")
        if tool.get("type") != "function":
            raise invalid(f"{where}.type", "must be function")
        extra = sorted(set(tool) - {"type", "function"})
        if extra:
            raise invalid(f"{where}.{extra[0][:60]}", "is not a recognised field")
        function = _function(tool.get("function"), f"{where}.function")
        if any(function.name == f.name for f in functions):
            raise invalid(f"{where}.function.name", f"{function.name!r} names two tools")
        functions.append(function)
    return tuple(functions)


def _function(value: Any, where: str) -> Function:
    if not isinstance(value, dict):
        raise invalid(where, "must be an object with a name")
    extra = sorted(set(value) - set(FUNCTION_KEYS))
    if extra:
        raise invalid(f"{where}.{extra[0][:60]}", "is not a recognised field")
    name = value.get("name")
    if name is None:
        raise invalid(f"{where}.name", "is required")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise invalid(f"{where}.name", "must be 1 to 64 letters, digits, underscores or dashes")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}.description", "must be a string")
    if value.get("strict") is not None and not isinstance(value.get("strict"), bool):
        raise invalid(f"{where}.strict", "must be a boolean")
    parameters = value.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict):
        raise invalid(f"{where}.parameters", "must be a JSON Schema (an object)")
    try:  # the same compilation the model runs, so a schema it cannot use is a 400 here
        compile_schema(parameters, f"{where}.parameters")
    except RequestError as err:
        raise invalid(err.field, err.problem) from None
    return Function(name, description, parameters)


# Messages --------------------------------------------------------------------------------


def assistant_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked, as the model's template takes them."""
    if not isinstance(calls, list):
        raise invalid(where, "must be a list of tool calls")
    checked = []
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise invalid(at, "must be an object with id, type function and function")
        if call.get("type", "function") != "function":
            raise invalid(f"{at}.type", "must be function")
        if not isinstance(call.get("id", ""), str):
            raise invalid(f"{at}.id", "must be a string")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise invalid(f"{at}.function.name", "must be a non-empty string")
        if not isinstance(arguments, str):
            raise invalid(f"{at}.function.arguments", "must be a string (JSON text)")
        checked.append({"id": call.get("id", ""), "type": "function",
                        "function": {"name": name, "arguments": arguments}})
    return checked


def chat_input(turns: list[dict[str, Any]], tools: ToolUse | None) -> Chat:
    """The conversation the model is sent: the turns, and the tools it is shown."""
    if tools is None or not tools.shown():
        return Chat(tuple(turns))
    choice = tools.forced or tools.choice
    return Chat(tuple(turns), tools.shown(), choice)


# Answers ---------------------------------------------------------------------------------


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(index: int | None, name: str, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {"id": call_id(), "type": "function",
                            "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _prefix(name: str, key: str = "arguments") -> str:
    return f'{{"name": {json.dumps(name)}, "{key}": '


def split_call(text: str, names: Sequence[str]) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a call object, ``{"name", "arguments"}`` (or Llama's
    ``"parameters"``), written as the grammar writes one or as JSON otherwise; None when
    ``text`` is not a call of one of ``names``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or len(value) != 2 or "name" not in value:
        return None
    key = "arguments" if "arguments" in value else "parameters"
    name, arguments = value["name"], value.get(key)
    if name not in names or not isinstance(arguments, dict):
        return None
    stripped = text.strip()
    prefix = _prefix(name, key)
    if stripped.startswith(prefix) and stripped.endswith("}"):
        raw = stripped[len(prefix):-1]
        try:
            if json.loads(raw) == arguments:
                return name, raw  # as written, so that streamed fragments join into it
        except ValueError:
            pass
    return name, json.dumps(arguments, ensure_ascii=False)


def parse_calls(text: str, names: Sequence[str]) -> list[tuple[str, str]] | None:
    """The calls an answer is made of, in any format the grammar writes; None unless the
    whole text is calls of ``names``."""
    rest = text.strip()
    if rest.startswith(MISTRAL_CALLS) and ARGS_MARK in rest:
        return _v11_calls(rest, names)
    for marker in (MISTRAL_CALLS, PYTHON_TAG):
        if rest.startswith(marker):
            rest = rest[len(marker):].strip()
    bodies = _tagged(rest) if rest.startswith(CALL_OPEN) else _json_calls(rest)
    if not bodies:
        return None
    calls = [split_call(body, names) for body in bodies]
    if any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def parse_auto(text: str, names: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The content and calls of an answer: text, then (from a marker, or from its start
    when it begins as JSON) calls; when what follows is not all calls, the whole is text."""
    start = min((i for i in (text.find(m) for m in MARKERS) if i >= 0), default=-1)
    if start < 0 and text.strip()[:1] in ("{", "["):
        start = 0
    if start < 0:
        return text, []
    calls = parse_calls(text[start:], names)
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _v11_calls(text: str, names: Sequence[str]) -> list[tuple[str, str]] | None:
    """Mistral v11's ``[TOOL_CALLS]name[ARGS]{...}`` calls, one after another (blanks
    between them); the arguments as written. None when anything else is there."""
    decoder = json.JSONDecoder()
    calls, at = [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if at >= len(text):
            return calls or None
        found = V11_START.match(text, at)
        if found is None or found.group(1) not in names:
            return None
        start = found.end()
        try:
            value, at = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict):
            return None
        calls.append((found.group(1), text[start:at]))


def _json_calls(text: str) -> list[str] | None:
    """Call objects of JSON values one after another (separated by whitespace, ``,`` or
    ``;``), each an object or a list of objects; None when anything else is there."""
    decoder = json.JSONDecoder()
    bodies, at = [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,;":
            at += 1
        if at >= len(text):
            return bodies
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        for item in value if isinstance(value, list) else [value]:
            bodies.append(json.dumps(item, ensure_ascii=False))


def _tagged(text: str) -> list[str] | None:
    """Bodies of ``<tool_call>...</tool_call>`` blocks (the last may lack its end tag);
    None when anything but whitespace lies between them."""
    bodies = []
    rest = text
    while rest.strip():
        rest = rest.strip()
        if not rest.startswith(CALL_OPEN):
            return None
        rest = rest[len(CALL_OPEN):]
        end = rest.find(CALL_CLOSE)
        body, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(CALL_CLOSE):])
        bodies.append(body.strip())
    return bodies


class CallStream:
    """Streamed deltas of a constrained answer: calls, each announced by name, then its
    arguments as they come.

    The grammar writes each call as ``{"name": "<name>", "arguments": {...}}`` (``parameters``
    for Llama), inside whatever the format puts around calls, or as Mistral v11's
    ``[TOOL_CALLS]<name>[ARGS]{...}``; each call's arguments object
    is followed character by character (strings and escapes included) to its closing brace.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.text = ""
        self.index = -1
        self.start: int | None = None  # where the current call's arguments begin
        self.scan = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.sent = 0

    def push(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        deltas: list[dict[str, Any]] = []
        while True:
            if self.start is None:
                found = CALL_START.search(self.text, self.scan)
                name = found.group(1) or found.group(2) if found is not None else None
                if found is None or name not in self.names:
                    return deltas
                self.index += 1
                deltas.append({"tool_calls": [tool_call(self.index, name, "")]})
                self.start = self.scan = self.sent = found.end()
                self.depth = 0
            end = self._close()
            deltas += self._arguments(end if end is not None else len(self.text))
            if end is None:
                return deltas
            self.start, self.scan = None, end

    def _close(self) -> int | None:
        """Where the current arguments object ends (past its brace), once it has ended."""
        for at in range(self.scan, len(self.text)):
            char = self.text[at]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.scan = at + 1
                    return at + 1
        self.scan = len(self.text)
        return None

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """Deltas still due, and whether the answer was whole calls."""
        if self.index < 0:
            return ([{"content": self.text}] if self.text else []), False
        calls = parse_calls(self.text, self.names)
        return [], calls is not None and len(calls) == self.index + 1 and self.start is None

    def _arguments(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        fragment = self.text[self.sent:end]
        self.sent = end
        return [{"tool_calls": [{"index": self.index, "function": {"arguments": fragment}}]}]


class AutoStream:
    """Streamed deltas of a free answer: text is sent as it comes until a call may begin
    (a marker, or a first character ``{`` or ``[``); from there it is held, and parsed when
    the answer ends: calls are sent whole, anything else as the content it is."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.text = ""
        self.sent = 0
        self.holding = False

    def push(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        if self.holding:
            return []
        if self.sent == 0 and self.text.lstrip()[:1] in ("{", "["):
            self.holding = True
            return []
        found = [i for i in (self.text.find(m, self.sent) for m in MARKERS) if i >= 0]
        if found:
            self.holding = True
            return self._content(min(found))
        keep = max((size for marker in MARKERS for size in range(1, len(marker))
                    if self.text.endswith(marker[:size])), default=0)
        return self._content(len(self.text) - keep)

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """Deltas still due, and whether the answer carried calls."""
        _, calls = parse_auto(self.text, self.names)
        if not calls:
            return self._content(len(self.text)), False
        deltas = [{"tool_calls": [tool_call(index, name, arguments)]}
                   for index, (name, arguments) in enumerate(calls)]
        return deltas, True

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        piece = self.text[self.sent:end]
        self.sent = end
        return [{"content": piece}]
