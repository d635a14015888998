"""A steady client load through a Service, routed as kube-proxy routes it, counted.

kube-proxy watches a Service's EndpointSlices and sends each new connection to one of the
endpoints marked ready. :class:`ServiceLoad` does the same from the test process (the test
cluster has no kube-proxy): a thread watches the EndpointSlices (list, then watch, as an
informer does), and a few threads send the seed's search, each request on a new connection
to a ready endpoint's gateway port. Like kube-proxy on a busy node, it applies what it sees
``lag`` seconds late, so that requests do reach a pod after it was told to stop (the window
the gateway's drain is for); those are counted apart (``to_stopping``). Every request is
counted: answered (200 with the hits asked for) or failed, with the reason kept (a status
and its body, a connection error, or no ready endpoint to send it to, which kube-proxy would
refuse too).
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.support.cluster import ControlPlane

PORT_NAME = "openai"


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    to_stopping: int = 0
    """Requests sent to an endpoint that was no longer ready (seen late, as routed)."""

    @property
    def failed(self) -> int:
        return len(self.failures)


class ServiceLoad:
    """Searches through ``service``'s ready endpoints from ``threads`` threads until
    :meth:`stop`; use as a context manager.

    Args:
        cluster: the control plane, read as the admin.
        body: the request, POSTed to ``path``; an answer is good with ``expect_hits`` hits.
        pause: seconds each thread waits between two requests (a steady, modest load).
        lag: seconds between seeing an EndpointSlice change and routing by it.
    """

    def __init__(self, cluster: ControlPlane, body: dict[str, Any], *, namespace: str = "default",
                 service: str = "news", path: str = "/v1/search", threads: int = 3,
                 pause: float = 0.05, expect_hits: int = 5, lag: float = 0.0) -> None:
        self.cluster, self.body, self.path = cluster, json.dumps(body).encode(), path
        self.expect_hits, self.pause, self.threads, self.lag = expect_hits, pause, threads, lag
        self.routes: list[tuple[float, list[tuple[str, int]]]] = []
        self.slices_path = (f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
                            f"?labelSelector=" +
                            urllib.parse.quote(f"kubernetes.io/service-name={service}"))
        self.slices: dict[str, dict[str, Any]] = {}
        self.endpoints: list[tuple[str, int]] = []
        self.counts = Counts()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.workers: list[threading.Thread] = []
        self._turn = itertools.count()

    # -- the endpoints, as kube-proxy's informer sees them --------------------------------

    def _open(self, path: str, timeout: float) -> Any:
        return urllib.request.urlopen(f"{self.cluster.server}{path}",
                                      context=self.cluster.ssl_context, timeout=timeout)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                with self._open(self.slices_path, 30) as response:
                    listed = json.loads(response.read())
                self.slices = {s["metadata"]["name"]: s for s in listed["items"]}
                self._update()
                version = listed["metadata"]["resourceVersion"]
                with self._open(f"{self.slices_path}&watch=true&resourceVersion={version}"
                                "&timeoutSeconds=60", 90) as stream:
                    for line in stream:
                        if self.stopping.is_set():
                            return
                        event = json.loads(line)
                        if event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
                            break  # an ERROR (expired version): list again
                        name = event["object"]["metadata"]["name"]
                        if event["type"] == "DELETED":
                            self.slices.pop(name, None)
                        else:
                            self.slices[name] = event["object"]
                        self._update()
            except (OSError, ValueError):
                time.sleep(0.1)

    def _update(self) -> None:
        endpoints = []
        for piece in self.slices.values():
            ports = [p["port"] for p in piece.get("ports") or [] if p.get("name") == PORT_NAME]
            for endpoint in piece.get("endpoints") or []:
                if endpoint.get("conditions", {}).get("ready"):
                    endpoints += [(address, port) for address in endpoint["addresses"]
                                  for port in ports]
        self.endpoints = sorted(endpoints)
        at = time.monotonic() + (self.lag if self.synced.is_set() else 0.0)
        with self.lock:
            self.routes.append((at, self.endpoints))
        self.synced.set()

    def routed(self) -> list[tuple[str, int]]:
        """The endpoints as routed now: the newest view at least ``lag`` seconds old."""
        now = time.monotonic()
        with self.lock:
            while len(self.routes) > 1 and self.routes[1][0] <= now:
                self.routes.pop(0)
            return self.routes[0][1] if self.routes and self.routes[0][0] <= now else []

    # -- the requests -----------------------------------------------------------------------

    def _send(self) -> None:
        while not self.stopping.is_set():
            endpoints = self.routed()
            with self.lock:
                self.counts.sent += 1
            if not endpoints:
                self._failed("no ready endpoint")
            else:
                address, port = endpoints[next(self._turn) % len(endpoints)]
                if (address, port) not in self.endpoints:
                    with self.lock:
                        self.counts.to_stopping += 1
                reason = self._request(address, port)
                if reason is None:
                    with self.lock:
                        self.counts.answered += 1
                        self.counts.by_endpoint[address] += 1
                else:
                    self._failed(f"{address}: {reason}")
            self.stopping.wait(self.pause)

    def _request(self, address: str, port: int) -> str | None:
        """None when answered as expected, else why not."""
        connection = http.client.HTTPConnection(address, port, timeout=60)
        try:
            connection.request("POST", self.path, body=self.body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            return f"{type(error).__name__}: {error}"
        finally:
            connection.close()
        if response.status != 200:
            return f"{response.status} {body[:300]!r}"
        try:
            hits = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError):
            return f"200 with an unexpected body {body[:300]!r}"
        return None if len(hits) == self.expect_hits else f"200 with {len(hits)} hits"

    def _failed(self, reason: str) -> None:
        with self.lock:
            self.counts.failures.append(reason)

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> ServiceLoad:
        watcher = threading.Thread(target=self._watch, daemon=True, name="slices-watch")
        watcher.start()
        if not self.synced.wait(60) or not self.endpoints:
            self.stopping.set()
            raise AssertionError("the Service has no ready endpoint to load")
        self.workers = [watcher] + [threading.Thread(target=self._send, daemon=True,
                                                     name=f"load-{i}")
                                    for i in range(self.threads)]
        for worker in self.workers[1:]:
            worker.start()
        return self

    def stop(self) -> Counts:
        self.stopping.set()
        for worker in self.workers[1:]:
            worker.join(90)
        return self.counts

    def __enter__(self) -> ServiceLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
