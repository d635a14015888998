"""The ``progress: ...`` lines a prepare step prints while it downloads a model, and how the
operator reads them back from the tail of a pod's log (issue 21)."""

from __future__ import annotations

import io

import pytest

from tritonop.artifacts.progress import (
    DownloadProgress,
    ProgressLines,
    human_bytes,
    last_progress,
    parse_progress,
    public_source,
)
from tritonop.controller.artifacts import download_progress

MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_once_then_at_most_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines("news", "hf://acme/bert", out=out, every=5.0, clock=clock)
    for at, done in [(0.0, 0), (1.0, 100), (4.9, 200), (5.0, 300), (6.0, 400), (9.9, 450),
                     (10.1, 480), (10.2, 500)]:
        clock.now = 100.0 + at
        lines(done * MB, 500 * MB)
    lines.finish()
    lines.finish()  # the end is printed once
    assert out.getvalue().splitlines() == [
        f"progress: news hf://acme/bert {done * MB}/{500 * MB} bytes"
        for done in (0, 300, 480, 500)]


def test_a_download_that_ended_on_a_printed_line_prints_no_other():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines("news", "s3://bucket/models/bert", out=out, clock=clock)
    lines(7, 7)
    lines.finish()
    assert out.getvalue() == "progress: news s3://bucket/models/bert 7/7 bytes\n"


def test_a_line_reads_back_as_what_was_written():
    written = DownloadProgress("news", "hf://acme/bert@main", 120 * MB, 500 * MB)
    assert parse_progress(written.line()) == written
    assert parse_progress(written.line() + "\r\n") == written
    assert written.describe() == "downloaded 120 MB of 500 MB (24%)"


@pytest.mark.parametrize("line", [
    "INFO tritonop.artifacts.resolve: news: model source hf://acme/bert at revision 1",
    "progress: news hf://acme/bert 120/500",  # cut where the tail's byte limit fell
    "progress: news hf://acme/bert -1/500 bytes",
    "error: news: progress: a b 1/2 bytes",
])
def test_other_lines_are_no_progress(line):
    assert parse_progress(line) is None


def test_the_newest_line_of_the_resource_counts_and_a_cut_last_line_is_passed_over():
    log = ("WARNING huggingface_hub: something\n"
           "progress: news hf://acme/bert 0/500000000 bytes\n"
           "progress: news hf://acme/bert 120000000/500000000 bytes\n"
           "progress: other hf://acme/gpt 9/10 bytes\n"
           "progress: news hf://acme/bert 240000000/5")
    assert last_progress(log, "news") == DownloadProgress("news", "hf://acme/bert",
                                                          120 * MB, 500 * MB)
    assert last_progress(log) == DownloadProgress("other", "hf://acme/gpt", 9, 10)
    assert last_progress("INFO nothing here\n", "news") is None


@pytest.mark.parametrize(("done", "total", "said"), [
    (0, 500 * MB, "downloaded 0 B of 500 MB (0%)"),
    (499_999_999, 500 * MB, "downloaded 500 MB of 500 MB (99%)"),
    (500 * MB, 500 * MB, "downloaded 500 MB of 500 MB (100%)"),
    (1_500, 4_200_000_000, "downloaded 1.5 kB of 4.2 GB (0%)"),
    (12 * MB, 0, "downloaded 12 MB"),  # the store listed no sizes
    (15 * MB, 14 * MB, "downloaded 15 MB"),
])
def test_the_message_says_bytes_in_decimal_units(done, total, said):
    assert DownloadProgress("news", "hf://a/b", done, total).describe() == said


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 1000, 9_949, 120 * MB, 3_200 * MB, 7 * 10**15)] == [
        "999 B", "1.0 kB", "9.9 kB", "120 MB", "3.2 GB", "7000 TB"]


@pytest.mark.parametrize(("source", "shown"), [
    ("https://user:s3cret@models.example.com/bert.gguf", "https://models.example.com/bert.gguf"),
    ("https://bucket.s3.amazonaws.com/m.gguf?X-Amz-Signature=abc&X-Amz-Credential=AKIA",
     "https://bucket.s3.amazonaws.com/m.gguf"),
    ("hf://acme/bert@main", "hf://acme/bert@main"),
    ("acme/bert@0123abc", "acme/bert@0123abc"),
    ("s3://bucket/models/bert", "s3://bucket/models/bert"),
    ("/models/my bert", "/models/my%20bert"),
])
def test_the_source_in_a_line_carries_no_credentials(source, shown):
    out = io.StringIO()
    ProgressLines("news", source, out=out)(1, 2)
    assert out.getvalue() == f"progress: news {shown} 1/2 bytes\n"
    assert public_source(source) == shown
    assert parse_progress(out.getvalue()) == DownloadProgress("news", shown, 1, 2)


def job_pod(name: str, state: str, container: str = "prepare", init: bool = False) -> dict:
    key = "initContainerStatuses" if init else "containerStatuses"
    return {"metadata": {"name": name},
            "status": {key: [{"name": container, "state": {state: {}}}]}}


def test_only_running_containers_logs_are_read_and_the_first_that_says_counts():
    logs = {("old", "prepare"): "progress: news hf://a/b 1/2 bytes\n",
            ("waiting", "prepare"): "INFO waiting for the lock\n",
            ("downloading", "prepare"): "progress: news hf://a/b 250000000/500000000 bytes\n"}
    read: list[tuple[str, str]] = []

    def log(pod: str, container: str) -> str:
        read.append((pod, container))
        return logs.get((pod, container), "")

    pods = [job_pod("old", "terminated"), job_pod("waiting", "running"),
            job_pod("downloading", "running"), job_pod("later", "running")]
    assert download_progress(pods, "prepare", log, "news") == \
        "downloaded 250 MB of 500 MB (50%)"
    assert read == [("waiting", "prepare"), ("downloading", "prepare")]
    # Per-pod prepare: the init container's state, not the app containers'.
    inits = [job_pod("downloading", "running", init=True)]
    assert download_progress(inits, "prepare", log, "news", init=True) == \
        "downloaded 250 MB of 500 MB (50%)"
    assert download_progress(inits, "prepare", log, "news") == ""
    assert download_progress(pods, "prepare", lambda pod, container: "", "news") == ""
