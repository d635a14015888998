"""A download's progress as lines a program can read back: the prepare step writes them, the
operator reads them from the pod's log.

In a pod (no terminal), ``tritonop prepare`` prints to stdout, at most every
:data:`PROGRESS_SECONDS` and once when the download is done::

    progress: news hf://acme/bert 125829120/524288000 bytes

(the resource, its model source, the bytes downloaded and the bytes to download). The
source is written as :func:`public_source` leaves it: no user or password of a URL, no
query (a signed URL's signature), so the line says nothing that a reader of the log must
not see. The operator reads the tail of the log (:func:`last_progress`) and adds
:meth:`DownloadProgress.describe` ("downloaded 126 MB of 524 MB (24%)") to the resource's
ArtifactsReady condition. On a terminal, a progress bar stands in for the lines.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import quote, urlsplit

PREFIX = "progress:"
PROGRESS_SECONDS = 5.0
"""The least time between two progress lines of one download."""

_LINE = re.compile(rf"{PREFIX} (?P<resource>\S+) (?P<source>\S+) (?P<done>\d+)/(?P<total>\d+) "
                   r"bytes")


@dataclass(frozen=True)
class DownloadProgress:
    """How far one resource's model download got.

    Attributes:
        resource: the resource's name.
        source: its model source, as :func:`public_source` writes it.
        done: bytes downloaded (files a killed run left whole included).
        total: bytes of all files to download (0: the store listed no sizes).
    """

    resource: str
    source: str
    done: int
    total: int

    def line(self) -> str:
        """``progress: <resource> <source> <done>/<total> bytes``."""
        return f"{PREFIX} {self.resource} {self.source} {self.done}/{self.total} bytes"

    def describe(self) -> str:
        """``downloaded 120 MB of 500 MB (24%)`` (decimal units, the percentage rounded
        down, so 100% means done); without the total where it is not known."""
        if self.total <= 0 or self.done > self.total:
            return f"downloaded {human_bytes(self.done)}"
        return (f"downloaded {human_bytes(self.done)} of {human_bytes(self.total)} "
                f"({self.done * 100 // self.total}%)")


def human_bytes(count: int) -> str:
    """``512 B``, ``1.5 kB``, ``120 MB``, ``3.2 GB``: decimal units, as disks and stores
    count them."""
    if count < 1000:
        return f"{count} B"
    units = ("kB", "MB", "GB", "TB")
    value, step = count / 1000, 0
    while value >= 1000 and step < len(units) - 1:
        value, step = value / 1000, step + 1
    return f"{value:.1f} {units[step]}" if value < 10 else f"{value:.0f} {units[step]}"


def public_source(text: str) -> str:
    """A model source as a log line may show it: a URL's user, password, query and fragment
    left out, whitespace escaped (so that the line stays one field per word)."""
    url = urlsplit(text)
    if url.scheme and url.netloc:
        text = f"{url.scheme}://{url.netloc.rpartition('@')[2]}{url.path}"
    return re.sub(r"\s", lambda space: quote(space.group()), text) or "-"


def parse_progress(line: str) -> DownloadProgress | None:
    """The progress a line of the log says, or None for any other line."""
    found = _LINE.fullmatch(line.strip())
    if found is None:
        return None
    return DownloadProgress(found["resource"], found["source"], int(found["done"]),
                            int(found["total"]))


def last_progress(log: str, resource: str | None = None) -> DownloadProgress | None:
    """The newest progress line in (the tail of) a log, of ``resource`` when given.

    A line cut short where the tail was cut (``limitBytes``) does not parse and is passed
    over, as is everything else the container printed.
    """
    for line in reversed(log.splitlines()):
        progress = parse_progress(line)
        if progress is not None and resource in (None, progress.resource):
            return progress
    return None


class ProgressLines:
    """A :data:`tritonop.artifacts.fetch.Progress` callback that prints progress lines.

    The first call prints at once (the total is known from then on); later ones at most
    every ``every`` seconds; :meth:`finish` prints the last state unless it was printed.
    Calls may come from a download thread: a lock keeps lines whole.
    """

    def __init__(self, resource: str, source: str, *, out: TextIO | None = None,
                 every: float = PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resource, self.source = resource, public_source(source)
        self.out, self.every, self.clock = out, every, clock
        self.last: tuple[int, int] | None = None
        self.printed: tuple[int, int] | None = None
        self.printed_at = 0.0
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.last = (done, total)
            if self.printed is None or self.clock() - self.printed_at >= self.every:
                self._print()

    def finish(self) -> None:
        """Print the last state if the last line printed is not it (the download's end)."""
        with self._lock:
            if self.last is not None and self.last != self.printed:
                self._print()

    def _print(self) -> None:
        assert self.last is not None
        line = DownloadProgress(self.resource, self.source, *self.last).line()
        print(line, file=self.out or sys.stdout, flush=True)
        self.printed, self.printed_at = self.last, self.clock()


@contextmanager
def progress_lines(resource: str, source: str, *, out: TextIO | None = None,
                   every: float = PROGRESS_SECONDS) -> Iterator[ProgressLines]:
    """:class:`ProgressLines` for one download; the last line printed once it is done (not
    after a failure: the log then ends with the error)."""
    lines = ProgressLines(resource, source, out=out, every=every)
    yield lines
    lines.finish()
