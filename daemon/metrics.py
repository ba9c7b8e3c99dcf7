"""Prometheus metrics: one registry per running service, no module-level collectors.

The catalogue is docs/protocol.md#metrics (a test keeps it and /metrics in step). Exposition is
the text format 0.0.4 only: there the outbox gauge `mrm_push_deliveries{state,target}` and the
outcome counter `mrm_push_deliveries_total{outcome}` are two families with two names. OpenMetrics
would name the counter's family `mrm_push_deliveries` too and the two would clash, so it is not
offered; for the same reason both come from custom collectors (prometheus_client's registry
reasons in OpenMetrics names and would refuse the pair).
"""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus
from typing import Protocol, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from daemon.fcm import FcmSender, TimedSender
from storage.base import NotificationSource

# Label values a caller cannot make up (contract 2: never a raw method, path, id or token): the
# standard methods, the statuses HTTP names, and the route's handler (a fixed set, see app.py).
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
HTTP_STATUSES = frozenset(status.value for status in HTTPStatus)
OTHER = "other"
# The other label sets, each fixed here, and every value exported from the start (at 0), so that
# rate() and increase() see a first failure.
WEBHOOK_OUTCOMES = (
    "stored",
    "duplicate",
    "sync",
    "unknown_channel",
    "invalid",
    "forbidden",
    "error",
    "store_failed",
)
DELIVERY_OUTCOMES = ("sent", "failed", "retried", "held", "expired")
GOOGLE_METHODS = ("watch", "stop", "list", "token")
REMOTE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def method_label(method: str | None) -> str:
    """The method as a label value: a standard one as it is, anything else "other"."""
    return method if method in HTTP_METHODS else OTHER


def status_label(status: int) -> str:
    return str(status) if status in HTTP_STATUSES else OTHER


class Metrics:
    """Every metric the service exports, registered on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # prometheus_client's own metric objects live in `own`, shown without their `_created`
        # series (one more family per counter and histogram that nothing here reads).
        own = CollectorRegistry()
        self.registry.register(_WithoutCreated(own))
        self.requests = Counter(
            "mrm_push_http_requests",
            "HTTP requests answered, by route (handler), method (standard or other), status.",
            ["route", "method", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "mrm_push_http_request_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=own,
        )
        self.webhook = Counter(
            "mrm_push_webhook_calls",
            "Google webhook calls, by outcome.",
            ["outcome"],
            registry=own,
        )
        self.ready = Gauge(
            "mrm_push_ready",
            "1 when the last readiness check passed (run every few seconds, and by /readyz).",
            registry=own,
        )
        self.published = Counter(
            "mrm_push_notifications_published",
            "Notifications published (given a seq and deliveries), by source.",
            ["source"],
            registry=own,
        )
        self.google = Histogram(
            "mrm_push_google_request_seconds",
            "Time of one Google call (its HTTP request, failures included), by method: watch, "
            "stop, list (one page of events.list), token (an OAuth token fetched).",
            ["method"],
            buckets=REMOTE_BUCKETS,
            registry=own,
        )
        self.fcm = Histogram(
            "mrm_push_fcm_request_seconds",
            "Time of one FCM attempt (a token refresh it needed included), whatever its outcome.",
            buckets=REMOTE_BUCKETS,
            registry=own,
        )
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook.labels(outcome)
        for source in get_args(NotificationSource):
            self.published.labels(source)
        for method in GOOGLE_METHODS:
            self.google.labels(method)

    def observe_google(self, method: str, seconds: float) -> None:
        """One Google call took `seconds` (called from the gateway's threads: thread-safe)."""
        self.google.labels(method).observe(seconds)

    def timed_sender(self, sender: FcmSender) -> FcmSender:
        """`sender`, each attempt timed into mrm_push_fcm_request_seconds."""
        return TimedSender(sender, self.fcm.observe)

    def watch_deliveries(self, worker: DeliveryCounts) -> None:
        """Export the delivery worker's own counters, read at each scrape."""
        self.registry.register(_DeliveryCollector(worker))

    def watch_fanout(self, hub: FanoutCounts) -> None:
        """Export the WebSocket hub's counts, read at each scrape (nothing on the hot path)."""
        self.registry.register(_FanoutCollector(hub))

    def watch(self, collector: Collector) -> None:
        """Export another collector's figures (the store gauges)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WithoutCreated(Collector):
    """Another registry's metrics, without the `_created` samples."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        for metric in self.inner.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class DeliveryCounts(Protocol):
    @property
    def sent(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def dropped_tokens(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def expired(self) -> int: ...
    @property
    def breaker_open(self) -> bool: ...


class _DeliveryCollector(Collector):
    def __init__(self, worker: DeliveryCounts) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "mrm_push_deliveries",
            "Delivery attempts' outcomes (FCM and backend), by outcome.",
            labels=["outcome"],
        )
        for outcome in DELIVERY_OUTCOMES:
            outcomes.add_metric([outcome], getattr(self.worker, outcome))
        yield outcomes
        yield CounterMetricFamily(
            "mrm_push_fcm_tokens_dropped",
            "FCM tokens that left their room (unregistered, invalid, sender mismatch).",
            value=self.worker.dropped_tokens,
        )
        yield GaugeMetricFamily(
            "mrm_push_fcm_mismatch_breaker_open",
            "1 while FCM deliveries are held: the SENDER_ID_MISMATCH breaker, or FCM refusing "
            "the project (403/404 without an errorCode); /readyz says which.",
            value=1 if self.worker.breaker_open else 0,
        )


class FanoutCounts(Protocol):
    subscriptions: int
    slow_consumer_closes: int
    replays: int

    @property
    def connected(self) -> int: ...

    @property
    def frames_sent(self) -> int: ...


class _FanoutCollector(Collector):
    def __init__(self, hub: FanoutCounts) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        yield GaugeMetricFamily(
            "mrm_push_websocket_clients", "WebSocket clients connected.", value=hub.connected
        )
        yield GaugeMetricFamily(
            "mrm_push_websocket_subscriptions",
            'Calendar subscriptions over all WebSocket clients ("*" counts one).',
            value=hub.subscriptions,
        )
        yield CounterMetricFamily(
            "mrm_push_websocket_frames_sent",
            "WebSocket frames handed to client connections (notifications, answers, pings).",
            value=hub.frames_sent,
        )
        yield CounterMetricFamily(
            "mrm_push_websocket_slow_consumer_closes",
            "WebSocket clients closed with 4008 because their backlog passed max_queue.",
            value=hub.slow_consumer_closes,
        )
        yield CounterMetricFamily(
            "mrm_push_websocket_replays",
            "Replays of stored notifications (subscribe with after).",
            value=hub.replays,
        )
