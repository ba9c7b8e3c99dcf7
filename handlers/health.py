"""Liveness, readiness and metrics: the routes operators and systemd look at."""

from __future__ import annotations

from typing import Any

from handlers.base import BaseHandler


class HealthHandler(BaseHandler):
    """GET /healthz: the process answers."""

    auth = "public"

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """GET /readyz: storage reachable, Google and FCM credentials loaded and a token obtained."""

    auth = "public"

    async def get(self) -> None:
        checks = await self.service.readiness()
        ready = all(result == "ok" for result in checks.values())
        body: dict[str, Any] = {"status": "ready" if ready else "unready", "checks": checks}
        self.write_json(body, 200 if ready else 503)


class MetricsHandler(BaseHandler):
    """GET /metrics: Prometheus text; behind auth.metrics_token when that is set."""

    auth = "metrics"

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.service.metrics.render())


routes = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
    (r"/metrics", MetricsHandler),
]
