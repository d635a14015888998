"""How the gateway ends its gRPC streams to the LLM model, and why it matters at shutdown.

A stream cancelled after its last response leaves Triton 2.51 holding a reference to the
model: on SIGTERM every other model unloads and the LLM model stays "live" until the
server's 30 s exit timeout kills it. So a stream whose last response has come is read
to its end; only a client that leaves before the end cancels its stream (which frees the
engine's slot at once).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.gateway.conftest import llm
from tests.support.triton import free_port
from tritonop.gateway import backend as backend_module
from tritonop.gateway.backend import Piece, TritonAddress, TritonBackend
from tritonop.gateway.errors import APIError
from tritonop.gateway.protocol import GenerationArgs
from tritonop.runtime.local import Ports
from tritonop.runtime.serve import start_local

ARGS = GenerationArgs("chat", "What is the capital of France?", "text", {}, (), True, False)


class FakeResult:
    def __init__(self, text: str, reason: str) -> None:
        self.values = {"text_output": np.array([[text.encode()]], dtype=object),
                       "finish_reason": np.array([[reason.encode()]], dtype=object),
                       "prompt_tokens": np.array([[7]], dtype=np.int32),
                       "completion_tokens": np.array([[2 if reason else 0]], dtype=np.int32)}

    def as_numpy(self, name: str) -> np.ndarray:
        return self.values[name]


class FakeStream:
    """tritonclient's response iterator: (result, error) pairs, then the end (or a hang)."""

    def __init__(self, items: list[tuple[Any, Any]], hang_at_end: bool = False) -> None:
        self.items = list(items)
        self.hang_at_end = hang_at_end
        self.read_to_end = False
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> tuple[Any, Any]:
        if self.items:
            return self.items.pop(0)
        if self.hang_at_end:
            await asyncio.sleep(3600)
        self.read_to_end = True
        raise StopAsyncIteration

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _run(stream: FakeStream, take: int | None = None) -> list[Piece]:
    """Pieces from ``generate`` over ``stream``; a consumer that stops after ``take``."""
    async def main() -> list[Piece]:
        backend = TritonBackend(TritonAddress("localhost:1", "localhost:1"))
        backend.client.stream_infer = lambda requests: stream  # type: ignore[method-assign]
        pieces: list[Piece] = []
        generator = backend.generate(ARGS, {"text_input": "prompt"})
        try:
            async for piece in generator:
                pieces.append(piece)
                if take is not None and len(pieces) >= take:
                    break
        finally:
            await generator.aclose()
            await backend.close()
        return pieces

    return asyncio.run(main())


def test_a_finished_stream_is_read_to_its_end_not_cancelled():
    stream = FakeStream([(FakeResult("Par", ""), None), (FakeResult("is", "stop"), None)])
    pieces = _run(stream)
    assert [(p.text, p.finish_reason) for p in pieces] == [("Par", None), ("is", "stop")]
    assert stream.read_to_end and not stream.cancelled


def test_a_client_that_leaves_before_the_end_cancels_the_stream():
    stream = FakeStream([(FakeResult("Par", ""), None), (FakeResult("is", ""), None),
                         (FakeResult("", "length"), None)])
    assert len(_run(stream, take=1)) == 1
    assert stream.cancelled and not stream.read_to_end


def test_an_error_response_ends_the_stream_without_a_cancel():
    error = InferenceServerException("text_input: the prompt is 600 tokens; at most 511 fit",
                                     status="StatusCode.INVALID_ARGUMENT")
    stream = FakeStream([(None, error)])
    with pytest.raises(APIError) as raised:
        _run(stream)
    assert raised.value.status == 400 and "600 tokens" in str(raised.value)
    assert stream.read_to_end and not stream.cancelled


def test_a_stream_that_does_not_end_after_its_last_response_is_cancelled(monkeypatch):
    monkeypatch.setattr(backend_module, "STREAM_END_SECONDS", 0.05)
    stream = FakeStream([(FakeResult("Paris", "stop"), None)], hang_at_end=True)
    assert [p.finish_reason for p in _run(stream)] == ["stop"]
    assert stream.cancelled


@pytest.fixture
def chat_triton(tmp_path: Path, smol_dir: Path) -> Iterator[Any]:
    root = tmp_path / "artifacts"
    (root / "chat").mkdir(parents=True)
    shutil.copytree(smol_dir, root / "chat" / "model", copy_function=os.link)
    resource = llm("chat", engine={"maxSequences": 2, "maxWaiting": 4, "threads": 1})
    server = start_local([resource], root, tmp_path / "triton",
                         Ports(free_port(), free_port(), free_port()), progress=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.triton
def test_triton_unloads_the_llm_model_at_once_after_finished_and_abandoned_streams(
        chat_triton):
    """Requests through the gateway's backend that finish, stream, leave mid-stream, are
    abandoned or refused; then SIGTERM. Before the fix every finished request left a
    reference behind and the stop took Triton's full 30 s exit timeout (killed, exit 1).
    A clean stop takes 2-3 s here even on a loaded machine; 20 s is only how long we wait
    before calling the model stuck, well short of the 30 s that a stuck model holds on."""
    prompt = json.dumps([{"role": "user", "content": "Tell a long story about a dragon."}])

    def args(stream: bool, **sampling: int) -> GenerationArgs:
        return GenerationArgs("chat", prompt, "messages", dict(sampling), (), stream, False)

    async def session() -> None:
        backend = TritonBackend(TritonAddress(chat_triton.grpc_url, chat_triton.http_url))
        try:
            for stream in (False, True, False, True):
                pieces = [p async for p in backend.generate(args(stream, max_tokens=8), {})]
                assert pieces[-1].finish_reason == "length"
            generator = backend.generate(args(True, max_tokens=200), {})
            assert (await generator.__anext__()).finish_reason is None
            await generator.aclose()  # the client left mid-stream
            with pytest.raises(TimeoutError):  # a non-streamed request abandoned
                await asyncio.wait_for(
                    backend.generate(args(False, max_tokens=200), {}).__anext__(), 0.5)
            with pytest.raises(APIError):  # refused: max_tokens beyond the limit
                [p async for p in backend.generate(args(False, max_tokens=100_000), {})]
        finally:
            await backend.close()

    asyncio.run(session())
    started = time.monotonic()
    code = chat_triton.stop(timeout=20)
    elapsed = time.monotonic() - started
    log = chat_triton.log_path.read_text()
    print(f"\nstop after finished and abandoned streams: {elapsed:.1f} s, exit {code}")
    assert "successfully unloaded 'chat'" in log and code == 0, log[-3000:]
