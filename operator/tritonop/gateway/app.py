"""The ASGI application: OpenAI routes over Triton, one admission bound per model.

Each route runs the same steps: parse and validate the body (415, 413 and 400 before
anything else), check that Triton serves the model (503), take an admission place (429 with
Retry-After when the model's bound is full), ask Triton (504 past the model's
``tritonTimeoutSeconds``), answer. A streamed answer keeps its place until the stream ends;
a client that leaves, or takes no data for ``streamStallSeconds``, cancels its Triton
request. A fault of the gateway itself is a 500 error object that names nothing inside.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tritonop.gateway import protocol
from tritonop.gateway import rerank as reranking
from tritonop.gateway.admission import AdmissionBound, Overloaded
from tritonop.gateway.auth import AccessLog, KeyStore, RequireKey, current_client
from tritonop.gateway.backend import Hit, Piece, TritonAddress, TritonBackend
from tritonop.gateway.batching import Coalescer
from tritonop.gateway.config import GatewayConfig
from tritonop.gateway.connections import StallGuard
from tritonop.gateway.errors import APIError, invalid
from tritonop.gateway.limits import ClientLimiter, Limited, TooWide
from tritonop.gateway.metrics import GatewayMetrics
from tritonop.gateway.tools import (
    AutoStream,
    CallStream,
    ToolUse,
    parse_auto,
    parse_calls,
    tool_call,
)
from tritonop_backend.rerank import cut_texts, rank

log = logging.getLogger(__name__)

READY_INTERVAL_SECONDS = 1.0
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}
# Triton input names as each route's clients know them, for error messages.
CHAT_FIELDS = {"text_input": "messages", "max_tokens": "max_tokens", "stop": "stop",
               "logprobs": "top_logprobs"}
COMPLETION_FIELDS = {"text_input": "prompt", "max_tokens": "max_tokens", "stop": "stop",
                     "logprobs": "logprobs"}
CANCELLED = "cancelled"  # the finish reason of a request the model server stopped
EMBEDDING_CHUNKS_IN_FLIGHT = 2
"""Triton requests one /v1/embeddings request has out at once, under its one admission
place: enough to overlap one chunk's transfer with another's work, and no more, so that a
long list cannot take the model from every other client."""
BODY_GAP_SECONDS = 30.0
"""The longest a request body may pause between two pieces before the request is refused."""


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def internal_error() -> APIError:
    """500 for a fault of the gateway: what went wrong is in the log, not in the answer."""
    return APIError(500, "internal error; the gateway's log has the details",
                    code="internal_error")


def cancelled() -> APIError:
    return APIError(503, "the model server stopped this request before it finished (it is "
                    "restarting or unloading the model); retry shortly", code=CANCELLED,
                    retry_after=1)


class ClosingStreamingResponse(StreamingResponse):
    """A streamed answer that runs ``on_close`` however it ends, sent or not, and ends
    early when its client takes no data for ``stall_seconds`` (:class:`StallGuard`)."""

    def __init__(self, content: AsyncIterator[str],
                 on_close: Callable[[], Awaitable[None]],
                 stall_seconds: float | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close
        self.stall_seconds = stall_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = None if self.stall_seconds is None else StallGuard.of(scope, self.stall_seconds)
        watch = None
        if guard is not None:
            send = guard.wrap(send)
            watch = asyncio.ensure_future(guard.watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            if watch is not None:
                watch.cancel()
            await self.on_close()


class Gateway:
    """State shared by the routes: models, their bounds, Triton, metrics, API keys."""

    def __init__(self, config: GatewayConfig, triton: TritonAddress,
                 keys: KeyStore | None = None) -> None:
        self.config = config
        self.keys = keys
        self.models = config.models
        self.triton = triton
        self.backend: TritonBackend | None = None
        self.searches: dict[str, Coalescer[list[Hit]]] = {}
        self.bounds = {name: AdmissionBound(m.admission.max_in_flight, m.admission.max_waiting)
                       for name, m in self.models.items()}
        self.client_limits = {
            name: ClientLimiter(m.client_limits, m.named_limits, m.admission.max_in_flight)
            for name, m in self.models.items()}
        self.metrics = GatewayMetrics()
        self.ready: dict[str, bool] = dict.fromkeys(self.models, False)
        self.created = int(time.time())
        self.draining = False
        """Set when the process is told to stop (server.GatewayServer): readiness fails at
        once, so that the pod leaves its Service's endpoints while requests are still served."""

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        self.backend = backend = TritonBackend(self.triton)
        self.searches = {
            name: Coalescer(functools.partial(_search_group, backend, name,
                                              entry.limits.triton_timeout_seconds),
                            entry.max_batch)
            for name, entry in self.models.items() if entry.kind == "embedding"}
        poller = asyncio.create_task(self._poll_ready())
        watcher = asyncio.create_task(self.keys.watch()) if self.keys is not None else None
        try:
            yield
        finally:
            poller.cancel()
            if watcher is not None:
                watcher.cancel()
            await self.backend.close()

    async def _poll_ready(self) -> None:
        while True:
            await self._refresh_ready()
            await asyncio.sleep(READY_INTERVAL_SECONDS)

    async def _refresh_ready(self) -> None:
        assert self.backend is not None
        self.ready = await self.backend.ready(list(self.models))

    async def _check_ready(self, model: str) -> None:
        if not self.ready.get(model):
            await self._refresh_ready()  # cheap, and a restarted Triton is served at once
        if not self.ready.get(model):
            raise APIError(503, f"model '{model}' is not ready in Triton yet; retry shortly",
                           code="model_not_ready", retry_after=1)

    async def _admit(self, model: str, places: int = 1) -> AdmissionBound:
        """Places for the current client's request (one per choice, at most the whole
        bound): its own limits first, then the bound."""
        client, limiter = current_client.get(), self.client_limits[model]
        try:
            limiter.admit(client, places)
        except TooWide as err:
            raise invalid("n", f"{places} choices hold {places} places at once; this API key "
                          f"may hold {err.share} (its maxInFlightShare)") from None
        except Limited as err:
            raise APIError(429, f"model '{model}': {err.message}; retry after "
                           f"{err.retry_after} s", code="rate_limit_exceeded",
                           retry_after=err.retry_after) from None
        bound = self.bounds[model]
        waiting = self.metrics.waiting.labels(model)
        waiting.inc()
        try:
            await bound.acquire(places)
        except Overloaded as err:
            limiter.leave(client, places)
            raise APIError(429, f"model '{model}' is at its admission bound ({err}); retry "
                           "shortly", code="too_many_requests", retry_after=1) from None
        except BaseException:
            limiter.leave(client, places)  # the client left while waiting
            raise
        finally:
            waiting.dec()
        self.metrics.in_flight.labels(model).inc()
        return bound

    def _leave(self, model: str, bound: AdmissionBound, places: int = 1) -> None:
        bound.release(places)
        self.client_limits[model].leave(current_client.get(), places)
        self.metrics.in_flight.labels(model).dec()

    def _used(self, model: str, tokens: int) -> None:
        """Tokens an answer cost, counted against the client's tokens per minute."""
        self.client_limits[model].used(current_client.get(), tokens)

    # Routes ---------------------------------------------------------------------------

    async def list_models(self, _: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            self._model_card(name) for name in self.models]})

    async def get_model(self, request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in self.models:
            return error_response(APIError(404, f"model: '{name}' does not exist",
                                           param="model", code="model_not_found"))
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict[str, Any]:
        entry = self.models[name]
        card = {"id": name, "object": "model", "created": self.created,
                "owned_by": "tritonop", "kind": entry.kind}
        if entry.search_index:  # which index a search model serves (its spec's)
            card["index"] = entry.search_index
        return card

    async def live(self, _: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readiness(self, _: Request) -> JSONResponse:
        if self.draining:  # liveness stays 200: a draining gateway is not to be restarted
            return JSONResponse({"ready": self.ready, "draining": True}, status_code=503)
        await self._refresh_ready()
        ok = all(self.ready.values())
        return JSONResponse({"ready": self.ready}, status_code=200 if ok else 503)

    async def prometheus(self, _: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        return await self._measured(request, "/v1/chat/completions", self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._measured(request, "/v1/completions", self._completions)

    async def embeddings(self, request: Request) -> Response:
        return await self._measured(request, "/v1/embeddings", self._embeddings)

    async def search(self, request: Request) -> Response:
        return await self._measured(request, "/v1/search", self._search)

    async def rerank(self, request: Request) -> Response:
        return await self._measured(request, reranking.ROUTE, self._rerank)

    async def _measured(self, request: Request, route: str,
                        handler: Callable[[Request, dict[str, Any]], Awaitable[Response]]
                        ) -> Response:
        """Parse the body, run ``handler``, count and time the answer, map errors."""
        started = time.perf_counter()
        model = "-"
        body_read = False
        try:
            protocol.check_content_type(request.headers.get("content-type"))
            raw = await read_body(request)
            body_read = True
            body = protocol.parse_json(raw)
            named = body.get("model")
            model = named if isinstance(named, str) and named in self.models else "-"
            response = await handler(request, body)
        except APIError as err:
            response = error_response(err)
        except ClientDisconnect:
            response = Response(status_code=499)  # nobody is listening any more
        except Exception:
            log.exception("gateway fault on %s", route)
            response = error_response(internal_error())
        if not body_read:  # the rest of the body is not worth reading: end the connection
            response.headers["Connection"] = "close"
        status = str(response.status_code)
        if isinstance(response, ClosingStreamingResponse):
            on_close = response.on_close

            async def finished() -> None:
                await on_close()
                self._record(route, model, status, started)

            response.on_close = finished
        else:
            self._record(route, model, status, started)
        return response

    def _record(self, route: str, model: str, status: str, started: float) -> None:
        self.metrics.requests.labels(route, model, status, current_client.get()).inc()
        self.metrics.latency.labels(route, model).observe(time.perf_counter() - started)

    async def _chat(self, request: Request, body: dict[str, Any]) -> Response:
        args = protocol.parse_chat(body, self.models)
        return await self._generate(request, args, "chat.completion", CHAT_FIELDS)

    async def _completions(self, request: Request, body: dict[str, Any]) -> Response:
        args = protocol.parse_completion(body, self.models)
        return await self._generate(request, args, "text_completion", COMPLETION_FIELDS)

    async def _generate(self, request: Request, args: protocol.GenerationArgs, kind: str,
                        fields: dict[str, str]) -> Response:
        """Run the request's ``n`` choices as Triton requests of their own, at once, under
        ``n`` admission places (at most the model's whole bound)."""
        await self._check_ready(args.model)
        places = args.n
        bound = await self._admit(args.model, places)
        started = time.perf_counter()
        assert self.backend is not None
        limits = self.models[args.model].limits
        streams = [FirstAwareIterator(self.backend.generate(
            args.choice(index), fields, limits.triton_timeout_seconds))
            for index in range(args.n)]

        async def close() -> None:
            for pieces in streams:
                await pieces.aclose()  # cancels the Triton request if it is still running
            self._leave(args.model, bound, places)

        handed_over = False
        try:
            if not args.stream:
                results = await until_disconnected(
                    request, gather_bounded(_collect, streams, len(streams)))
                if results is None:
                    return Response(status_code=499)  # nobody is listening any more
                if any(last.finish_reason == CANCELLED for _, last, _ in results):
                    raise cancelled()
                usage = _usage([last for _, last, _ in results])
                self._used(args.model, usage["total_tokens"])
                return JSONResponse(_completion_body(kind, args, results, usage))
            # The first responses before the headers: a prompt Triton refuses is still a 400.
            firsts = await until_disconnected(
                request, gather_bounded(FirstAwareIterator.next, streams, len(streams)))
            if firsts is None:
                return Response(status_code=499)
            if any(first is not None and first.finish_reason == CANCELLED for first in firsts):
                raise cancelled()
            events = self._sse(kind, args, firsts, streams, started)
            handed_over = True
            return ClosingStreamingResponse(events, close, limits.stream_stall_seconds)
        finally:
            if not handed_over:
                await close()

    async def _sse(self, kind: str, args: protocol.GenerationArgs, firsts: list[Piece | None],
                   streams: list[FirstAwareIterator], started: float) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; the
        choices' pieces are sent as they come, each chunk naming its choice's index."""
        ident, created = _ident(kind), int(time.time())
        chunk = "chat.completion.chunk" if kind == "chat.completion" else kind

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            body: dict[str, Any] = {"id": ident, "object": chunk, "created": created,
                                    "model": args.model,
                                    "choices": [] if choice is None else [choice]}
            if args.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        choices = [_StreamedChoice(index, kind, args.tools) for index in range(len(streams))]
        finals: list[Piece] = []
        last, seen_text = time.perf_counter(), False
        ttft = self.metrics.ttft.labels(args.model)
        itl = self.metrics.itl.labels(args.model)
        pending: dict[asyncio.Future[Piece | None], int] = {}
        try:
            if kind == "chat.completion":
                for choice in choices:
                    yield event(choice.opening())
            ready = list(enumerate(firsts))
            while ready or pending:
                if not ready:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    ready = sorted((pending.pop(task), task.result()) for task in done)
                for index, piece in ready:
                    if piece is None:
                        raise APIError(502, "Triton ended the stream without a final response",
                                       code="upstream_error")
                    if piece.text:
                        now = time.perf_counter()
                        (itl if seen_text else ttft).observe(
                            now - (last if seen_text else started))
                        seen_text, last = True, now
                    if piece.finish_reason == CANCELLED:
                        raise cancelled()
                    for body in choices[index].pieces(piece):
                        yield event(body)
                    if piece.finish_reason is None:
                        pending[asyncio.ensure_future(streams[index].next())] = index
                    else:
                        self._used(args.model, piece.completion_tokens
                                   + (0 if finals else piece.prompt_tokens))
                        finals.append(piece)
                ready = []
            if args.include_usage:
                yield event(None, _usage(finals))
        except APIError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        except Exception:
            log.exception("gateway fault in a stream of %s", args.model)
            yield f"data: {json.dumps(internal_error().body())}\n\n"
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for pieces in streams:
                await pieces.aclose()
        yield "data: [DONE]\n\n"

    async def _embeddings(self, request: Request, body: dict[str, Any]) -> Response:
        args = protocol.parse_embeddings(body, self.models)
        await self._check_ready(args.model)
        batch = self.models[args.model].max_batch
        chunks = [args.texts[i:i + batch] for i in range(0, len(args.texts), batch)]
        assert self.backend is not None
        embed = functools.partial(self.backend.embed, args.model,
                                  timeout=self.models[args.model].limits.triton_timeout_seconds)
        async with self._placed(args.model):  # a client that leaves stops the chunks
            results = await until_disconnected(
                request, gather_bounded(embed, chunks, EMBEDDING_CHUNKS_IN_FLIGHT))
        if results is None:
            return Response(status_code=499)
        vectors = np.concatenate([r[0] for r in results]).astype("<f4")
        tokens = sum(sum(r[1]) for r in results)
        self._used(args.model, tokens)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.tobytes()).decode() if args.base64
                               else v.tolist())} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": args.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _search(self, _: Request, body: dict[str, Any]) -> Response:
        args = protocol.parse_search(body, self.models)
        await self._check_ready(args.model)
        if args.rerank:
            return await self._reranked_search(args)
        async with self._placed(args.model):
            hits = await self.searches[args.model].submit(
                args.text, (args.num_results, args.filter))
        return JSONResponse({"object": "list", "model": args.model, "data": [
            {"id": h.id, "score": h.score, "text": h.text} for h in hits]})

    async def _reranked_search(self, args: protocol.SearchArgs) -> Response:
        """Search for the model's ``rerank.candidates``, re-score them with its
        cross-encoder, answer the best ``num_results``: ``score`` is the cross-encoder's,
        ``search_score`` the cosine. Both calls under one admission place."""
        entry = self.models[args.model]
        assert self.backend is not None
        async with self._placed(args.model):
            hits = await self.searches[args.model].submit(
                args.text, (reranking.candidates(entry, args.num_results), args.filter))
            if not hits:
                return JSONResponse({"object": "list", "model": args.model, "data": []})
            scores, tokens = await self.backend.rerank(  # corpus texts cut as Triton's are
                args.model, args.text,
                cut_texts([h.text for h in hits], entry.limits.max_input_characters),
                timeout=entry.limits.triton_timeout_seconds)
        self._used(args.model, int(tokens.sum()))
        return JSONResponse({"object": "list", "model": args.model, "data": [
            {"id": hits[i].id, "score": float(scores[i]), "search_score": hits[i].score,
             "text": hits[i].text} for i in rank(scores, args.num_results)]})

    async def _rerank(self, request: Request, body: dict[str, Any]) -> Response:
        args = reranking.parse_rerank(body, self.models)
        await self._check_ready(args.model)
        assert self.backend is not None
        async with self._placed(args.model):
            answer = await until_disconnected(request, self.backend.rerank(
                args.model, args.query, args.documents,
                timeout=self.models[args.model].limits.triton_timeout_seconds))
        if answer is None:
            return Response(status_code=499)
        scores, tokens = answer
        self._used(args.model, int(tokens.sum()))
        return JSONResponse(reranking.rerank_body(args, scores, tokens.tolist()))

    @asynccontextmanager
    async def _placed(self, model: str) -> AsyncIterator[None]:
        bound = await self._admit(model)
        try:
            yield
        finally:
            self._leave(model, bound)


async def _search_group(backend: TritonBackend, model: str, timeout: float,
                        texts: Sequence[str], key: tuple[int, str | None]) -> list[list[Hit]]:
    """One Triton search for the coalesced ``texts`` sharing ``key``: (count, filter)."""
    num_results, search_filter = key
    return await backend.search(model, texts, num_results, timeout=timeout,
                                search_filter=search_filter)


T = TypeVar("T")
R = TypeVar("R")


async def gather_bounded(call: Callable[[T], Awaitable[R]], items: list[T], limit: int
                         ) -> list[R]:
    """``call`` on every item, at most ``limit`` at once, results in order.

    The first failure cancels the calls still running and starts no more, and so does
    the caller's own cancellation: nothing is left running once this returns or raises.
    (A task group would cancel as well, but not bound how many run at once.)
    """
    results: list[Any] = [None] * len(items)
    queue = iter(enumerate(items))

    async def worker() -> None:
        for index, item in queue:
            results[index] = await call(item)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return results


async def read_body(request: Request) -> bytes:
    """The request's body, refused (413) as soon as it passes the limit, never buffered
    beyond it: a declared ``Content-Length`` is checked before a byte is read, and a body
    without one (chunked) is counted while it arrives.

    Raises:
        APIError: 413 above :data:`protocol.MAX_BODY_BYTES`, 408 for a body that pauses
            longer than :data:`BODY_GAP_SECONDS`.
        ClientDisconnect: the client left.
    """
    protocol.check_length(request.headers.get("content-length"))
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), BODY_GAP_SECONDS)
        except TimeoutError:
            raise APIError(408, f"body: no data for {BODY_GAP_SECONDS:g} s", param="body",
                           code="request_timeout") from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > protocol.MAX_BODY_BYTES:
            raise protocol.too_large(len(body))
        if not message.get("more_body", False):
            return bytes(body)


class FirstAwareIterator:
    """Pieces taken one at a time, so that the first is awaited before any header is sent."""

    def __init__(self, source: AsyncIterator[Piece]) -> None:
        self.source = source

    async def next(self) -> Piece | None:
        try:
            return await self.source.__anext__()
        except StopAsyncIteration:
            return None

    async def aclose(self) -> None:
        close = getattr(self.source, "aclose", None)
        if close is not None:
            await close()


async def _collect(pieces: FirstAwareIterator
                   ) -> tuple[str, Piece, list[dict[str, Any]] | None]:
    parts = []
    entries: list[dict[str, Any]] | None = None
    while (piece := await pieces.next()) is not None:
        parts.append(piece.text)
        if piece.logprobs is not None:
            entries = (entries or []) + piece.logprobs
        if piece.finish_reason is not None:
            return "".join(parts), piece, entries
    raise APIError(502, "Triton ended the stream without a final response",
                   code="upstream_error")


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _ident(kind: str) -> str:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(lasts: Sequence[Piece]) -> dict[str, int]:
    """The choices' usage: the prompt counted once (it is the same prompt), their
    completions summed."""
    prompt = lasts[0].prompt_tokens if lasts else 0
    completion = sum(last.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _completion_body(kind: str, args: protocol.GenerationArgs,
                     results: Sequence[tuple[str, Piece, list[dict[str, Any]] | None]],
                     usage: dict[str, int]) -> dict[str, Any]:
    choices = []
    for index, (text, last, entries) in enumerate(results):
        reason = FINISH_REASONS.get(last.finish_reason or "", last.finish_reason)
        if kind == "chat.completion":
            message, reason = _message(text, reason, args.tools)
            choices.append({"index": index, "message": message, "finish_reason": reason,
                            "logprobs": _chat_logprobs(entries)})
        else:
            choices.append({"index": index, "text": text, "finish_reason": reason,
                            "logprobs": _completion_logprobs(entries, 0)})
    return {"id": _ident(kind), "object": kind, "created": int(time.time()),
            "model": args.model, "choices": choices, "usage": usage}


def _message(text: str, reason: str | None, tools: ToolUse | None
             ) -> tuple[dict[str, Any], str | None]:
    """The assistant's message and finish reason: its calls when the tools were offered and
    the answer, complete, is calls (:mod:`tritonop.gateway.tools`), else its text."""
    plain = {"role": "assistant", "content": text}
    if tools is None or not tools.names or reason != "stop":
        return plain, reason
    if tools.constrained:
        content, calls = None, parse_calls(text, tools.names) or []
    else:
        content, calls = parse_auto(text, tools.names)
    if not calls:
        return plain, reason
    return {"role": "assistant", "content": content,
            "tool_calls": [tool_call(None, name, arguments) for name, arguments in calls]
            }, "tool_calls"


class _StreamedChoice:
    """One choice of a stream: its chunks' ``choices`` entries, piece by piece."""

    def __init__(self, index: int, kind: str, tools: ToolUse | None) -> None:
        self.index = index
        self.chat = kind == "chat.completion"
        self.offset = 0
        self.calls: CallStream | AutoStream | None = None
        if self.chat and tools is not None and tools.names:
            self.calls = (CallStream if tools.constrained else AutoStream)(tools.names)

    def opening(self) -> dict[str, Any]:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""},
                "finish_reason": None, "logprobs": None}

    def pieces(self, piece: Piece) -> list[dict[str, Any]]:
        """The entries one response gives: its text (or deltas of calls), then the end."""
        entries = piece.logprobs
        bodies = []
        if piece.text:
            deltas = ([{"content": piece.text}] if self.calls is None
                      else self.calls.push(piece.text))
            if not deltas and entries:
                deltas = [{}]  # held text: its log probabilities still go out now
            for delta in deltas:
                bodies.append(self._entry(delta, piece.text, None, entries))
                entries = None
        if piece.finish_reason is not None:
            reason = FINISH_REASONS.get(piece.finish_reason, piece.finish_reason)
            if self.calls is not None:
                deltas, is_call = self.calls.finish()
                for delta in deltas:
                    bodies.append(self._entry(delta, "", None, None))
                if is_call and reason == "stop":
                    reason = "tool_calls"
            left = entries if not piece.text else None  # sent with its text
            bodies.append(self._entry({} if self.chat else None, "", reason, left))
        return bodies

    def _entry(self, delta: dict[str, Any] | None, text: str, reason: str | None,
               entries: list[dict[str, Any]] | None) -> dict[str, Any]:
        if self.chat:
            return {"index": self.index, "delta": delta, "finish_reason": reason,
                    "logprobs": _chat_logprobs(entries)}
        listed = _completion_logprobs(entries, self.offset)
        self.offset += len(text)
        return {"index": self.index, "text": text, "finish_reason": reason, "logprobs": listed}


def _chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat's ``logprobs`` object: the model's entries as they are (see ``Piece``)."""
    return None if entries is None else {"content": entries, "refusal": None}


def _completion_logprobs(entries: list[dict[str, Any]] | None,
                         offset: int) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, ``top_logprobs`` as token -> logprob
    dicts (empty for ``logprobs: 0``), ``text_offset`` counted from ``offset`` in characters
    of the tokens' text."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top_logprobs"]}
                             for entry in entries],
            "text_offset": offsets}


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "no such route; the API is under /v1 (GET /v1/models lists the models)",
               405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
    return error_response(APIError(exc.status_code, message, code="invalid_route"))


async def _server_error(request: Request, exc: Exception) -> Response:
    """A fault outside the routes' own handling (a middleware's): logged, counted, and
    answered without its text or class, which would tell a client what runs inside."""
    log.exception("gateway fault", exc_info=exc)
    gateway = request.app.state.gateway
    gateway._record("-", "-", "500", time.perf_counter())
    return error_response(internal_error())


def create_app(config: GatewayConfig, triton: TritonAddress, api_key: str | None = None
               ) -> Starlette:
    """The gateway for ``config``'s models in front of Triton's gRPC and HTTP endpoints.

    With ``config.api_keys`` or ``api_key`` (the client ``default``), every route but
    ``/health/*`` (and ``/metrics`` unless ``config.protect_metrics``) needs a key.

    Raises:
        KeyStoreError: when the keys folder cannot be read.
    """
    keys = None
    if config.api_keys is not None or api_key is not None:
        keys = KeyStore(Path(config.api_keys) if config.api_keys else None, api_key)
    gateway = Gateway(config, triton, keys)
    routes = [
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", gateway.get_model, methods=["GET"]),
        Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
        Route("/v1/search", gateway.search, methods=["POST"]),
        Route(reranking.ROUTE, gateway.rerank, methods=["POST"]),
        Route("/health/live", gateway.live, methods=["GET"]),
        Route("/health/ready", gateway.readiness, methods=["GET"]),
        Route("/metrics", gateway.prometheus, methods=["GET"]),
    ]
    # Outermost first: the access log sees every answer, 401s included.
    middleware = [Middleware(AccessLog),
                  Middleware(RequireKey, keys=keys, protect_metrics=config.protect_metrics,
                             on_refused=gateway.metrics.unauthorized.inc)]
    app = Starlette(routes=routes, lifespan=gateway.lifespan, middleware=middleware,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.gateway = gateway
    return app
