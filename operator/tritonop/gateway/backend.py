"""Talking to Triton: generation over gRPC streams, search and embeddings over HTTP/1.1.

Generation uses tritonclient's gRPC asyncio client, whose bidirectional stream carries the
tokens and lets a client that leaves cancel the request in the engine. Search and
embeddings are one request and one reply each, sent as JSON on kept-alive HTTP/1.1
connections (:mod:`tritonop.gateway.http1`): on search the gateway's CPU time is what
it costs next to Triton, and that client spends about a quarter of the CPU time that
tritonclient's gRPC client did per call.

Each call turns a validated request into Triton inputs and Triton's answer into plain
Python values; Triton's errors become :class:`APIError` with the client's field names.
What only an operator should read (Triton's address, its own or Python's error text) goes
to the log, never into an answer. Every call has a timeout: a hung model answers 504 and
its request is cancelled, instead of holding an admission place for ever.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from tritonop.gateway.errors import APIError
from tritonop.gateway.http1 import HTTPPool, Reply
from tritonop.gateway.protocol import GenerationArgs

log = logging.getLogger(__name__)

# Only numeric inputs that the protocol module has already range-checked.
SAMPLING_TYPES = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32),
                  "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
                  "repetition_penalty": ("FP32", np.float32),
                  "repeat_last_n": ("INT32", np.int32), "seed": ("UINT64", np.uint64)}
_FIELD = re.compile(r"^(?:in ensemble '[^']*', )?([A-Za-z_][\w.\[\]]*): (.*)$", re.S)
# Triton's binary output datatypes as numpy reads them (little-endian, as Triton sends).
_NUMPY = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4",
          "INT8": "i1", "UINT8": "u1", "BOOL": "?"}


@dataclass(frozen=True)
class TritonAddress:
    """Where the gateway reaches Triton: ``host:port`` of its gRPC and HTTP endpoints."""

    grpc: str = "localhost:8001"
    http: str = "localhost:8000"


@dataclass(frozen=True)
class Piece:
    """One response of the LLM model: new text, and on the last one why it ended.

    ``logprobs`` are the entries of the response's tokens in OpenAI's chat shape (``token``,
    ``logprob``, ``bytes``, ``top_logprobs``) when the request asked for them, else None.
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None


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
    """A gRPC error from Triton as the client should see it (see :func:`classify`)."""
    status = err.status() or ""
    return classify(err.message() or str(err), fields,
                    unavailable="UNAVAILABLE" in status, invalid="INVALID_ARGUMENT" in status)


def http_error(reply: Reply, fields: dict[str, str]) -> APIError:
    """An HTTP error reply from Triton (``{"error": message}``) as the client should see it."""
    try:
        message = str(json.loads(reply.body)["error"])
    except (ValueError, KeyError, TypeError):
        message = reply.body[:500].decode("utf-8", "replace") or f"HTTP {reply.status}"
    return classify(message, fields, unavailable=reply.status == 503,
                    invalid=reply.status == 400)


def classify(message: str, fields: dict[str, str], *, unavailable: bool,
             invalid: bool) -> APIError:
    """A Triton error as the client should see it, with Triton's input names translated.

    Args:
        message: Triton's error message.
        fields: Triton input name -> the request field the client knows it as.
        unavailable: Triton said the model cannot take it now (queue full, not ready).
        invalid: Triton said the request itself is wrong.
    """
    if unavailable or "at capacity" in message or "queue size" in message:
        log.info("Triton cannot take a request now: %s", message)
        return APIError(503, "the model is at capacity, retry later", code="model_busy",
                        retry_after=1)
    match = _FIELD.match(message)
    if match and (match.group(1) in fields or invalid):
        field = fields.get(match.group(1), match.group(1))
        return APIError(400, f"{field}: {match.group(2)}", param=field, code="invalid_value")
    if invalid:
        return APIError(400, message, code="invalid_value")
    log.warning("Triton failed a request: %s", message)
    return upstream_failed()


def upstream_failed() -> APIError:
    """502 without Triton's own words, which the log has."""
    return APIError(502, "the model failed to answer this request; the gateway's log says "
                    "why", code="upstream_error")


def unreachable(err: Exception) -> APIError:
    """503 for a Triton that cannot be reached; where it is goes to the log only."""
    log.warning("Triton is not reachable: %s", err)
    return APIError(503, "the model server is not reachable, retry shortly",
                    code="model_not_ready", retry_after=1)


