"""Generation parameters: the resource's policy and one request's validated settings.

The adapter hands :func:`parse_request` the scalar inputs of one Triton request,
already decoded from their tensors. Everything a client can get wrong is checked
here, so that the engine only ever sees values it can use, and a bad request is
answered with a 400 naming the parameter instead of failing inside a batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tritonop_backend.errors import RequestError
from tritonop_backend.llm.chat_tools import FORMATS, Chat, parse_chat, parse_constraint
from tritonop_backend.llm.grammar import ResponseFormat

MAX_STOP_STRINGS = 16
"""Stop strings are matched against the text after every token; a bound keeps that cheap."""

MAX_STOP_CHARACTERS = 256
"""Characters in all stop strings together: each token's check scans the held-back tail for
every stop string, so the cost per token grows with their total length (16 strings of 1,000
characters cost about 2 ms per token per sequence on the engine thread)."""

MAX_SEED = 2**64 - 1
"""``torch.Generator.manual_seed`` takes unsigned 64-bit seeds (Triton's UINT64)."""

PROMPT_FORMATS = ("text", "raw", "messages")
"""How ``text_input`` becomes tokens: ``text`` is one user turn of the chat template when the
policy applies one (what ``/generate`` clients send); ``raw`` is tokenized verbatim (OpenAI's
``/v1/completions``); ``messages`` is a JSON list of chat messages that the model's own
tokenizer templates (``/v1/chat/completions``), so the template is applied exactly once, here
(with tools: an object with ``messages``, ``tools`` and ``tool_choice``, see
:mod:`tritonop_backend.llm.chat_tools`).
"""

MAX_LOGPROBS = 20
"""Most likely tokens a request may ask to see at each step (OpenAI's ``top_logprobs`` bound)."""

GREEDY_BELOW = 1e-5
"""Temperatures below this (0 included) select the most likely token, as vLLM's
``_SAMPLING_EPS`` does: dividing logits by a tiny temperature overflows to infinities, whose
differences are NaN, and a NaN distribution would pick an arbitrary (the last) token."""


@dataclass(frozen=True)
class GenerationPolicy:
    """Defaults and limits that the LLMService resource sets for every request.

    Attributes:
        default_max_tokens: tokens to generate when a request names no ``max_tokens``.
        max_tokens_limit: the most tokens one request may ask for.
        default_temperature: 0 means greedy decoding.
        default_top_k: 0 disables top-k filtering.
        default_top_p: 1.0 disables nucleus filtering.
        default_repetition_penalty: 1.0 disables the penalty.
        default_repeat_last_n: how many recent tokens the penalty looks at.
        max_context_tokens: prompt plus generated tokens that one sequence may hold.
        apply_chat_template: wrap the prompt as one user turn of the tokenizer's template.
        max_prompt_characters: the most characters a prompt may have (for ``messages``: all
            contents together), checked before it is templated or tokenized.
        tool_format: how the chat template writes tool calls (one of
            :data:`~tritonop_backend.llm.chat_tools.FORMATS`); the engine detects it at load
            from the tokenizer, and the grammar of calls follows it.
        tool_tokens: ``(name, id)`` of the control tokens the format's grammar writes
            (:data:`~tritonop_backend.llm.chat_tools.GRAMMAR_TOKENS`), set with it.
    """

    default_max_tokens: int = 128
    max_tokens_limit: int = 1024
    default_temperature: float = 1.0
    default_top_k: int = 0
    default_top_p: float = 1.0
    default_repetition_penalty: float = 1.0
    default_repeat_last_n: int = 64
    max_context_tokens: int = 2048
    apply_chat_template: bool = True
    max_prompt_characters: int = 32768
    tool_format: str = "fallback"
    tool_tokens: tuple[tuple[str, int], ...] = ()

    def validate(self) -> GenerationPolicy:
        """Check the policy once at load, so that defaults never fail a request.

        Returns:
            The policy itself, for chaining.

        Raises:
            ValueError: a default or limit that no request could satisfy.
        """
        if self.max_context_tokens < 2:
            raise ValueError("max_context_tokens must be at least 2 (one prompt, one new token)")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError("default_max_tokens must lie in [1, max_tokens_limit]")
        if self.max_prompt_characters < 1:
            raise ValueError("max_prompt_characters must be at least 1")
        if self.tool_format not in FORMATS:
            raise ValueError(f"tool_format must be one of {FORMATS}")
        defaults = self.defaults()
        try:
            _check_sampling(defaults)
        except RequestError as error:
            raise ValueError(f"policy default {error}") from error
        return self

    def defaults(self) -> dict[str, Any]:
        """The policy's default for every sampling parameter, keyed by input name."""
        return {
            "max_tokens": self.default_max_tokens,
            "temperature": self.default_temperature,
            "top_k": self.default_top_k,
            "top_p": self.default_top_p,
            "repetition_penalty": self.default_repetition_penalty,
            "repeat_last_n": self.default_repeat_last_n,
        }


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops; valid by construction via parse_request.

    Attributes:
        temperature: logits are divided by it; below ``GREEDY_BELOW`` (0 included) the most
            likely token is selected.
        top_k: keep the k most likely tokens (ties with the k-th kept); 0 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
        repetition_penalty: Hugging Face's penalty on tokens seen in the recent window.
        repeat_last_n: size of that window, over prompt and generated tokens.
        seed: seeds this sequence's own generator; None draws a random seed.
        max_tokens: generated tokens after which the sequence ends with "length".
        stop: strings that end the sequence; they are not part of the output.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax, which needs no random draw."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: its prompt text, sampling settings and delivery mode.

    Attributes:
        messages: the chat turns' roles and contents when the prompt came as ``messages``;
            then ``prompt`` is their JSON text and ``chat`` the whole conversation (tools,
            calls and their results included), which the engine templates.
        raw: tokenize ``prompt`` verbatim, without the chat template.
        response_format: the grammar the output must follow (JSON or a JSON Schema), or None.
        logprobs: None for no log probabilities; else how many of the most likely tokens each
            generated token's entry lists beside it (0 to :data:`MAX_LOGPROBS`).
    """

    prompt: str
    params: SamplingParams
    stream: bool = False
    messages: tuple[tuple[str, str], ...] | None = None
    raw: bool = False
    response_format: ResponseFormat | None = None
    logprobs: int | None = None
    chat: Chat | None = None


def parse_request(values: Mapping[str, object], policy: GenerationPolicy) -> GenerationRequest:
    """Validate one request's decoded inputs and fill the gaps from the policy.

    Args:
        values: input name -> decoded scalar (``None`` or absent means "use the default").
            Numpy scalars and one-element arrays are accepted, as Triton delivers them.
        policy: the resource's defaults and limits.

    Returns:
        The request, ready for :meth:`LLMEngine.add`.

    Raises:
        RequestError: naming the first input that is missing, malformed or out of range.
    """
    unwrapped = {name: _unwrap(value) for name, value in values.items()}
    given = {name: value for name, value in unwrapped.items() if value is not None}
    prompt = _parse_prompt(given.get("text_input"))
    prompt_format = _as_text("prompt_format", given.get("prompt_format", "text"))
    if prompt_format not in PROMPT_FORMATS:
        raise RequestError(
            "prompt_format", f"must be one of {PROMPT_FORMATS}, got {prompt_format!r}"
        )
    chat = parse_chat(prompt) if prompt_format == "messages" else None
    messages = None if chat is None else tuple((m["role"], m["content"]) for m in chat.messages)
    _check_prompt_length(prompt, chat, policy.max_prompt_characters)
    defaults = policy.defaults()
    max_tokens = _as_int("max_tokens", given.get("max_tokens", defaults["max_tokens"]))
    if max_tokens <= 0 or max_tokens > policy.max_tokens_limit:
        raise RequestError(
            "max_tokens", f"must lie in [1, {policy.max_tokens_limit}], got {max_tokens}"
        )
    params = SamplingParams(
        temperature=_as_float("temperature", given.get("temperature", defaults["temperature"])),
        top_k=_as_int("top_k", given.get("top_k", defaults["top_k"])),
        top_p=_as_float("top_p", given.get("top_p", defaults["top_p"])),
        repetition_penalty=_as_float(
            "repetition_penalty", given.get("repetition_penalty", defaults["repetition_penalty"])
        ),
        repeat_last_n=_as_int(
            "repeat_last_n", given.get("repeat_last_n", defaults["repeat_last_n"])
        ),
        seed=_parse_seed(given.get("seed")),
        max_tokens=max_tokens,
        stop=_parse_stop(given.get("stop")),
    )
    _check_sampling(params.__dict__)
    return GenerationRequest(
        prompt=prompt, params=params, stream=_as_bool("stream", given.get("stream", False)),
        messages=messages, raw=prompt_format == "raw",
        response_format=parse_constraint(given.get("response_format"), policy.tool_format,
                                         dict(policy.tool_tokens)),
        logprobs=_parse_logprobs(given.get("logprobs")), chat=chat,
    )


def _parse_logprobs(value: object) -> int | None:
    """``logprobs``: -1 (or absent) for none, else the count of top entries per token."""
    if value is None:
        return None
    count = _as_int("logprobs", value)
    if count == -1:
        return None
    if not 0 <= count <= MAX_LOGPROBS:
        raise RequestError(
            "logprobs", f"must lie in [0, {MAX_LOGPROBS}] (or -1 for none), got {count}"
        )
    return count


def _check_prompt_length(prompt: str, chat: Chat | None, limit: int) -> None:
    """Refuse a prompt over ``limit`` characters before any template or tokenizer reads it.

    A tokenizer's time and memory grow with the whole text, before the context check can
    count its tokens; the engine's callers wait meanwhile. For ``messages`` the contents
    count, with calls' arguments and the tools, not the JSON around them (the same count the
    gateway makes for a chat).
    """
    if chat is None:
        if len(prompt) > limit:
            raise RequestError(
                "text_input", f"the prompt is {len(prompt)} characters long; at most {limit} "
                "are allowed"
            )
        return
    total = chat.characters
    if total > limit:
        raise RequestError(
            "messages", f"the contents are {total} characters long together; at most {limit} "
            "are allowed"
        )


def _check_sampling(values: Mapping[str, Any]) -> None:
    """Range checks shared by requests and policy defaults."""
    if values["temperature"] < 0:
        raise RequestError(
            "temperature", f"must be >= 0 (0 means greedy), got {values['temperature']}"
        )
    if values["top_k"] < 0:
        raise RequestError("top_k", f"must be >= 0 (0 disables it), got {values['top_k']}")
    if not 0 < values["top_p"] <= 1:
        raise RequestError("top_p", f"must lie in (0, 1], got {values['top_p']}")
    if values["repetition_penalty"] <= 0:
        raise RequestError(
            "repetition_penalty", f"must be > 0 (1 disables it), got {values['repetition_penalty']}"
        )
    if values["repeat_last_n"] < 0:
        raise RequestError("repeat_last_n", f"must be >= 0, got {values['repeat_last_n']}")


def _unwrap(value: object) -> object:
    """Turn numpy scalars and arrays (as Triton delivers inputs) into plain Python values."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return [_unwrap(item) for item in value.reshape(-1)]
        value = value.reshape(-1)[0]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_text(field: str, value: object) -> str:
    """Decode bytes strictly: a client that sends broken UTF-8 should hear about it."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(
                field, f"is not valid UTF-8 ({error.reason} at byte {error.start})"
            ) from None
    raise RequestError(field, f"must be a string, got {type(value).__name__}")


def _parse_prompt(value: object) -> str:
    if value is None:
        raise RequestError("text_input", "is required")
    prompt = _as_text("text_input", value)
    if not prompt.strip():
        raise RequestError("text_input", "must not be empty")
    return prompt


def _as_int(field: str, value: object) -> int:
    """Accept integers and integral floats (JSON has one number type); reject the rest."""
    if isinstance(value, bool):
        raise RequestError(field, "must be an integer, got a boolean")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise RequestError(field, f"must be an integer, got {value!r}")


def _as_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(field, f"must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RequestError(field, f"must be finite, got {number}")
    return number


def _as_bool(field: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise RequestError(field, f"must be a boolean, got {value!r}")


def _parse_seed(value: object) -> int | None:
    if value is None:
        return None
    seed = _as_int("seed", value)
    if not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"must lie in [0, 2**64 - 1], got {seed}")
    return seed


def _parse_stop(value: object) -> tuple[str, ...]:
    """A single string or a list of them; empty strings would stop at once, so they are refused."""
    if value is None:
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    stops = tuple(_as_text("stop", item) for item in items)
    if any(stop == "" for stop in stops):
        raise RequestError("stop", "stop strings must not be empty")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    total = sum(len(stop) for stop in stops)
    if total > MAX_STOP_CHARACTERS:
        raise RequestError(
            "stop", f"stop strings may hold at most {MAX_STOP_CHARACTERS} characters in all, "
            f"got {total}"
        )
    return tuple(dict.fromkeys(stops))
