"""The access log and the request metrics: one line and one count per request, by route name."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from tornado import web

from daemon.metrics import OTHER, Metrics, method_label, status_label

access_log = logging.getLogger("mrm_push.access")


class AccessLog:
    """Tornado's `log_function`: the request's line in mrm_push.access, and its metrics."""

    def __init__(self, metrics: Metrics, handlers: Iterable[type[web.RequestHandler]]) -> None:
        self.metrics = metrics
        # The route label's values: the handlers' names, a set fixed here.
        self.route_names = frozenset(handler.__name__ for handler in handlers)

    def __call__(self, handler: web.RequestHandler) -> None:
        request = handler.request
        status = handler.get_status()
        seconds = request.request_time()
        route = type(handler).__name__
        route = route if route in self.route_names else OTHER
        method = method_label(request.method)  # a made-up one is never a label nor logged
        self.metrics.requests.labels(route, method, status_label(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        level = logging.INFO if status < 500 else logging.ERROR
        extra: dict[str, Any] = {
            "method": method,
            "path": request.path,  # never the query string: it may hold tokens
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "remote": request.remote_ip,  # the caller (behind a trusted proxy: the forwarded one)
            "scheme": request.protocol,
        }
        access_log.log(level, "request", extra=extra)
