"""A small asyncio load generator: closed loop at a concurrency, open loop at a rate.

Every request is recorded as a :class:`Sample`: when it was sent, how long it took,
and the status it ended with, as an HTTP code for every protocol (gRPC UNAVAILABLE is
counted as 503, INVALID_ARGUMENT as 400, a client-side timeout as 598 and any other
failure as 599). A 200 whose payload is not a full answer is counted as 299, so that
"nothing accepted is lost" can be checked from the samples alone.

Clients are async context managers with one method, ``send(text) -> status``; they
share nothing but that, so the Triton endpoints and the FastAPI baseline are driven
by the very same loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import numpy as np

OK = 200
BAD_PAYLOAD = 299
REJECTED = 503
TIMED_OUT = 598
OTHER_ERROR = 599

_GRPC_STATUS = {
    "StatusCode.UNAVAILABLE": REJECTED,
    "StatusCode.INVALID_ARGUMENT": 400,
    "StatusCode.DEADLINE_EXCEEDED": 504,
    "StatusCode.NOT_FOUND": 404,
}


class Client(Protocol):
    """Something that sends one query and says how it ended."""

    name: str

    async def __aenter__(self) -> Client: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def send(self, text: str) -> int: ...


@dataclass(frozen=True)
class Sample:
    """One request: seconds since the run began, latency in seconds, final status."""

    start: float
    latency: float
    status: int


@dataclass
class Run:
    """The samples of one load run, with the window they were taken in."""

    samples: list[Sample] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    offered_rate: float | None = None

    def in_window(self) -> list[Sample]:
        """Requests that completed inside the window: what throughput counts."""
        start, end = self.window
        return [s for s in self.samples if start <= s.start + s.latency <= end]

    def summary(self) -> dict[str, Any]:
        """Latency percentiles (ms) of 200s and 503s, status counts, throughput."""
        window = self.in_window()
        seconds = max(self.window[1] - self.window[0], 1e-9)
        ok = [s.latency for s in window if s.status == OK]
        rejected = [s.latency for s in window if s.status == REJECTED]
        statuses: dict[str, int] = {}
        for s in self.samples:
            statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        return {
            "requests": len(self.samples),
            "measured": len(window),
            "seconds": round(seconds, 3),
            "throughput_qps": round(len(ok) / seconds, 2),
            "statuses": statuses,
            "latency_ms": percentiles(ok),
            "reject_latency_ms": percentiles(rejected),
            **({"offered_rate_qps": round(self.offered_rate, 2)}
               if self.offered_rate is not None else {}),
        }


def percentiles(latencies: Sequence[float]) -> dict[str, float] | None:
    """p50, p90, p99, mean and max of latencies given in seconds, in milliseconds."""
    if not latencies:
        return None
    ms = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "mean": round(float(ms.mean()), 3),
            "max": round(float(ms.max()), 3), "count": len(ms)}


async def _timed(client: Client, text: str, timeout: float, t0: float) -> Sample:
    started = time.perf_counter()
    try:
        status = await asyncio.wait_for(client.send(text), timeout)
    except TimeoutError:
        status = TIMED_OUT
    except Exception:  # a transport error is a lost request, recorded as such
        status = OTHER_ERROR
    return Sample(started - t0, time.perf_counter() - started, status)


async def closed_loop(
    client: Client,
    texts: Sequence[str],
    concurrency: int,
    *,
    duration: float | None = None,
    count: int | None = None,
    warmup: float = 0.0,
    timeout: float = 60.0,
    backoff: float = 0.0,
) -> Run:
    """``concurrency`` clients, each sending its next query as soon as the last answered.

    Runs for ``warmup + duration`` seconds, or until ``count`` requests are done
    (then every request is measured). Queries are taken in order, round robin. A client
    whose request was refused waits ``backoff`` seconds before the next, as a polite
    client does; without it, refused clients retry in a tight loop.
    """
    if (duration is None) == (count is None):
        raise ValueError("give exactly one of duration or count")
    run = Run()
    order = itertools.count()
    t0 = time.perf_counter()
    stop_at = warmup + duration if duration is not None else float("inf")

    async def worker() -> None:
        while True:
            i = next(order)
            if count is not None and i >= count:
                return
            if time.perf_counter() - t0 >= stop_at:
                return
            sample = await _timed(client, texts[i % len(texts)], timeout, t0)
            run.samples.append(sample)
            if backoff and sample.status != OK:
                await asyncio.sleep(backoff)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    end = time.perf_counter() - t0
    run.window = (warmup, min(stop_at, end)) if duration is not None else (0.0, end)
    return run


async def open_loop(
    client: Client,
    texts: Sequence[str],
    rate: float,
    duration: float,
    *,
    timeout: float = 30.0,
) -> Run:
    """Send at ``rate`` requests per second, whatever the answers, for ``duration`` seconds.

    Arrivals are evenly spaced; when the event loop falls behind, the requests that are
    due go out together, and the rate actually offered is recorded. Every request is
    awaited to the end (or ``timeout``), so none goes unaccounted.
    """
    run = Run()
    total = max(1, int(rate * duration))
    tasks: list[asyncio.Task[Sample]] = []
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter() - t0
        due = min(total, int(now * rate) + 1)
        while sent < due:
            tasks.append(asyncio.create_task(
                _timed(client, texts[sent % len(texts)], timeout, t0)))
            sent += 1
        await asyncio.sleep(max(0.0, sent / rate - (time.perf_counter() - t0)))
    last_send = time.perf_counter() - t0
    run.samples = list(await asyncio.gather(*tasks))
    run.window = (0.0, time.perf_counter() - t0)
    run.offered_rate = total / max(last_send, 1e-9)
    return run


# --- clients -----------------------------------------------------------------------------


class _HttpSession:
    """One aiohttp session per ``async with``, with no limit on open connections.

    The HTTP clients share it so that a load run's concurrency, not the connector's pool,
    decides how many requests are in flight.
    """

    _session: Any = None

    async def __aenter__(self) -> Self:
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()


class GenerateClient(_HttpSession):
    """JSON over HTTP: Triton's ``/v2/models/<m>/generate``, or the FastAPI baseline."""

    def __init__(self, url: str, num_results: int, name: str = "http-generate") -> None:
        self.url, self.num_results, self.name = url, num_results, name

    async def send(self, text: str) -> int:
        body = {"text": text, "num_results": self.num_results}
        async with self._session.post(self.url, json=body) as response:
            if response.status != OK:
                await response.read()
                return response.status
            answer = await response.json(content_type=None)
        complete = len(answer.get("ids", ())) == self.num_results == len(answer.get("texts", ()))
        return OK if complete else BAD_PAYLOAD


