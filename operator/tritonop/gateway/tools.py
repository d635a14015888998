"""Tool calls on ``/v1/chat/completions`` (pure: no I/O, no framework).

A request's ``tools`` and ``tool_choice`` are checked here (each function's ``parameters``
compiled by llguidance, as a ``response_format`` schema is) before the request takes an
admission place. The tools reach the model as text in the Hermes / Qwen2.5 format, in the
system message (the same text Qwen2.5's chat template writes); earlier calls and their
results in the conversation become ``<tool_call>`` and ``<tool_response>`` blocks, so any
chat template renders them.

- ``tool_choice: "required"`` or a named function: the output is constrained by a JSON
  Schema grammar to one call, ``{"name": ..., "arguments": {...}}`` whose arguments follow
  that function's schema; the answer carries it as ``tool_calls``.
- ``"auto"``: a grammar lets the model write either text without ``<tool_call>`` or
  ``<tool_call>\n{...}\n</tool_call>`` blocks (Hermes, Qwen), each a call of a known function
  whose arguments follow its schema (unless the request has its own ``response_format``,
  which then shapes the output instead). Calls are parsed from the text, as are Mistral's
  ``[TOOL_CALLS][...]`` and a bare call object, when they name a known function with object
  arguments; anything else is content.
- ``"none"``: the tools are not shown; the model answers with text.

The streamed forms (:class:`CallStream`, :class:`AutoStream`) turn text pieces into
OpenAI's deltas: first a delta with the call's index, id, type, name and ``arguments: ""``,
then fragments of the arguments.
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
from tritonop_backend.llm.grammar import compile_schema, tool_call_schema

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
MARKERS = (CALL_OPEN, MISTRAL_CALLS)


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
    """

    functions: tuple[Function, ...]
    choice: str
    forced: str | None = None

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
        """The ``response_format`` whose grammar shapes the output: one call (``required``,
        a named function), or text or ``<tool_call>`` blocks (``auto``; see
        :func:`tritonop_backend.llm.grammar.parse_response_format`)."""
        callable_ = [(f.name, f.parameters) for f in self.functions if f.name in self.names]
        if not self.constrained:
            return {"type": "tool_calls", "tools": [
                {"name": name, "parameters": parameters} for name, parameters in callable_]}
        return {"type": "json_schema", "json_schema": {
            "name": "tool_call", "schema": tool_call_schema(callable_), "strict": True}}

    def system_text(self) -> str:
        """What the model is told about the tools (Hermes / Qwen2.5's words), or ""."""
        if not self.names:
            return ""
        listed = "\n".join(json.dumps({"type": "function", "function": _function_json(f)},
                                      ensure_ascii=False)
                           for f in self.functions if f.name in self.names)
        text = ("# Tools\n\nYou may call one or more functions to assist with the user query."
                "\n\nYou are provided with function signatures within <tools></tools> XML "
                f"tags:\n<tools>\n{listed}\n</tools>\n\n")
        if self.constrained:
            which = f"the function {self.forced}" if self.forced else "one of these functions"
            return text + (f"Call {which} now: answer with one JSON object "
                           '{"name": <function-name>, "arguments": <args-json-object>} '
                           "and nothing else.")
        return text + ("For each function call, return a json object with function name and "
                       "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                       '{"name": <function-name>, "arguments": <args-json-object>}\n'
                       "</tool_call>")


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
        return ToolUse(functions, choice) if functions else None
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
    return ToolUse(functions, "function", name)


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


def assistant_calls(calls: Any, where: str) -> str:
    """An assistant message's ``tool_calls`` as the ``<tool_call>`` blocks the model wrote."""
    if not isinstance(calls, list):
        raise invalid(where, "must be a list of tool calls")
    blocks = []
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
        try:
            parsed: Any = json.loads(arguments)
        except ValueError:
            parsed = arguments  # shown as the client sent it
        blocks.append(f"{CALL_OPEN}\n"
                      f"{json.dumps({'name': name, 'arguments': parsed}, ensure_ascii=False)}"
                      f"\n{CALL_CLOSE}")
    return "\n".join(blocks)


def tool_result(content: str) -> str:
    """A ``tool`` message's content as the user turn Qwen2.5's template makes of it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def with_tools(turns: list[dict[str, str]], tools: ToolUse | None) -> list[dict[str, str]]:
    """The turns with the tools' description in the system message (one is added first)."""
    text = "" if tools is None else tools.system_text()
    if not text:
        return turns
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


# Answers ---------------------------------------------------------------------------------


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(index: int | None, name: str, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {"id": call_id(), "type": "function",
                            "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _prefix(name: str) -> str:
    return f'{{"name": {json.dumps(name)}, "arguments": '


def split_call(text: str, names: Sequence[str]) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a call object written as the grammar writes one, or
    as JSON otherwise; None when ``text`` is not a call of one of ``names``."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    name, arguments = value["name"], value["arguments"]
    if name not in names or not isinstance(arguments, dict):
        return None
    stripped = text.strip()
    prefix = _prefix(name)
    if stripped.startswith(prefix) and stripped.endswith("}"):
        raw = stripped[len(prefix):-1]
        try:
            if json.loads(raw) == arguments:
                return name, raw  # as written, so that streamed fragments join into it
        except ValueError:
            pass
    return name, json.dumps(arguments, ensure_ascii=False)


def parse_auto(text: str, names: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The content and calls of a free answer: ``<tool_call>`` blocks, Mistral's
    ``[TOOL_CALLS]`` list, or a bare call object (or list of them). Calls of unknown
    functions, or with arguments that are not an object, make the whole answer text."""
    start = min((i for i in (text.find(m) for m in MARKERS) if i >= 0), default=-1)
    stripped = text.strip()
    if start < 0 and stripped[:1] in ("{", "["):
        start, bodies = 0, _json_calls(stripped)
    elif start < 0:
        return text, []
    elif text.startswith(MISTRAL_CALLS, start):
        bodies = _json_calls(text[start + len(MISTRAL_CALLS):].strip())
    else:
        bodies = _tagged(text[start:])
    calls = [split_call(body, names) for body in bodies or []]
    if not calls or any(call is None for call in calls):
        return text, []
    content = text[:start].strip()
    return content or None, [call for call in calls if call is not None]


def _json_calls(text: str) -> list[str] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    return [json.dumps(item, ensure_ascii=False) for item in items]


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
    """Streamed deltas of a constrained answer: one call, name first, then its arguments.

    The grammar writes ``{"name": "<name>", "arguments": <arguments>}``; the arguments are
    sent as they come, all but the last character, which may be the call's closing brace.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.text = ""
        self.name: str | None = None
        self.sent = 0

    def push(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        deltas = []
        if self.name is None:
            for name in self.names:
                if self.text.startswith(_prefix(name)):
                    self.name = name
                    deltas.append({"tool_calls": [tool_call(0, name, "")]})
                    break
        if self.name is not None:
            arguments = self.text[len(_prefix(self.name)):]
            deltas += self._arguments(arguments[:-1])
        return deltas

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """Deltas still due, and whether the answer was a whole call."""
        call = split_call(self.text, self.names)
        if self.name is None:
            return ([{"content": self.text}] if self.text else []), False
        arguments = self.text[len(_prefix(self.name)):]
        if call is not None:
            arguments = call[1]
        return self._arguments(arguments), call is not None

    def _arguments(self, arguments: str) -> list[dict[str, Any]]:
        if len(arguments) <= self.sent:
            return []
        fragment = arguments[self.sent:]
        self.sent = len(arguments)
        return [{"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}]


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