def timed_out(seconds: float) -> APIError:
    """504 for a call to Triton that took longer than the model's ``tritonTimeoutSeconds``."""
    return APIError(504, f"the model did not answer within {seconds:g} s "
                    "(tritonTimeoutSeconds); the request was cancelled",
                    code="upstream_timeout")


def rpc_error(err: grpc.RpcError) -> APIError:
    """A gRPC failure of the stream itself (not a response of the model's)."""
    code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return unreachable(err)
    log.warning("gRPC stream to Triton failed: %s", err)
    return upstream_failed()


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
    """The gateway's connections to Triton: one gRPC channel (HTTP/2 multiplexes every
    stream) and a pool of kept-alive HTTP/1.1 connections."""

    def __init__(self, address: TritonAddress) -> None:
        self.address = address
        self.client = grpcclient.InferenceServerClient(address.grpc)
        self.http = HTTPPool(address.http)
        self._ids = itertools.count()

    async def close(self) -> None:
        self.http.close()
        await self.client.close()

    async def ready(self, models: Sequence[str]) -> dict[str, bool]:
        """Which models Triton reports ready; all False when Triton itself is not."""
        try:
            async with asyncio.timeout(2):
                if (await self.http.request("GET", "/v2/health/ready")).status != 200:
                    return dict.fromkeys(models, False)
                return {m: (await self.http.request("GET", f"/v2/models/{m}/ready")).status
                        == 200 for m in models}
        except (ConnectionError, TimeoutError):  # Triton down or starting: asked again soon
            return dict.fromkeys(models, False)

    async def generate(self, args: GenerationArgs, fields: dict[str, str],
                       timeout: float | None = None) -> AsyncIterator[Piece]:
        """Stream the LLM model's responses; leaving early cancels the request in Triton.

        Args:
            args: the validated request.
            fields: Triton input name -> the request field the client knows it as.
            timeout: the longest wait for the next response (the first one included);
                beyond it the request is cancelled and the caller gets a 504.
        """
        inputs = [_bytes_input("text_input", [args.prompt], [1, 1]),
                  _bytes_input("prompt_format", [args.prompt_format], [1, 1]),
                  _scalar_input("stream", args.stream, "BOOL", np.bool_)]
        for name, value in args.sampling.items():
            datatype, dtype = SAMPLING_TYPES[name]
            inputs.append(_scalar_input(name, value, datatype, dtype))
        if args.stop:
            inputs.append(_bytes_input("stop", args.stop, [1, len(args.stop)]))
        if args.response_format is not None:
            inputs.append(_bytes_input("response_format", [args.response_format], [1, 1]))
        if args.logprobs is not None:
            inputs.append(_scalar_input("logprobs", args.logprobs, "INT32", np.int32))
        request = {"model_name": args.model, "inputs": inputs,
                   "request_id": str(next(self._ids))}

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield request

        stream = self.client.stream_infer(requests())
        closed = False  # Triton ended the stream itself: nothing to cancel
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(stream.__anext__(), timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:  # not TimeoutError: they differ before 3.11
                    assert timeout is not None
                    raise timed_out(timeout) from None
                if error is not None:  # an error is the request's last response
                    closed = await _read_to_end(stream)
                    raise triton_error(error, fields)
                reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
                piece = Piece(result.as_numpy("text_output").reshape(-1)[0].decode("utf-8"),
                              reason or None,
                              int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                              int(result.as_numpy("completion_tokens").reshape(-1)[0]),
                              _logprobs(result) if args.logprobs is not None else None)
                if reason:
                    closed = await _read_to_end(stream)
                    yield piece
                    return
                yield piece
        except InferenceServerException as err:
            raise triton_error(err, fields) from None
        except grpc.RpcError as err:
            raise rpc_error(err) from None
        finally:
            if not closed:  # the client left mid-request: free the engine's slot now
                stream.cancel()

    async def embed(self, model: str, texts: Sequence[str], timeout: float | None = None
                    ) -> tuple[np.ndarray, list[int]]:
        """Embeddings of ``texts`` (one Triton request) and each text's token count.

        The outputs come back as binary data after the JSON header (Triton's binary
        tensor extension): a float written out as JSON text costs more than the rest.
        """
        body = {"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES",
                            "data": list(texts)}],
                "outputs": [{"name": name, "parameters": {"binary_data": True}}
                            for name in ("embedding", "attention_mask")]}
        reply = await self._post(f"/v2/models/{model}_embedding/infer", body,
                                 {"text": "input"}, timeout)
        outputs = _binary_outputs(reply)
        mask = outputs["attention_mask"]
        return outputs["embedding"], [int(row.sum()) for row in mask]

    async def search(self, model: str, texts: Sequence[str], num_results: int,
                     timeout: float | None = None, search_filter: str | None = None
                     ) -> list[list[Hit]]:
        """The search ensemble's answers to ``texts`` (one Triton request), best first.

        All rows share ``num_results`` and ``search_filter`` (JSON text), as the search
        model takes one value of each per request; under a filter a row may get fewer.
        """
        rows = len(texts)
        inputs = [
            {"name": "text", "shape": [rows, 1], "datatype": "BYTES", "data": list(texts)},
            {"name": "num_results", "shape": [rows, 1], "datatype": "INT32",
             "data": [num_results] * rows}]
        if search_filter is not None:
            inputs.append({"name": "filter", "shape": [rows, 1], "datatype": "BYTES",
                           "data": [search_filter] * rows})
        reply = await self._post(f"/v2/models/{model}/infer", {"inputs": inputs},
                                 {"text": "text", "num_results": "num_results",
                                  "filter": "filter"}, timeout)
        outputs = {o["name"]: o.get("data", []) for o in json.loads(reply.body)["outputs"]}
        k = len(outputs["ids"]) // rows
        return [[Hit(int(i), float(s), t) for i, s, t in zip(
            outputs["ids"][r * k:(r + 1) * k], outputs["scores"][r * k:(r + 1) * k],
            outputs["texts"][r * k:(r + 1) * k], strict=True)] for r in range(rows)]

    async def rerank(self, model: str, query: str, documents: Sequence[str],
                     timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The cross-encoder's score of each (query, document) pair (one Triton request to
        ``<model>_rerank``) and each pair's token count."""
        body = {"inputs": [
            {"name": "query", "shape": [1, 1], "datatype": "BYTES", "data": [query]},
            {"name": "documents", "shape": [1, len(documents)], "datatype": "BYTES",
             "data": list(documents)}],
            "outputs": [{"name": name, "parameters": {"binary_data": True}}
                        for name in ("scores", "tokens")]}
        reply = await self._post(f"/v2/models/{model}_rerank/infer", body,
                                 {"query": "query", "documents": "documents"}, timeout)
        outputs = _binary_outputs(reply)
        return outputs["scores"].reshape(-1), outputs["tokens"].reshape(-1)

    async def _post(self, path: str, body: dict[str, object], fields: dict[str, str],
                    timeout: float | None) -> Reply:
        """One infer call; past ``timeout`` its connection is closed, which is all the
        cancelling HTTP/1.1 offers (Triton finishes what it had started)."""
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            reply = await asyncio.wait_for(self.http.request("POST", path, payload), timeout)
        except ConnectionError as err:
            raise unreachable(err) from None
        except TimeoutError:
            assert timeout is not None
            raise timed_out(timeout) from None
        if reply.status != 200:
            raise http_error(reply, fields)
        return reply


def _logprobs(result: Any) -> list[dict[str, Any]]:
    """The ``logprobs`` output of one response: a JSON list of entries."""
    listed = result.as_numpy("logprobs")
    text = b"" if listed is None else listed.reshape(-1)[0]
    if not text:
        log.warning("the model sent no logprobs output; is its config from an older release?")
        raise upstream_failed()
    entries: list[dict[str, Any]] = json.loads(text)
    return entries


def _binary_outputs(reply: Reply) -> dict[str, np.ndarray]:
    """The tensors of an infer reply whose outputs all came as binary data."""
    size = int(reply.headers.get("inference-header-content-length", len(reply.body)))
    header = json.loads(reply.body[:size])
    tensors, offset = {}, size
    for output in header["outputs"]:
        length = output["parameters"]["binary_data_size"]
        dtype = np.dtype(_NUMPY[output["datatype"]])
        data = np.frombuffer(reply.body, dtype, length // dtype.itemsize, offset)
        tensors[output["name"]] = data.reshape(output["shape"])
        offset += length
    return tensors