class EmbeddingClient(_HttpSession):
    """One text's embedding over HTTP: Triton's ``<name>_embedding`` or Infinity's API.

    ``model`` set: Infinity's OpenAI-style ``/embeddings`` (``{"model", "input": [text]}``);
    unset: Triton's ``generate`` (``{"text"}``). Either way a 200 must carry one vector of
    ``dim`` numbers, or it counts as a bad payload.
    """

    def __init__(self, url: str, dim: int, model: str | None = None,
                 name: str = "http-embedding") -> None:
        self.url, self.dim, self.model, self.name = url, dim, model, name

    async def send(self, text: str) -> int:
        body: dict[str, Any] = ({"text": text} if self.model is None
                                else {"model": self.model, "input": [text]})
        async with self._session.post(self.url, json=body) as response:
            if response.status != OK:
                await response.read()
                return response.status
            answer = await response.json(content_type=None)
        if self.model is None:
            vector = answer.get("embedding", ())
        else:
            data = answer.get("data") or [{}]
            vector = data[0].get("embedding", ()) if len(data) == 1 else ()
        return OK if len(vector) == self.dim else BAD_PAYLOAD


def _search_inputs(module: Any, text: str, num_results: int) -> list[Any]:
    query = module.InferInput("text", [1, 1], "BYTES")
    query.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    k = module.InferInput("num_results", [1, 1], "INT32")
    k.set_data_from_numpy(np.array([[num_results]], dtype=np.int32))
    return [query, k]


