"""Between Triton and the engine: the policy from the model config, responses from events.

Kept free of Triton so that what a client receives (one response, or a stream of deltas
whose last carries the finish reason and token counts) is tested directly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tritonop_backend.llm.engine import GenerationEvent
from tritonop_backend.llm.params import GenerationPolicy

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
)


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
    ).validate()


def outputs(text: str, event: GenerationEvent, final: bool) -> Outputs:
    """One response's tensors; token counts are only final on the last response."""
    return {
        "text_output": np.array([[text.encode("utf-8")]], dtype=object),
        "finish_reason": np.array([[(event.finish_reason or "").encode()]], dtype=object),
        "prompt_tokens": np.array([[event.prompt_tokens]], dtype=np.int32),
        "completion_tokens": np.array([[event.completion_tokens if final else 0]], dtype=np.int32),
    }


@dataclass
class Delivery:
    """How one request's events become responses.

    Streamed requests get every non-empty delta as it comes and a final response; the
    others get a single response holding the whole text, as ``/generate`` expects.
    """

    stream: bool
    parts: list[str] = field(default_factory=list)

    def responses(self, event: GenerationEvent) -> list[tuple[Outputs, bool]]:
        """``(outputs, is_final)`` pairs to send for ``event``, possibly none."""
        final = event.finish_reason is not None
        if self.stream:
            if event.text or final:
                return [(outputs(event.text, event, final), final)]
            return []
        self.parts.append(event.text)
        return [(outputs("".join(self.parts), event, True), True)] if final else []


@dataclass
class Deliveries:
    """Open requests by id, so the engine thread knows where each event goes."""

    open: dict[Hashable, Delivery] = field(default_factory=dict)

    def add(self, request_id: Hashable, stream: bool) -> None:
        self.open[request_id] = Delivery(stream)

    def route(self, event: GenerationEvent) -> list[tuple[Outputs, bool]]:
        delivery = self.open.get(event.request_id)
        if delivery is None:
            return []
        if event.finish_reason is not None:
            del self.open[event.request_id]
        return delivery.responses(event)
