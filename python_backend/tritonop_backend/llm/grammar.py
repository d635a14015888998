"""Structured outputs: OpenAI's ``response_format`` as a token mask from llguidance.

A request's ``response_format`` (``json_object``, or ``json_schema`` with a JSON Schema) is
checked and compiled into an llguidance grammar by :func:`parse_response_format`, before
the request takes a place in the engine, so that a schema the grammar engine cannot use is
a 400 naming the field. The engine then gives each such sequence a matcher
(:meth:`GrammarTokens.matcher`); before every sampling step :meth:`GrammarTokens.masks`
says which tokens each constrained row may take next, and the sampler sets the others to
``-inf`` before temperature, top-k and top-p. The matcher consumes every sampled token;
once it accepts and allows nothing more, the sequence ends with "stop".

JSON is written compactly with one space after ``,`` and ``:`` (as ``json.dumps`` does) and
no other whitespace: free whitespace between tokens would let a model that wanders pad
its answer for ever, and it carries nothing.

A grammar may wait for a trigger (``tool_choice: "auto"``, :class:`Trigger`): the sequence
runs free, token for token what it would be without one, until its text reaches the start
of a call; a :class:`CallWatch` sees that on the tokens' bytes, and from then on the matcher,
which first catches up with the tokens that hold the start of the call, masks every token.

The OpenAI gateway runs the same checks (:func:`parse_response_format`) before a request
takes an admission place; torch is imported only where masks are made, so that the
gateway's process does not load it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance

from tritonop_backend.errors import RequestError

if TYPE_CHECKING:
    import torch

MAX_RESPONSE_FORMAT_BYTES = 64 * 1024
"""The ``response_format`` object's JSON text at most: compiling a schema costs time and
memory that grow with it, on the thread that queues requests."""

MAX_SCHEMA_NAME = 64
"""OpenAI's bound on ``json_schema.name``."""

FIELD = "response_format"

ToolGrammar = Callable[[dict[str, Any]], "tuple[str, Trigger | None]"]
"""Builds the grammar of ``{"type": "tool_calls", ...}`` (chat_tools.tool_constraint, in the
model's tool format), and its trigger under ``auto``: the gateway's own type, for ``tools``."""

COMPILE_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""How llguidance writes JSON: see the module's docstring. Applied after the schema's own
``x-guidance`` options, so a client cannot turn free whitespace back on."""

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""``json_object``: any JSON object."""


@dataclass(frozen=True)
class Trigger:
    """Where a call begins in a free answer: from there on the grammar applies.

    Attributes:
        marker: text that begins a call anywhere in the answer (Hermes' ``<tool_call>``),
            found on the tokens' bytes however the tokens split it; the grammar then starts
            with a lazy lexeme that reads up to it, so the tokens that hold it can be fed.
        controls: control tokens (by name) that begin a call anywhere; the grammar starts
            after them.
        first: a character that begins a call when it is the answer's first one after
            blanks (Mistral's ``[``, Llama's ``{``); the grammar may start with blanks.
    """

    marker: str = ""
    controls: tuple[str, ...] = ()
    first: str = ""


BLANKS = b" \t\r\n"
CONTINUATION = range(0x80, 0xC0)
"""Bytes that continue a UTF-8 character: a grammar cannot be fed from one."""
WATCHED = 32
"""Recent tokens a watch keeps: enough for a marker split over one token per byte."""


class CallWatch:
    """One sequence's watch for the start of a call (:class:`Trigger`), token by token.

    Pure: the engine hands it each generated token with its bytes; it answers, once a call
    begins, how many of the latest tokens the grammar must be fed (0 after a control token).
    """

    def __init__(self, trigger: Trigger, controls: frozenset[int]) -> None:
        """Watch for ``trigger``; ``controls`` are the ids of its control tokens."""
        self._marker = trigger.marker.encode("utf-8")
        self._first = trigger.first.encode("utf-8")
        self._controls = controls
        self._recent: list[bytes] = []
        self._blank = True  # nothing but blanks written yet

    def push(self, token: int, data: bytes) -> int | None:
        """Read one generated token (not an end of sequence).

        Returns:
            None while no call has begun; else how many of the tokens read so far, the
            last ones, the grammar must consume: those from the one where the call begins
            (back to the start of a character), or 0 after a control token.
        """
        if token in self._controls:
            return 0
        self._recent = [*self._recent[-(WATCHED - 1):], data]
        if self._blank:
            rest = data.lstrip(BLANKS)
            self._blank = not rest
            if self._first and rest.startswith(self._first):
                return 1
        if not self._marker:
            return None
        window = b"".join(self._recent)
        found = window.find(self._marker)
        if found < 0:
            return None
        back, start = 0, len(window)
        while start > found:  # back to the token that holds the marker's first byte
            back += 1
            start -= len(self._recent[-back])
        while back < len(self._recent) and self._recent[-back][:1] and (
                self._recent[-back][0] in CONTINUATION):  # and to the start of a character
            back += 1
        return back


