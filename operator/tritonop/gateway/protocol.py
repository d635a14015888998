"""Validating OpenAI request bodies into what Triton needs (pure: no I/O, no framework).

Everything a client can get wrong is caught here, before a request takes an admission
place or reaches Triton, and answered with a 400 naming the field. Range checks mirror
the LLM model's own (``tritonop_backend.llm.params``), so that Triton never has to refuse
a request the gateway let through.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tritonop.gateway.config import ModelEntry
from tritonop.gateway.errors import APIError, invalid
from tritonop.gateway.tools import ToolUse, assistant_calls, chat_input, parse_tools
from tritonop_backend.errors import RequestError
from tritonop_backend.filters import canonical_text
from tritonop_backend.llm.chat_tools import MAX_MESSAGES, chat_json, parse_constraint

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARACTERS = 256
"""Characters in all stop strings together, as the LLM model bounds them
(``tritonop_backend.llm.params``): each token's check scans for every stop string."""
MAX_SEED = 2**64 - 1
JSON_TYPE = "application/json"
ROLES = ("system", "user", "assistant", "tool")
MAX_LOGPROBS = 20
"""Most likely tokens an answer may list per token, as the LLM model bounds them
(``tritonop_backend.llm.params``) and OpenAI bounds ``top_logprobs``."""

# Fields that OpenAI clients send and that change nothing here when left at their neutral
# value; any other value is refused rather than silently ignored.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "user": lambda v: v is None or isinstance(v, str),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "top_logprobs": lambda v: v in (None, 0),  # /v1/completions: its logprobs is the count
    "logit_bias": lambda v: v is None or v == {},
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v is None,
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "service_tier": lambda v: v is None or isinstance(v, str),
    "store": lambda v: v in (None, False),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "dimensions": lambda v: v is None,
}


@dataclass(frozen=True)
class GenerationArgs:
    """A validated chat or text completion, as inputs of the LLM model.

    Attributes:
        prompt: the text input: the messages' JSON for chat, the prompt for completions.
        prompt_format: ``messages`` (the model templates them) or ``raw``.
        sampling: optional model inputs by name; absent ones take the resource's defaults.
        stop: stop strings.
        stream: answer with server-sent events.
        include_usage: a last streamed chunk carries ``usage``.
        response_format: the ``response_format`` object as JSON text when it constrains the
            output (``json_object``, ``json_schema``); None for plain text.
        logprobs: None for no log probabilities, else how many most likely tokens each
            token's entry lists (chat's ``top_logprobs``, completions' ``logprobs``).
        n: choices to generate, each a Triton request of its own.
        tools: the tools the answer may call, or None (:mod:`tritonop.gateway.tools`).
    """

    model: str
    prompt: str
    prompt_format: str
    sampling: dict[str, int | float]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    response_format: str | None = None
    logprobs: int | None = None
    n: int = 1
    tools: ToolUse | None = field(default=None, compare=False)

    def choice(self, index: int) -> GenerationArgs:
        """The Triton request of choice ``index``: seed + index when a seed is given, so that
        n choices equal n requests with seeds s, s+1, ..."""
        seed = self.sampling.get("seed")
        if seed is None or index == 0:
            return self
        sampling = {**self.sampling, "seed": (int(seed) + index) % (MAX_SEED + 1)}
        return dataclasses.replace(self, sampling=sampling)


@dataclass(frozen=True)
class EmbeddingArgs:
    model: str
    texts: list[str]
    base64: bool


@dataclass(frozen=True)
class SearchArgs:
    """A validated search; ``filter`` is the checked filter as compact JSON text, or None;
    ``rerank``: re-score the search's candidates with the model's cross-encoder."""

    model: str
    text: str
    num_results: int
    filter: str | None = None
    rerank: bool = False


