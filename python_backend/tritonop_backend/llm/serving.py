"""Between Triton and the engine: the policy from the model config, responses from events.

Kept free of Triton so that what a client receives (one response, or a stream of deltas
whose last carries the finish reason and token counts) and how the engine's loop behaves
when clients go away, sends fail or the model is unloaded are tested directly.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tritonop_backend.errors import RequestError
from tritonop_backend.llm.engine import (
    CANCELLED,
    ERROR,
    EngineFailedError,
    GenerationEvent,
    LLMEngine,
    QueueFullError,
    TokenLogprob,
)
from tritonop_backend.llm.params import GenerationPolicy, parse_request

LOGGER = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
INPUTS = (
    "text_input",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "repeat_last_n",
    "seed",
    "stop",
    "stream",
    "prompt_format",
    "response_format",
    "logprobs",
)
LOWEST_LOGPROB = -9999.0
"""What a token the model rules out (``-inf``) is reported as: JSON has no infinity, and
OpenAI reports such tokens the same way."""


def policy_from_parameters(parameters: Mapping[str, str]) -> GenerationPolicy:
    """The generation policy the renderer wrote into the model's config parameters."""
    return GenerationPolicy(
        default_max_tokens=int(parameters["default_max_tokens"]),
        max_tokens_limit=int(parameters["max_tokens_limit"]),
        default_temperature=float(parameters["default_temperature"]),
        default_top_k=int(parameters["default_top_k"]),
        default_top_p=float(parameters["default_top_p"]),
        default_repetition_penalty=float(parameters["default_repetition_penalty"]),
        default_repeat_last_n=int(parameters["default_repeat_last_n"]),
        max_context_tokens=int(parameters["max_context_length"]),
        apply_chat_template=parameters.get("chat_template", "true") == "true",
        max_prompt_characters=int(parameters["max_input_characters"]),
    ).validate()


def outputs(text: str, event: GenerationEvent, final: bool,
            logprobs: list[dict[str, object]] | None = None) -> Outputs:
    """One response's tensors; token counts are only final on the last response.

    ``logprobs`` is the JSON text of the response's tokens' entries (see
    :func:`logprob_entries`) for a request that asked for them, else empty.
    """
    listed = "" if logprobs is None else json.dumps(logprobs, ensure_ascii=False)
    return {
        "text_output": np.array([[text.encode("utf-8")]], dtype=object),
        "finish_reason": np.array([[(event.finish_reason or "").encode()]], dtype=object),
        "prompt_tokens": np.array([[event.prompt_tokens]], dtype=np.int32),
        "completion_tokens": np.array([[event.completion_tokens if final else 0]], dtype=np.int32),
        "logprobs": np.array([[listed.encode("utf-8")]], dtype=object),
    }


def logprob_entries(entries: tuple[TokenLogprob, ...],
                    token_bytes: Callable[[int], bytes]) -> list[dict[str, object]]:
    """Entries in OpenAI's chat shape: ``token``, ``logprob``, ``bytes``, ``top_logprobs``.

    ``token`` is the token's bytes as text (a piece of a character shows as U+FFFD);
    ``bytes`` are exact.
    """
    def piece(token: int, logprob: float) -> dict[str, object]:
        raw = token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"),
                "logprob": max(logprob, LOWEST_LOGPROB), "bytes": list(raw)}

    return [{**piece(entry.token, entry.logprob),
             "top_logprobs": [piece(token, logprob) for token, logprob in entry.top]}
            for entry in entries]


