"""One real tritonserver serving an EmbeddingSearch ``news`` and an LLMService ``chat``,
with the gateway in this process on a free port in front of it.

``chat`` takes 2 requests in flight and 2 waiting at the gateway, so that admission
tests need only a handful of requests to fill it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.triton import (
    API,
    RunningTriton,
    embedding_search,
    free_port,
    running_triton,
    seed_export,
)
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import gateway_config
from tritonop.gateway.server import GatewayThread
from tritonop.resources import Resource, parse_resource

CHAT_BOUND = {"maxInFlight": 2, "maxWaiting": 2}


def llm(name: str, **spec: Any) -> Resource:
    """An LLMService for the gateway tests, in float32: they compare the answers of requests
    that shared the engine's steps with the answer alone, exact only in float32."""
    body = {"apiVersion": API, "kind": "LLMService", "metadata": {"name": name}, "spec": {
        "model": {"maxContextLength": 512, "dtype": "float32"},
        "generation": {"limits": {"maxTokens": 256}, "defaults": {"maxTokens": 32}},
        **spec}}
    return parse_resource(body)


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            Path(dst).hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)

    if not target.exists():
        shutil.copytree(source, target, copy_function=link)


@dataclass
class Stack:
    triton: RunningTriton
    gateway: GatewayThread

    @property
    def base_url(self) -> str:
        return f"{self.gateway.url}/v1"

    @property
    def grpc(self) -> str:
        return self.triton.server.grpc_url


@pytest.fixture(scope="session")
def stack(tmp_path_factory, exported, corpus, smol_dir) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway-artifacts")
    news = embedding_search("news", corpus, model={"format": "onnx"})
    chat = llm("chat", engine={"maxSequences": 4, "maxWaiting": 8, "threads": 1},
               api={"maxInFlight": CHAT_BOUND["maxInFlight"],
                    "maxWaiting": CHAT_BOUND["maxWaiting"]})
    seed_export(news, root, exported)
    _link_tree(smol_dir, root / "chat" / "model")
    resources = [news, chat]
    with running_triton(resources, root, tmp_path_factory.mktemp("gateway-triton")) as triton:
        address = TritonAddress(triton.server.grpc_url, triton.server.http_url)
        gateway = GatewayThread(gateway_config(resources), address, free_port()).start()
        try:
            yield Stack(triton, gateway)
        finally:
            gateway.stop()
