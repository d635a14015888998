"""The gateway's Prometheus metrics, in a registry of its own (one per app).

``tritonop_gateway_requests_in_flight`` per pod is the signal docs/autoscaling.md scales
on: it counts what the model is actually working on, unlike CPU, which a pod waiting on
Triton hardly uses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class GatewayMetrics:
    """Requests by route and status, latencies, time to first token, and admission gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # key: the API client's name (never its key), "-" where no key is needed.
        self.requests = Counter("tritonop_gateway_requests", "Requests answered",
                                ["route", "model", "status", "key"], registry=r)
        self.unauthorized = Counter("tritonop_gateway_unauthorized",
                                    "Requests refused for a missing or invalid API key",
                                    registry=r)
        self.latency = Histogram("tritonop_gateway_request_duration_seconds",
                                 "Time from request to the end of the answer",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tritonop_gateway_time_to_first_token_seconds",
                              "Time from request to the first generated text",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tritonop_gateway_inter_token_latency_seconds",
                             "Time between streamed pieces of text", ["model"],
                             buckets=TOKEN_BUCKETS, registry=r)
        self.in_flight = Gauge("tritonop_gateway_requests_in_flight",
                               "Requests admitted and being answered", ["model"], registry=r)
        self.waiting = Gauge("tritonop_gateway_requests_waiting",
                             "Requests waiting for an admission place", ["model"], registry=r)