def check_content_type(value: str | None) -> None:
    """Refuse a body that is not declared JSON.

    A web page can send a form or ``text/plain`` POST to any address its visitor reaches
    without asking first (no CORS preflight); a JSON content type it cannot send that way.
    So an internal gateway only answers bodies declared JSON.

    Raises:
        APIError: 415 naming Content-Type.
    """
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != JSON_TYPE:
        shown = _short(value) if value else "missing"
        raise APIError(415, f"Content-Type: must be {JSON_TYPE}, got {shown}",
                       param="Content-Type", code="unsupported_media_type")


def check_length(value: str | None) -> None:
    """Refuse a declared ``Content-Length`` above :data:`MAX_BODY_BYTES` before reading.

    Raises:
        APIError: 413 for a length above the limit, 400 for one that is not a number.
    """
    if value is None:
        return
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise invalid("Content-Length", f"must be a number of bytes, got {_short(value)}")
    if int(value) > MAX_BODY_BYTES:
        raise too_large(int(value))


def too_large(size: int) -> APIError:
    """413 for a body of ``size`` bytes (or more: one read while it arrives)."""
    return APIError(413, f"body: {size} bytes is above the limit of {MAX_BODY_BYTES}",
                    param="body", code="body_too_large")


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; strict about encoding, NaN and nesting.

    Raises:
        APIError: 413 for a body over :data:`MAX_BODY_BYTES`, 400 for anything not a
            UTF-8 JSON object.
    """
    if len(body) > MAX_BODY_BYTES:
        raise too_large(len(body))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid("body", f"is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except APIError:
        raise
    except (ValueError, RecursionError) as err:
        raise invalid("body", f"is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise invalid("body", f"must be a JSON object, got {_kind(value)}")
    _check_tree(value)
    return value


MAX_NESTING = 64
"""Levels of objects and lists a body may nest: deeper ones are refused before any field is
read (later steps that write a field out again, a schema or tools, recurse)."""


def _check_tree(body: dict[str, Any]) -> None:
    """Refuse nesting beyond :data:`MAX_NESTING` and unpaired surrogates (which JSON's
    ``\\ud800`` escapes can carry but UTF-8 cannot), naming the field; without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _encodable(value, path)
        elif isinstance(value, (dict, list)):
            if len(path) >= MAX_NESTING:
                raise invalid(_path_name(path), f"nests deeper than {MAX_NESTING} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                if isinstance(key, str):
                    _encodable(key, path)
                stack.append((child, (*path, key)))


def _encodable(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(_path_name(path), "contains an unpaired surrogate (not valid Unicode)"
                      ) from None


def _path_name(path: tuple[str | int, ...]) -> str:
    """``("messages", 0, "content")`` as ``messages[0].content``; the body itself as body."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "body"


def _no_constant(name: str) -> Any:
    raise invalid("body", f"{name} is not a JSON number")


class Fields:
    """A request body whose fields are taken one by one; leftovers are refused by name."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = dict(body)
        self.taken: set[str] = set()

    def get(self, name: str) -> Any:
        self.taken.add(name)
        value = self.body.get(name)
        return value

    def finish(self) -> None:
        """Refuse unknown fields, and known ones set to values this server cannot honour."""
        for name in sorted(self.body):
            if name in self.taken:
                continue
            if name not in NEUTRAL:
                raise invalid(name, "is not a recognised field")
            if not NEUTRAL[name](self.body[name]):
                raise invalid(name, f"is not supported with the value {_short(self.body[name])}")


def model_name(fields: Fields, models: Mapping[str, ModelEntry], kind: str,
               route: str) -> ModelEntry:
    """The entry of the model the body names; 404 when there is no such model."""
    name = fields.get("model")
    if name is None:
        raise invalid("model", "is required")
    name = text(name, "model")
    entry = models.get(name)
    if entry is None:
        raise APIError(404, f"model: '{_short(name)}' does not exist; GET /v1/models lists "
                       "the models", param="model", code="model_not_found")
    if entry.kind != kind:
        raise invalid("model", f"'{name}' is not a {kind} model, it does not serve {route}")
    return entry


def parse_chat(body: Mapping[str, Any], models: Mapping[str, ModelEntry]) -> GenerationArgs:
    """A ``/v1/chat/completions`` body."""
    fields = Fields(body)
    entry = model_name(fields, models, "chat", "/v1/chat/completions")
    messages = fields.get("messages")
    if messages is None:
        raise invalid("messages", "is required")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise invalid("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    turns = [_message(item, index) for index, item in enumerate(messages)]
    tools = parse_tools(fields.get("tools"), fields.get("tool_choice"),
                        fields.get("parallel_tool_calls"))
    chat = chat_input(turns, tools)
    characters(chat.characters, "messages", entry,
               "all message contents together" + (", tools included" if tools else ""))
    prompt = chat_json(chat)
    args = _generation(fields, entry, prompt, "messages", "max_completion_tokens",
                       _chat_logprobs(fields), tools)
    fields.finish()
    return args


def parse_completion(body: Mapping[str, Any],
                     models: Mapping[str, ModelEntry]) -> GenerationArgs:
    """A ``/v1/completions`` body: one prompt, tokenized as it is."""
    fields = Fields(body)
    entry = model_name(fields, models, "chat", "/v1/completions")
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, list):
        raise invalid("prompt", "must be one string (lists of prompts or of token ids are "
                      "not supported)")
    prompt = text(prompt, "prompt")
    characters(len(prompt), "prompt", entry)
    if not prompt.strip():
        raise invalid("prompt", "must not be empty")
    count = fields.get("logprobs")
    logprobs = None if count is None else integer(count, "logprobs", 0, MAX_LOGPROBS)
    args = _generation(fields, entry, prompt, "raw", None, logprobs)
    fields.finish()
    return args


def _chat_logprobs(fields: Fields) -> int | None:
    """Chat's ``logprobs`` (a boolean) and ``top_logprobs`` (0 to 20, only with it)."""
    wanted, top = fields.get("logprobs"), fields.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise invalid("logprobs", f"must be a boolean, got {_kind(wanted)}")
    if top is not None:
        count = integer(top, "top_logprobs", 0, MAX_LOGPROBS)
        if not wanted:
            raise invalid("top_logprobs", "needs logprobs: true")
        return count
    return 0 if wanted else None


def _message(item: Any, index: int) -> dict[str, Any]:
    """One turn as the model's template takes it, with an assistant's ``tool_calls`` and a
    ``tool`` result's ``tool_call_id`` (:mod:`tritonop.gateway.tools`)."""
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise invalid(where, f"must be an object with role and content, got {_kind(item)}")
    role = item.get("role")
    if role == "developer":
        role = "system"
    if role not in ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, got "
                      f"{_short(role)}")
    allowed = {"assistant": ("tool_calls", "refusal"), "tool": ("tool_call_id",)}.get(role, ())
    for key in item:
        if key not in ("role", "content", "name", *allowed):
            raise invalid(f"{where}.{_short(key)}", "is not supported")
    content = item.get("content")
    calls = item.get("tool_calls")
    if content is None and role == "assistant" and calls:
        content = ""
    if isinstance(content, list):
        content = _text_parts(content, f"{where}.content")
    content = text(content, f"{where}.content")
    turn: dict[str, Any] = {"role": role, "content": content}
    if calls:
        turn["tool_calls"] = assistant_calls(calls, f"{where}.tool_calls")
    if role == "tool":
        if not isinstance(item.get("tool_call_id"), str):
            raise invalid(f"{where}.tool_call_id", "is required: the id of the call answered")
        turn["tool_call_id"] = item["tool_call_id"]
    return turn


def _text_parts(parts: list[Any], where: str) -> str:
    """Content given as a list of ``{"type": "text", "text": ...}`` parts, joined."""
    pieces = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise invalid(f"{where}[{index}]", "only text parts are supported")
        pieces.append(text(part.get("text"), f"{where}[{index}].text"))
    return "".join(pieces)


def _generation(fields: Fields, entry: ModelEntry, prompt: str, prompt_format: str,
                alias: str | None, logprobs: int | None = None,
                tools: ToolUse | None = None) -> GenerationArgs:
    sampling: dict[str, int | float] = {}
    max_tokens = fields.get("max_tokens")
    if alias is not None:
        other = fields.get(alias)
        if max_tokens is not None and other is not None and other != max_tokens:
            raise invalid(alias, "differs from max_tokens; send one of them")
        max_tokens = other if other is not None else max_tokens
    name = alias if alias and fields.body.get(alias) is not None else "max_tokens"
    if max_tokens is not None:
        sampling["max_tokens"] = integer(max_tokens, name, 1, entry.max_tokens_limit)
    checks: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "temperature": (number, (0.0, 2.0, True)),
        "top_p": (number, (0.0, 1.0, False)),
        "top_k": (integer, (0, 1_000_000)),
        "repetition_penalty": (number, (0.0, 100.0, False)),
        "repeat_last_n": (integer, (0, 1_000_000)),
        "seed": (integer, (0, MAX_SEED)),
    }
    for key, (check, bounds) in checks.items():
        value = fields.get(key)
        if value is not None:
            sampling[key] = check(value, key, *bounds)
    n = fields.get("n")
    n = 1 if n is None else integer(n, "n", 1, entry.max_choices)
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", f"must be a boolean, got {_kind(stream)}")
    stream = bool(stream)
    if stream and not entry.streaming:
        raise invalid("stream", f"streaming is turned off for model '{entry.name}'")
    options = fields.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", "must be an object with include_usage only")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid("stream_options.include_usage", "must be a boolean")
    response_format = _response_format(fields.get("response_format"))
    if tools is not None and tools.constrained and response_format is not None:
        raise invalid("response_format", "cannot be combined with a tool_choice that "
                      "demands a call (required or a named function)")
    if tools is not None and tools.names and response_format is None:
        response_format = _response_format(tools.response_format(), "tools")
    return GenerationArgs(entry.name, prompt, prompt_format, sampling,
                          _stop(fields.get("stop")), stream, include_usage,
                          response_format, logprobs, n, tools)


