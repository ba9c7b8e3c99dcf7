"""Prometheus metrics: one registry per running service, no module-level collectors."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import generate_latest


class Metrics:
    """Every metric the service exports, registered on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "mrm_push_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mrm_push_http_request_duration_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.webhook = Counter(
            "mrm_push_webhook_calls",
            "Google webhook calls, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "mrm_push_ready", "1 when the last /readyz check passed.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
