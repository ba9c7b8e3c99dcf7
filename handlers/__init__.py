"""Tornado request handlers, one module per area; `all_routes()` joins their route lists."""

from __future__ import annotations

import re
from typing import Any

from tornado import web

from handlers.base import AUTH_DECISIONS


class RouteWithoutAuth(Exception):
    """A route's handler names no auth decision: the service refuses to start."""


def all_routes(webhook_path: str = "/notifications") -> list[tuple[str, type[web.RequestHandler]]]:
    from handlers import (
        deliveries,
        health,
        legacy,
        notifications,
        refresh,
        rooms,
        webhook,
        websocket,
    )

    return [
        *health.routes,
        *rooms.routes,
        *refresh.routes,
        *notifications.routes,
        *deliveries.routes,
        *legacy.routes,
        *websocket.routes,
        (re.escape(webhook_path), webhook.WebhookHandler),
    ]


def check_auth_decisions(routes: list[tuple[str, Any]]) -> None:
    """Every route's handler must name its own auth decision (not merely inherit none)."""
    for pattern, handler in routes:
        decision = getattr(handler, "auth", None)
        if decision not in AUTH_DECISIONS:
            raise RouteWithoutAuth(f"route {pattern} ({handler.__name__}) has no auth decision")
