"""Talking to Triton over gRPC with tritonclient's asyncio client.

Each call turns a validated request into Triton inputs and Triton's answer into plain
Python values; Triton's errors become :class:`APIError` with the client's field names.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from tritonop.gateway.errors import APIError
from tritonop.gateway.protocol import GenerationArgs

# Only numeric inputs that the protocol module has already range-checked.
SAMPLING_TYPES = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32),
                  "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
                  "repetition_penalty": ("FP32", np.float32),
                  "repeat_last_n": ("INT32", np.int32), "seed": ("UINT64", np.uint64)}
_FIELD = re.compile(r"^(?:in ensemble '[^']*', )?([A-Za-z_][\w.\[\]]*): (.*)$", re.S)


@dataclass(frozen=True)
class Piece:
    """One response of the LLM model: new text, and on the last one why it ended."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    text: str


def _bytes_input(name: str, values: Sequence[str], shape: list[int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(
        np.array([v.encode("utf-8") for v in values], dtype=object).reshape(shape))
    return tensor


def _scalar_input(name: str, value: object, datatype: str, dtype: type) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, 1], datatype)
    tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
    return tensor


def triton_error(err: InferenceServerException, fields: dict[str, str]) -> APIError:
    """A Triton error as the client should see it, with Triton's input names translated.

    Args:
        err: what Triton answered.
        fields: Triton input name -> the request field the client knows it as.
    """
    message = err.message() or str(err)
    status = err.status() or ""
    if "UNAVAILABLE" in status or "at capacity" in message or "queue size" in message:
        return APIError(503, f"the model is at capacity, retry later ({message})",
                        code="model_busy", retry_after=1)
    match = _FIELD.match(message)
    if match and (match.group(1) in fields or "INVALID_ARGUMENT" in status):
        field = fields.get(match.group(1), match.group(1))
        return APIError(400, f"{field}: {match.group(2)}", param=field, code="invalid_value")
    if "INVALID_ARGUMENT" in status:
        return APIError(400, message, code="invalid_value")
    return APIError(502, f"Triton failed to answer: {message}", code="upstream_error")


STREAM_END_SECONDS = 5.0
"""How long a stream whose last response has come may take to end before it is cancelled."""


async def _read_to_end(stream: AsyncIterator[object]) -> bool:
    """Read a stream whose last response has come until Triton ends it; whether it did.

    A stream must end this way, not by a cancel: Triton 2.51 keeps the inference request
    of a stream cancelled after its last response, and with it a reference to the model,
    so that model never unloads and the server's shutdown waits out its exit timeout.
    """
    try:
        async with asyncio.timeout(STREAM_END_SECONDS):
            async for _ in stream:
                pass
    except Exception:  # not ended in time, or ended with an error: cancel it
        return False
    return True


class TritonBackend:
    """The gateway's one gRPC channel to Triton (HTTP/2 multiplexes every request)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self._ids = itertools.count()

    async def close(self) -> None:
        await self.client.close()

    async def ready(self, models: Sequence[str]) -> dict[str, bool]:
        """Which models Triton reports ready; all False when Triton itself is not."""
        try:
            if not await self.client.is_server_ready(client_timeout=2):
                return dict.fromkeys(models, False)
            return {m: bool(await self.client.is_model_ready(m, client_timeout=2))
                    for m in models}
        except Exception:  # Triton down or starting: not ready, and asked again soon
            return dict.fromkeys(models, False)

    async def generate(self, args: GenerationArgs, fields: dict[str, str]
                       ) -> AsyncIterator[Piece]:
        """Stream the LLM model's responses; leaving early cancels the request in Triton."""
        inputs = [_bytes_input("text_input", [args.prompt], [1, 1]),
                  _bytes_input("prompt_format", [args.prompt_format], [1, 1]),
                  _scalar_input("stream", args.stream, "BOOL", np.bool_)]
        for name, value in args.sampling.items():
            datatype, dtype = SAMPLING_TYPES[name]
            inputs.append(_scalar_input(name, value, datatype, dtype))
        if args.stop:
            inputs.append(_bytes_input("stop", args.stop, [1, len(args.stop)]))
        request = {"model_name": args.model, "inputs": inputs,
                   "request_id": str(next(self._ids))}

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield request

        stream = self.client.stream_infer(requests())
        closed = False  # Triton ended the stream itself: nothing to cancel
        try:
            async for result, error in stream:
                if error is not None:  # an error is the request's last response
                    closed = await _read_to_end(stream)
                    raise triton_error(error, fields)
                reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
                piece = Piece(result.as_numpy("text_output").reshape(-1)[0].decode("utf-8"),
                              reason or None,
                              int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                              int(result.as_numpy("completion_tokens").reshape(-1)[0]))
                if reason:
                    closed = await _read_to_end(stream)
                    yield piece
                    return
                yield piece
        except InferenceServerException as err:
            raise triton_error(err, fields) from None
        finally:
            if not closed:  # the client left mid-request: free the engine's slot now
                stream.cancel()

    async def embed(self, model: str, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Embeddings of ``texts`` (one Triton request) and each text's token count."""
        result = await self._infer(f"{model}_embedding",
                                   [_bytes_input("text", texts, [len(texts), 1])],
                                   ["embedding", "attention_mask"], {"text": "input"})
        mask = result.as_numpy("attention_mask")
        return result.as_numpy("embedding"), [int(row.sum()) for row in mask]

    async def search(self, model: str, text: str, num_results: int) -> list[Hit]:
        """The search ensemble's answer, best first."""
        inputs = [_bytes_input("text", [text], [1, 1]),
                  _scalar_input("num_results", num_results, "INT32", np.int32)]
        result = await self._infer(model, inputs, ["ids", "scores", "texts"],
                                   {"text": "text", "num_results": "num_results"})
        ids = result.as_numpy("ids").reshape(-1)
        scores = result.as_numpy("scores").reshape(-1)
        texts = result.as_numpy("texts").reshape(-1)
        return [Hit(int(i), float(s), t.decode("utf-8"))
                for i, s, t in zip(ids, scores, texts, strict=True)]

    async def _infer(self, model: str, inputs: list[grpcclient.InferInput],
                     outputs: list[str], fields: dict[str, str]) -> grpcclient.InferResult:
        try:
            return await self.client.infer(
                model, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
        except InferenceServerException as err:
            raise triton_error(err, fields) from None
