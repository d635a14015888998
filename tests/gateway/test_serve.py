"""``tritonop serve`` starts the gateway beside tritonserver and prints calls that work:
the printed ``curl`` commands and the ``openai`` client snippet are run as printed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.gateway.conftest import _link_tree
from tests.support.triton import embedding_search, free_port, seed_export, serving
from tests.triton.conftest import TINY_TEXTS

pytestmark = pytest.mark.triton

CHAT = """apiVersion: serving.tritonop.dev/v1alpha1
kind: LLMService
metadata: {name: chat}
spec:
  model: {maxContextLength: 512}
  generation: {limits: {maxTokens: 64}, defaults: {maxTokens: 16}}
  engine: {maxSequences: 2, maxWaiting: 2, threads: 1}
"""


def test_serve_prints_gateway_calls_that_work(tmp_path, exported, smol_dir):
    corpus = tmp_path / "headlines.txt"
    corpus.write_text("\n".join(TINY_TEXTS) + "\n")
    (tmp_path / "search.yaml").write_text(
        "apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
        "metadata: {name: headlines}\nspec: {corpus: {source: headlines.txt}}\n")
    (tmp_path / "chat.yaml").write_text(CHAT)
    root = tmp_path / "artifacts"
    seed_export(embedding_search("headlines", corpus), root, exported)
    _link_tree(smol_dir, root / "chat" / "model")
    openai_port = free_port()
    args = [str(tmp_path / "search.yaml"), str(tmp_path / "chat.yaml"),
            "--artifacts-root", str(root), "--http-port", str(free_port()),
            "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
            "--openai-port", str(openai_port), "--workdir", str(tmp_path / "work")]
    with serving(args) as (process, printed):
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