class _InferClient:
    """Triton's KServe v2 infer call through a ``tritonclient`` aio client.

    Subclasses name the protocol's client module and how its errors map to a status.
    """

    name = ""

    def __init__(self, url: str, model: str, num_results: int) -> None:
        self.url, self.model, self.num_results = url, model, num_results
        self._client: Any = None
        self._module: Any = None

    def _connect(self) -> tuple[Any, Any]:
        """The protocol's aio module and a client connected to ``self.url``."""
        raise NotImplementedError

    @staticmethod
    def _status(err: Any) -> int:
        """An HTTP-like status for a ``tritonclient`` error."""
        raise NotImplementedError

    async def __aenter__(self) -> _InferClient:
        self._module, self._client = self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    async def send(self, text: str) -> int:
        from tritonclient.utils import InferenceServerException

        try:
            result = await self._client.infer(
                self.model, _search_inputs(self._module, text, self.num_results))
        except InferenceServerException as err:
            return self._status(err)
        ids = result.as_numpy("ids")
        return OK if ids is not None and ids.shape == (1, self.num_results) else BAD_PAYLOAD


class HttpInferClient(_InferClient):
    """Triton's KServe v2 ``/infer`` over HTTP, with ``tritonclient.http.aio``."""

    name = "http-infer"

    def _connect(self) -> tuple[Any, Any]:
        import tritonclient.http.aio as httpaio

        return httpaio, httpaio.InferenceServerClient(self.url, conn_limit=1000)

    @staticmethod
    def _status(err: Any) -> int:
        return int(err.status()) if str(err.status()).isdigit() else OTHER_ERROR


class GrpcInferClient(_InferClient):
    """Triton's gRPC ``ModelInfer``, with ``tritonclient.grpc.aio``."""

    name = "grpc-infer"

    def _connect(self) -> tuple[Any, Any]:
        import tritonclient.grpc.aio as grpcaio

        return grpcaio, grpcaio.InferenceServerClient(self.url)

    @staticmethod
    def _status(err: Any) -> int:
        return _GRPC_STATUS.get(str(err.status()), OTHER_ERROR)


# --- streamed generation (S4) ------------------------------------------------------------


@dataclass
class Stream:
    """One streamed generation: when it was sent and when each event arrived.

    Times are seconds since the run began. ``status`` is None while the stream is open
    (a stream cut at the end of a run keeps None); ``completion_tokens`` is what the
    last event reports, the end-of-sequence token included.
    """

    start: float
    events: list[float] = field(default_factory=list)
    status: int | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None

    def token_times(self) -> list[float]:
        """When each generated token reached the client.

        Events normally carry one token each; a token that completes no character yet
        travels with the next one, and the count on the last event says how many there
        were, so the surplus is put on the last event.
        """
        times = list(self.events)
        if self.completion_tokens is not None and times:
            times += [times[-1]] * max(0, self.completion_tokens - len(times))
        return times


class GenerateStreamClient(_HttpSession):
    """Triton's ``/v2/models/<m>/generate_stream``: server-sent events, one per delta."""

    name = "http-generate-stream"

    def __init__(self, url: str) -> None:
        self.url = url

    async def get_text(self, url: str) -> str:
        async with self._session.get(url) as response:
            return str(await response.text())

    async def stream(self, body: dict[str, Any], record: Stream, t0: float) -> None:
        """Send ``body`` and fill ``record`` as events arrive, until the last one."""
        import json

        async with self._session.post(self.url, json=body) as response:
            if response.status != OK:
                await response.read()
                record.status = response.status
                return
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                now = time.perf_counter() - t0
                event = json.loads(line[6:])
                if "error" in event:
                    record.status = OTHER_ERROR
                    return
                record.events.append(now)
                if event.get("finish_reason"):
                    record.finish_reason = str(event["finish_reason"])
                    record.completion_tokens = int(event["completion_tokens"])
                    record.prompt_tokens = int(event["prompt_tokens"])
                    record.status = OK
                    return
        record.status = BAD_PAYLOAD  # the stream ended without a last event