@dataclass
class Delivery:
    """How one request's events become responses.

    Streamed requests get every non-empty delta as it comes and a final response; the
    others get a single response holding the whole text, as ``/generate`` expects. A
    request that asked for log probabilities gets its tokens' entries with each response.
    """

    stream: bool
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, object]] | None = None
    token_bytes: Callable[[int], bytes] | None = None

    def responses(self, event: GenerationEvent) -> list[tuple[Outputs, bool]]:
        """``(outputs, is_final)`` pairs to send for ``event``, possibly none."""
        final = event.finish_reason is not None
        fresh = None
        if self.logprobs is not None:
            assert self.token_bytes is not None, "log probabilities need the token bytes"
            fresh = logprob_entries(event.logprobs, self.token_bytes)
        if self.stream:
            if event.text or final:
                return [(outputs(event.text, event, final, fresh), final)]
            return []
        self.parts.append(event.text)
        if self.logprobs is not None and fresh is not None:
            self.logprobs.extend(fresh)
        return [(outputs("".join(self.parts), event, True, self.logprobs), True)] if final else []


@dataclass
class Deliveries:
    """Open requests by id, so the engine thread knows where each event goes."""

    open: dict[Hashable, Delivery] = field(default_factory=dict)
    token_bytes: Callable[[int], bytes] | None = None
    """The bytes of a token id, for log probability entries (the engine's)."""

    def add(self, request_id: Hashable, stream: bool, logprobs: bool = False) -> None:
        self.open[request_id] = Delivery(stream, logprobs=[] if logprobs else None,
                                         token_bytes=self.token_bytes)

    def route(self, event: GenerationEvent) -> list[tuple[Outputs, bool]]:
        delivery = self.open.get(event.request_id)
        if delivery is None:
            return []
        if event.finish_reason is not None:
            del self.open[event.request_id]
        return delivery.responses(event)


INVALID, UNAVAILABLE, INTERNAL = "invalid", "unavailable", "internal"
"""Error kinds a client can get; the adapter maps them to Triton's codes (400, 503, 500)."""

CANCEL_CHECK_SECONDS = 0.1
"""How often the loop asks each open request whether its client went away."""


@dataclass(frozen=True)
class Refusal:
    """An error response: its kind (INVALID, UNAVAILABLE or INTERNAL) and message."""

    kind: str
    message: str


class Handle(Protocol):
    """One request's way back to its client; the adapter wraps Triton's response sender."""

    def send(self, outputs: Outputs | None, final: bool, error: Refusal | None = None) -> None:
        """Send one response (outputs or an error); ``final`` closes the request."""
        ...

    def is_cancelled(self) -> bool:
        """Whether the client has gone away or cancelled."""
        ...