def _response_format(value: Any, name: str = "response_format") -> str | None:
    """``response_format`` checked and its schema compiled as the LLM model will (the same
    function: llguidance, without the model's vocabulary), so that a schema it cannot use is
    a 400 before the request takes an admission place; its JSON text for Triton."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("response_format", f"must be an object with a type, got {_kind(value)}")
    try:
        constraint = parse_constraint(value)
    except RequestError as err:
        # The call grammar of the tools: its parts were checked one by one, so what fails
        # here is the whole (its size), which is the tools' fault.
        raise invalid(err.field if name == "response_format" else name, err.problem) from None
    return None if constraint is None else json.dumps(value, ensure_ascii=False)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    stops = tuple(text(item, "stop") for item in items)
    if any(stop == "" for stop in stops):
        raise invalid("stop", "stop strings must not be empty")
    total = sum(len(stop) for stop in stops)
    if total > MAX_STOP_CHARACTERS:
        raise invalid("stop", f"stop strings may hold at most {MAX_STOP_CHARACTERS} "
                      f"characters in all, got {total}")
    return stops


def parse_embeddings(body: Mapping[str, Any],
                     models: Mapping[str, ModelEntry]) -> EmbeddingArgs:
    """A ``/v1/embeddings`` body: ``input`` a string or a list of strings."""
    fields = Fields(body)
    entry = model_name(fields, models, "embedding", "/v1/embeddings")
    value = fields.get("input")
    if value is None:
        raise invalid("input", "is required")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise invalid("input", "must not be an empty list")
    bound = entry.limits.max_embedding_inputs
    if len(items) > bound:
        raise invalid("input", f"at most {bound} texts, got {len(items)}")
    texts = []
    for index, item in enumerate(items):
        where = f"input[{index}]" if isinstance(value, list) else "input"
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise invalid(where, "token ids are not supported; send text")
        item = text(item, where)
        characters(len(item), where, entry)
        if not item.strip():
            raise invalid(where, "must not be empty or only whitespace")
        texts.append(item)
    encoding = fields.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise invalid("encoding_format", f"must be float or base64, got {_short(encoding)}")
    fields.finish()
    return EmbeddingArgs(entry.name, texts, encoding == "base64")


def parse_search(body: Mapping[str, Any], models: Mapping[str, ModelEntry]) -> SearchArgs:
    """A ``/v1/search`` body: ``text`` (or ``query``), ``num_results`` (or ``top_k``),
    ``filter`` over the corpus fields (:mod:`tritonop_backend.filters`) and ``rerank``."""
    fields = Fields(body)
    entry = model_name(fields, models, "embedding", "/v1/search")
    query = _alias(fields, "text", "query")
    if query is None:
        raise invalid("text", "is required (or query)")
    name = "text" if fields.body.get("text") is not None else "query"
    query = text(query, name)
    characters(len(query), name, entry)
    if not query.strip():
        raise invalid(name, "must not be empty")
    count = _alias(fields, "num_results", "top_k")
    count_name = "num_results" if fields.body.get("num_results") is not None else "top_k"
    num_results = (entry.default_top_k if count is None
                   else integer(count, count_name, 1, entry.max_top_k))
    search_filter = fields.get("filter")
    if search_filter is not None:
        try:  # the same check as the search model's, before the request takes a place
            search_filter = canonical_text(search_filter, entry.fields)
        except RequestError as err:
            raise invalid(err.field, err.problem) from None
    rerank = fields.get("rerank")
    if rerank is not None and not isinstance(rerank, bool):
        raise invalid("rerank", f"must be true or false, got {_kind(rerank)}")
    if rerank and entry.rerank_candidates <= 0:
        raise invalid("rerank", f"model '{entry.name}' has no reranker (spec.rerank is not set)")
    fields.finish()
    return SearchArgs(entry.name, query, num_results, search_filter, bool(rerank))


def _alias(fields: Fields, name: str, alias: str) -> Any:
    first, second = fields.get(name), fields.get(alias)
    if first is not None and second is not None:
        raise invalid(alias, f"is another name for {name}; send one of them")
    return first if first is not None else second


def text(value: Any, name: str) -> str:
    """A string that encodes to UTF-8 (JSON may carry unpaired surrogates)."""
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {_kind(value)}")
    _encodable(value, (name,))
    return value


def characters(count: int, name: str, entry: ModelEntry, what: str = "") -> None:
    """Refuse a text longer than the model's ``maxInputCharacters``, before any tokenizer
    reads it (a tokenizer reads a whole text before it truncates)."""
    bound = entry.limits.max_input_characters
    if count > bound:
        scope = f" ({what})" if what else ""
        raise invalid(name, f"at most {bound} characters{scope}, got {count}")


def integer(value: Any, name: str, low: int, high: int) -> int:
    """An integer (or an integral float, JSON having one number type) within bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"must be an integer, got {_kind(value)}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise invalid(name, f"must be an integer, got {_short(value)}")
        value = int(value)
    if not low <= value <= high:
        raise invalid(name, f"must lie in [{low}, {high}], got {_short(value)}")
    return value


def number(value: Any, name: str, low: float, high: float, low_included: bool) -> float:
    """A finite number within ``[low, high]`` (or ``(low, high]``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"must be a number, got {_kind(value)}")
    try:
        number_ = float(value)
    except OverflowError:  # an integer of hundreds of digits
        number_ = math.inf
    above = number_ >= low if low_included else number_ > low
    if not (math.isfinite(number_) and above and number_ <= high):
        bracket = "[" if low_included else "("
        raise invalid(name, f"must lie in {bracket}{low:g}, {high:g}], got {_short(value)}")
    return number_


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    """A value quoted for an error message, cut so that a huge body gives a short answer."""
    shown = repr(value) if not isinstance(value, str) else value
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown if len(shown) <= limit else shown[:limit] + "..."