class ChatStreamClient(GenerateStreamClient):
    """An OpenAI server's ``/v1/chat/completions`` (vLLM), streamed, for the same bodies.

    Takes the Triton ``generate_stream`` body S4 sends (``text_input``, ``max_tokens``,
    sampling parameters, ``seed``) and sends it as one user message, so that the server
    applies the model's chat template as ours does (or as the chat messages it carries,
    with its ``response_format``: AGENTS); token counts come from the usage chunk at the
    end.
    """

    name = "openai-chat-stream"

    def __init__(self, url: str, model: str, defaults: dict[str, Any] | None = None) -> None:
        super().__init__(url.rstrip("/") + "/v1/chat/completions")
        self.model = model
        self.defaults = dict(defaults or {})
        """Sampling parameters the body leaves out: our service's defaults, not vLLM's."""

    async def stream(self, body: dict[str, Any], record: Stream, t0: float) -> None:
        import json

        # Chat messages (``prompt_format`` "messages") and ``response_format`` come as
        # JSON text in a Triton body; OpenAI's API takes them as JSON values.
        messages = (json.loads(body["text_input"]) if body.get("prompt_format") == "messages"
                    else [{"role": "user", "content": body["text_input"]}])
        request = {**self.defaults, "model": self.model, "stream": True,
                   "stream_options": {"include_usage": True}, "messages": messages,
                   **{k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k",
                                           "seed") if k in body},
                   **({"response_format": json.loads(body["response_format"])}
                      if "response_format" in body else {})}
        async with self._session.post(self.url, json=request) as response:
            if response.status != OK:
                await response.read()
                record.status = response.status
                return
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    break
                now = time.perf_counter() - t0
                event = json.loads(line[6:])
                if "error" in event:
                    record.status = OTHER_ERROR
                    return
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        record.events.append(now)
                    if choice.get("finish_reason"):
                        record.finish_reason = str(choice["finish_reason"])
                usage = event.get("usage")
                if usage:
                    record.completion_tokens = int(usage["completion_tokens"])
                    record.prompt_tokens = int(usage["prompt_tokens"])
        record.status = OK if record.completion_tokens is not None else BAD_PAYLOAD


@dataclass
class StreamRun:
    """The streams of one closed-loop level and the window they were measured in."""

    streams: list[Stream] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    scrapes: list[str] = field(default_factory=list)
    """The server's metrics page at the start and at the end of the window."""

    def summary(self) -> dict[str, Any]:
        """Aggregate tokens/s, time to first token and inter-token latency in the window.

        Sampled by when things happened: tokens that arrived in the window, first tokens
        that arrived in it (their wait may have begun before), gaps that ended in it.
        """
        start, end = self.window
        seconds = max(end - start, 1e-9)
        tokens = sum(start <= t <= end for s in self.streams for t in s.token_times())
        ttft = [s.events[0] - s.start for s in self.streams
                if s.events and start <= s.events[0] <= end]
        gaps = [b - a for s in self.streams for a, b in itertools.pairwise(s.events)
                if start <= b <= end]
        finished = [s for s in self.streams if s.status is not None]
        statuses: dict[str, int] = {}
        for s in finished:
            statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        done = [s for s in finished if s.status == OK]
        return {
            "requests": len(self.streams),
            "finished": len(finished),
            "cut_at_end": len(self.streams) - len(finished),
            "statuses": statuses,
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2),
            "ttft_ms": percentiles(ttft),
            "itl_ms": percentiles(gaps),
            "completion_tokens_mean": round(float(np.mean(
                [s.completion_tokens for s in done])), 1) if done else None,
            "prompt_tokens_mean": round(float(np.mean(
                [s.prompt_tokens for s in done])), 1) if done else None,
            "finish_reasons": {reason: sum(s.finish_reason == reason for s in done)
                               for reason in sorted({s.finish_reason or "" for s in done})},
        }


async def stream_closed_loop(
    client: GenerateStreamClient,
    bodies: Callable[[int], dict[str, Any]],
    concurrency: int,
    *,
    duration: float,
    warmup: float,
    metrics_url: str | None = None,
) -> StreamRun:
    """``concurrency`` streams, each sending its next request when the last one ended.

    ``bodies(i)`` gives the i-th request's JSON. After ``warmup`` seconds the window
    opens for ``duration`` seconds (the metrics page is read at both ends); then every
    open stream is cut (the server cancels it when the client goes away).
    """
    run = StreamRun()
    order = itertools.count()
    t0 = time.perf_counter()

    async def worker() -> None:
        while True:
            record = Stream(time.perf_counter() - t0)
            run.streams.append(record)
            try:
                await client.stream(bodies(next(order)), record, t0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a transport error is a lost stream, recorded as such
                record.status = OTHER_ERROR
            if record.status != OK:
                await asyncio.sleep(0.05)  # no tight loop against a failing server

    async def scrape() -> None:
        if metrics_url:
            run.scrapes.append(await client.get_text(metrics_url))

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(max(0.0, warmup - (time.perf_counter() - t0)))
        opened = time.perf_counter() - t0
        await scrape()
        await asyncio.sleep(max(0.0, warmup + duration - (time.perf_counter() - t0)))
        await scrape()
        run.window = (opened, time.perf_counter() - t0)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return run