class Server:
    """Requests in, the engine stepped on its own thread, each event to its client.

    Everything that can go wrong here is confined to the request it concerns: a request
    that cannot be read or queued gets an error and the rest of its batch is queued; a
    send that fails (the client went away) cancels that request and the step's other
    deliveries still go out. ``shutdown`` cancels what is in flight and keeps stepping
    until each request has had its final response, so no client is left waiting.
    """

    def __init__(
        self,
        engine: LLMEngine,
        *,
        streaming: bool = True,
        on_step: Callable[[LLMEngine, list[GenerationEvent]], None] | None = None,
    ) -> None:
        """Wrap an engine; call :meth:`start` to run its loop."""
        self.engine = engine
        self.streaming = streaming
        self.on_step = on_step
        self.deliveries = Deliveries(token_bytes=engine.token_bytes)
        self.handles: dict[int, Handle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        """Whether the model should report ready: serving, and the engine healthy."""
        return self.engine.ready and not self._draining.is_set()

    @property
    def open_requests(self) -> int:
        """Requests that have not had their final response yet."""
        with self._lock:
            return len(self.handles)

    def start(self) -> None:
        """Start the engine loop on its own thread."""
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def accept(self, read: Callable[[], Mapping[str, object]], handle: Handle) -> None:
        """Queue one request, or answer it with an error; never raises.

        Args:
            read: returns the request's decoded inputs (reading them may fail too).
            handle: where its responses go.
        """
        request_id: int | None = None
        try:
            if self._draining.is_set():
                raise EngineFailedError("the model is being unloaded")
            generation = parse_request(read(), self.engine.policy)
            if generation.stream and not self.streaming:
                raise RequestError("stream", "streaming is turned off for this service")
            request_id = next(self._ids)
            with self._lock:
                self.deliveries.add(request_id, generation.stream,
                                    generation.logprobs is not None)
                self.handles[request_id] = handle
            self.engine.add(request_id, generation)
        except Exception as error:
            if request_id is not None:
                self._close(request_id)
            self._refuse(handle, _refusal(error))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight, deliver the final responses, then stop the loop.

        Requests still open after ``timeout`` (the loop is stuck, say) get a final
        "cancelled" response from here.
        """
        self._draining.set()
        self.engine.cancel_all()
        deadline = time.monotonic() + timeout
        while self.open_requests and time.monotonic() < deadline and self._running():
            time.sleep(0.01)
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        with self._lock:
            left = list(self.handles.items())
            self.handles.clear()
            self.deliveries.open.clear()
        for request_id, handle in left:
            event = GenerationEvent(request_id, "", CANCELLED, 0, 0)
            self._send(handle, outputs("", event, True), final=True)

    def run_once(self) -> list[GenerationEvent]:
        """One engine step and its deliveries (the loop's body; tests call it directly)."""
        events = self.engine.step()
        if self.on_step is not None:  # first, so that a client seeing its text sees the gauges
            try:
                self.on_step(self.engine, events)
            except Exception:
                LOGGER.exception("engine metrics update failed")
        for event in events:
            self._deliver(event)
        return events

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        checked = time.monotonic()
        while not self._stopped.is_set():
            if not self.engine.wait_for_work(timeout=0.1):
                continue
            if time.monotonic() - checked > CANCEL_CHECK_SECONDS:
                self._cancel_disconnected()
                checked = time.monotonic()
            try:
                self.run_once()
            except Exception:  # the loop must outlive any one step
                LOGGER.exception("LLM engine loop")

    def _cancel_disconnected(self) -> None:
        with self._lock:
            handles = list(self.handles.items())
        for request_id, handle in handles:
            try:
                gone = handle.is_cancelled()
            except Exception:
                gone = True
            if gone:
                self.engine.cancel(request_id)

    def _deliver(self, event: GenerationEvent) -> None:
        """Send one event's responses; a failing send cancels only that request."""
        final = event.finish_reason is not None
        with self._lock:
            responses = self.deliveries.route(event)
            handle = self.handles.pop(event.request_id, None) if final else self.handles.get(
                event.request_id)
        if handle is None:
            return
        if event.finish_reason == ERROR:
            self._send(handle, None, True, Refusal(INTERNAL, event.error or "generation failed"))
            return
        for tensors, last in responses:
            if not self._send(handle, tensors, last):
                if not final:  # the client went away: stop generating for it now
                    self._close(event.request_id)
                    self.engine.cancel(event.request_id)
                return

    def _close(self, request_id: int) -> None:
        with self._lock:
            self.handles.pop(request_id, None)
            self.deliveries.open.pop(request_id, None)

    def _refuse(self, handle: Handle, refusal: Refusal) -> None:
        self._send(handle, None, True, refusal)

    @staticmethod
    def _send(handle: Handle, tensors: Outputs | None, final: bool,
              error: Refusal | None = None) -> bool:
        try:
            handle.send(tensors, final, error)
            return True
        except Exception as failure:
            LOGGER.warning("could not send a response: %s: %s", type(failure).__name__, failure)
            return False


def _refusal(error: Exception) -> Refusal:
    """The error response a request gets when it cannot be queued."""
    if isinstance(error, RequestError):
        return Refusal(INVALID, str(error))
    if isinstance(error, QueueFullError):
        return Refusal(UNAVAILABLE, f"the service is at capacity: {error}")
    if isinstance(error, EngineFailedError):
        return Refusal(UNAVAILABLE, f"the service cannot take requests: {error}")
    LOGGER.error("request could not be queued", exc_info=error)
    return Refusal(INTERNAL, f"the request could not be queued: {type(error).__name__}: {error}")