@dataclass(frozen=True)
class ResponseFormat:
    """A validated ``response_format`` that constrains the output.

    Attributes:
        type: ``json_object`` or ``json_schema``.
        grammar: the llguidance grammar (checked to compile), for :meth:`GrammarTokens.matcher`.
        name: ``json_schema.name``, when given.
        trigger: where the grammar starts to apply (``tool_calls`` under ``auto``); None
            for from the first token.
    """

    type: str
    grammar: str
    name: str | None = None
    trigger: Trigger | None = None


def parse_response_format(value: object, tool_calls: ToolGrammar | None = None
                          ) -> ResponseFormat | None:
    """Check an OpenAI ``response_format`` (a JSON string or an object) and compile it.

    Args:
        value: the field as the request carries it.
        tool_calls: the builder of the ``tool_calls`` type's grammar; without it that type
            is refused as unknown.

    Returns:
        None for no constraint (absent, or ``{"type": "text"}``), else the compiled format.

    Raises:
        RequestError: naming ``response_format`` (or the part of it at fault): not JSON, not
            an object, over :data:`MAX_RESPONSE_FORMAT_BYTES`, an unknown type, a schema
            that is not a JSON Schema or that llguidance cannot compile.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(FIELD, f"is not valid UTF-8 ({error.reason} at byte "
                                      f"{error.start})") from None
    if isinstance(value, str):
        size = len(value.encode("utf-8"))
        _check_size(size)
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RequestError(FIELD, "must be a JSON object") from None
    elif isinstance(value, dict):
        _check_size(len(json.dumps(value, ensure_ascii=False).encode("utf-8")))
    else:
        raise RequestError(FIELD, "must be one string: the JSON of an object with a type")
    if not isinstance(value, dict):
        raise RequestError(FIELD, "must be an object with a type")
    kind = value.get("type")
    if kind == "tool_calls" and tool_calls is not None:  # the gateway's, for tools
        grammar, trigger = tool_calls(value)
        return ResponseFormat("tool_calls", grammar, trigger=trigger)
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise RequestError(f"{FIELD}.{extra[0]}", "is not a recognised field")
    if kind == "text":
        if "json_schema" in value:
            raise RequestError(f"{FIELD}.json_schema", "is only allowed with type json_schema")
        return None
    if kind == "json_object":
        if "json_schema" in value:
            raise RequestError(f"{FIELD}.json_schema", "is only allowed with type json_schema")
        return ResponseFormat("json_object", compile_schema(ANY_OBJECT, FIELD))
    if kind == "json_schema":
        spec = value.get("json_schema")
        where = f"{FIELD}.json_schema"
        if not isinstance(spec, dict):
            raise RequestError(where, "is required with type json_schema and must be an "
                               "object with name and schema")
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}", "is not a recognised field")
        name = spec.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_SCHEMA_NAME or not all(
                c.isascii() and (c.isalnum() or c in "_-") for c in name):
            raise RequestError(f"{where}.name", f"must be 1 to {MAX_SCHEMA_NAME} letters, "
                               "digits, underscores or dashes")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(f"{where}.strict", "must be a boolean")
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"{where}.description", "must be a string")
        if "schema" not in spec:
            raise RequestError(f"{where}.schema", "is required")
        schema = spec["schema"]
        if not isinstance(schema, (dict, bool)):
            raise RequestError(f"{where}.schema", "must be a JSON Schema (an object)")
        return ResponseFormat("json_schema", compile_schema(schema, f"{where}.schema"), name)
    raise RequestError(f"{FIELD}.type", "must be one of text, json_object, json_schema, "
                       "tool_calls, got "
                       f"{str(kind)[:60]!r}")


def _check_size(size: int) -> None:
    if size > MAX_RESPONSE_FORMAT_BYTES:
        raise RequestError(FIELD, f"is {size} bytes of JSON; at most "
                           f"{MAX_RESPONSE_FORMAT_BYTES} are allowed")


def compile_schema(schema: dict[str, Any] | bool, field: str) -> str:
    """The llguidance grammar of a JSON Schema, checked to compile.

    Keywords that llguidance does not implement are errors rather than ignored, so that
    what a client asked for is either enforced or refused.

    Raises:
        RequestError: naming ``field``, with llguidance's reason.
    """
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=COMPILE_OPTIONS)  # type: ignore[arg-type]
    except (ValueError, TypeError, RecursionError) as error:
        raise RequestError(field, f"is not a JSON Schema: {error}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        reason = messages[0] if messages else "unknown error"
        raise RequestError(field, f"cannot be used: {_short(reason)}")
    return grammar


def _short(message: str, limit: int = 300) -> str:
    """An llguidance error on one line, without the parser state it may dump, cut."""
    line = " ".join(message.split("<state>", 1)[0].split())
    return line if len(line) <= limit else line[:limit] + "..."


class GrammarTokens:
    """One model's vocabulary as llguidance sees it, and the masks of many matchers.

    Building llguidance's tokenizer reads the whole vocabulary (about a second for a large
    one), so it is made once, on the first constrained request, and shared.
    """

    def __init__(self, tokenizer: Any, eos: Sequence[int]) -> None:
        """Remember the Hugging Face tokenizer; nothing is built until it is needed."""
        self._tokenizer = tokenizer
        self._eos = sorted(eos)
        self._lock = threading.Lock()
        self._tokens: llguidance.LLTokenizer | None = None
        self._unusable: str | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._bits: dict[torch.device, torch.Tensor] = {}

    def tokens(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer, built on first use.

        Raises:
            RequestError: on ``response_format`` for a tokenizer llguidance cannot read
                (only fast, ``tokenizers``-backed tokenizers can be).
        """
        with self._lock:
            if self._unusable is not None:
                raise RequestError(FIELD, self._unusable)
            if self._tokens is None:
                try:
                    self._tokens = self._build()
                except RequestError as error:
                    self._unusable = error.problem
                    raise
                self._executor = llguidance.LLExecutor()
            return self._tokens

    def _build(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, refused where it would disagree with ours.

        A SentencePiece vocabulary whose byte pieces (``<0x7B>``) are declared added special
        tokens is read inconsistently by llguidance 1.9 (masked as the byte, consumed as a
        special token), so such a model gets a clear refusal instead of failing mid-answer.
        """
        from llguidance.hf import from_tokenizer

        try:
            tokens = from_tokenizer(self._tokenizer, eos_token=self._eos or None)
        except Exception as error:
            raise RequestError(FIELD, "structured outputs need a fast (tokenizers) tokenizer; "
                               f"this model's cannot be used: {error}") from None
        brace = self._tokenizer.convert_tokens_to_ids("<0x7B>")
        if (isinstance(brace, int) and brace != self._tokenizer.unk_token_id
                and 0 <= brace < tokens.vocab_size and tokens.is_special_token(brace)):
            raise RequestError(FIELD, "is not available for this model: its tokenizer declares "
                               "its byte pieces special tokens, which the grammar engine "
                               "cannot match")
        return tokens

    def matcher(self, response_format: ResponseFormat) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence.

        Raises:
            RequestError: when the grammar does not build against this vocabulary.
        """
        matcher = llguidance.LLMatcher(self.tokens(), response_format.grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(FIELD, f"cannot be used with this model: "
                               f"{_short(matcher.get_error())}")
        return matcher

    def masks(self, matchers: Sequence[llguidance.LLMatcher], vocab: int,
              device: torch.device) -> torch.Tensor:
        """Which tokens each matcher allows next: ``(len(matchers), vocab)`` bool on ``device``.

        The bitmasks are computed on the CPU in parallel (llguidance's executor, without the
        GIL) and unpacked on ``device``; ids past llguidance's vocabulary are never allowed.
        """
        import torch

        tokens = self.tokens()
        assert self._executor is not None
        words = (tokens.vocab_size + 31) // 32
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, row) for row, matcher in enumerate(matchers)], bitmask.data_ptr(),
            words * 4, len(matchers))
        bits = self._bits.get(device)
        if bits is None:  # bit i of each 32-bit word is token 32 * word + i
            bits = torch.tensor([1 << bit for bit in range(31)] + [-(1 << 31)],
                                dtype=torch.int32, device=device)
            self._bits[device] = bits
        allowed = (bitmask.to(device)[:, :, None] & bits) != 0
        allowed = allowed.reshape(len(matchers), words * 32)[:, : tokens.vocab_size]
        if allowed.shape[1] >= vocab:
            return allowed[:, :vocab]
        padding = torch.zeros((len(matchers), vocab - allowed.shape[1]), dtype=torch.bool,
                              device=device)
        return torch.cat([allowed, padding], dim=1)
