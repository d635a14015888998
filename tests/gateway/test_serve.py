"""``tritonop serve`` starts the gateway beside tritonserver and prints calls that work:
the printed ``curl`` commands and the ``openai`` client snippet are run as printed. Both
servers listen on this machine's loopback only unless ``--host`` says otherwise, and
with ``TRITONOP_API_KEY`` the gateway needs that key."""

from __future__ import annotations

import ipaddress
import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import _link_tree
from tests.support.triton import TINY_TEXTS, embedding_search, free_port, seed_export, serving

pytestmark = pytest.mark.triton

CHAT = """apiVersion: serving.tritonop.dev/v1alpha1
kind: LLMService
metadata: {name: chat}
spec:
  model: {maxContextLength: 512}
  generation: {limits: {maxTokens: 64}, defaults: {maxTokens: 16}}
  engine: {maxSequences: 2, maxWaiting: 2, threads: 1}
"""


def write_search(folder: Path) -> Path:
    """``search.yaml``, an EmbeddingSearch ``headlines`` over a tiny corpus beside it; the
    corpus file."""
    corpus = folder / "headlines.txt"
    corpus.write_text("\n".join(TINY_TEXTS) + "\n")
    (folder / "search.yaml").write_text(
        "apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
        "metadata: {name: headlines}\nspec: {corpus: {source: headlines.txt}}\n")
    return corpus


def test_serve_prints_gateway_calls_that_work(tmp_path, exported, smol_dir):
    corpus = write_search(tmp_path)
    (tmp_path / "chat.yaml").write_text(CHAT)
    root = tmp_path / "artifacts"
    seed_export(embedding_search("headlines", corpus), root, exported)
    _link_tree(smol_dir, root / "chat" / "model")
    openai_port = free_port()
    ports = [free_port(), free_port(), free_port()]
    args = [str(tmp_path / "search.yaml"), str(tmp_path / "chat.yaml"),
            "--artifacts-root", str(root), "--http-port", str(ports[0]),
            "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
            "--openai-port", str(openai_port), "--workdir", str(tmp_path / "work")]
    with serving(args) as (process, printed):
        # Triton's three ports and the gateway's, on the loopback only: nothing on the
        # machine's other addresses, IPv4 or IPv6.
        assert listening({*ports, openai_port}) == {
            port: {"127.0.0.1"} for port in (*ports, openai_port)}
        base = f"http://localhost:{openai_port}/v1"
        assert base in printed
        calls = _printed_gateway_calls(printed, base)
        assert len(calls) == 4  # search, embeddings, chat with curl; chat with openai
        answers = [subprocess.run(call, shell=True, capture_output=True, text=True,
                                  timeout=120, check=True).stdout for call in calls]
        search, embeddings, chat, snippet = answers
        assert json.loads(search)["data"][0]["text"] == TINY_TEXTS[0]
        assert len(json.loads(embeddings)["data"]) == 2
        assert "Paris" in json.loads(chat)["choices"][0]["message"]["content"]
        assert "Paris" in snippet
        process.send_signal(signal.SIGINT)
        log = tmp_path / "work" / "tritonserver.log"
        assert process.wait(timeout=90) == 0, log.read_text()[-3000:]


def test_serve_with_a_key_refuses_requests_without_it(tmp_path, exported, monkeypatch):
    corpus = write_search(tmp_path)
    root = tmp_path / "artifacts"
    seed_export(embedding_search("headlines", corpus), root, exported)
    key = f"sk-{secrets.token_hex(16)}"
    monkeypatch.setenv("TRITONOP_API_KEY", key)
    openai_port = free_port()
    ports = [free_port(), free_port(), free_port()]
    args = [str(tmp_path / "search.yaml"), "--artifacts-root", str(root),
            "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
            "--metrics-port", str(ports[2]), "--openai-port", str(openai_port)]
    with serving(args) as (process, printed):
        base = f"http://localhost:{openai_port}/v1"
        assert key not in printed
        calls = _printed_gateway_calls(printed, base)
        assert len(calls) == 2 and all("$TRITONOP_API_KEY" in call for call in calls)
        search, embeddings = [subprocess.run(call, shell=True, capture_output=True, text=True,
                                             timeout=120, check=True).stdout
                              for call in calls]  # the shell has the key in its environment
        assert json.loads(search)["data"][0]["text"] == TINY_TEXTS[0]
        assert len(json.loads(embeddings)["data"]) == 2
        body = {"model": "headlines", "text": "storm"}
        refused = httpx.post(f"{base}/search", json=body, timeout=30)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        answer = httpx.post(f"{base}/search", json=body, timeout=120,
                            headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        assert listening({*ports, openai_port}) == {
            port: {"127.0.0.1"} for port in (*ports, openai_port)}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0


def listening(ports: set[int]) -> dict[int, set[str]]:
    """The addresses listening on ``ports`` in this network namespace, from the kernel's
    socket tables (a socket on 0.0.0.0 or :: would show as that)."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                found.setdefault(int(port, 16), set()).add(_address(address))
    return found


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian)
    byte order. An IPv4-mapped IPv6 address (gRPC's sockets) reads as its IPv4 address."""
    raw = bytes.fromhex(hex_address)
    address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _printed_gateway_calls(printed: str, base: str) -> list[str]:
    """The printed commands that reach the gateway, continuation lines joined."""
    joined = printed.replace("\\\n", " ")
    calls = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("curl") and base in line:
            calls.append(line)
        elif line.startswith("python -c") and base in line:
            calls.append(line.replace("python", sys.executable, 1))
    return calls
