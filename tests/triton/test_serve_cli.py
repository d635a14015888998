"""`tritonop serve`: from a YAML file to answered requests, and a clean stop on Ctrl-C."""

from __future__ import annotations

import signal

import pytest

from tests.support.triton import (
    embedding_search,
    free_port,
    post_json,
    seed_export,
    serving,
)
from tests.triton.conftest import TINY_TEXTS

pytestmark = pytest.mark.triton


def test_serve_answers_the_seed_request_and_stops_cleanly(tmp_path, exported):
    corpus = tmp_path / "headlines.txt"
    corpus.write_text("\n".join(TINY_TEXTS) + "\n")
    (tmp_path / "search.yaml").write_text(
        "apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
        "metadata: {name: headlines}\nspec: {corpus: {source: headlines.txt}}\n"
    )
    seed_export(embedding_search("headlines", corpus), tmp_path / "artifacts", exported)
    http = free_port()
    args = [str(tmp_path / "search.yaml"), "--artifacts-root", str(tmp_path / "artifacts"),
            "--http-port", str(http), "--grpc-port", str(free_port()),
            "--metrics-port", str(free_port()), "--openai-port", str(free_port())]
    with serving(args) as (process, printed):
        assert "/v2/models/headlines/generate" in printed
        assert "europe climate change storm" in printed
        status, body = post_json(f"http://localhost:{http}/v2/models/headlines/generate",
                                 {"text": "europe climate change storm", "num_results": 5})
        assert status == 200
        assert body["texts"][0] == "severe storm warning for northern europe"
        assert len(body["ids"]) == len(body["scores"]) == 5
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    with pytest.raises(OSError):
        post_json(f"http://localhost:{http}/v2/health/ready", b"", timeout=2)
