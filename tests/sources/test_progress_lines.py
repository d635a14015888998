"""Where there is no terminal (a pod), a model download prints ``progress: ...`` lines on stdout
for the operator to read from the pod's log; against the test Hub (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sources.conftest import SERVED, Repos
from tests.support.hub import HubServer
from tests.support.triton import API
from tritonop.artifacts.progress import DownloadProgress, parse_progress
from tritonop.artifacts.resolve import fetch_model
from tritonop.resources import parse_resource


def test_a_download_without_a_terminal_prints_progress_lines(
        hub: HubServer, repos: Repos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    resource = parse_resource({"apiVersion": API, "kind": "LLMService",
                               "metadata": {"name": "chat", "namespace": "ml"},
                               "spec": {"model": {"source": "hf://tiny/bert@v1"}}})
    fetched = fetch_model(resource, tmp_path, progress=True)
    out, err = capfd.readouterr()
    total = sum(len(repos.v1_files[name]) for name in SERVED)

    lines = out.splitlines()
    said = [parse_progress(line) for line in lines]
    assert fetched.revision == repos.bert_v1
    assert lines and None not in said, out  # stdout holds progress lines only
    assert said[0] is not None and said[0].done < total  # the first at once, before the bytes
    assert said[-1] == DownloadProgress("chat", "hf://tiny/bert@v1", total, total)
    assert "progress:" not in err and "\r" not in err  # no progress bar without a terminal

    fetch_model(resource, tmp_path, progress=True)  # cached: nothing downloaded, nothing said
    assert capfd.readouterr().out == ""
