"""The GraphQL request to mrm_api, shared by refresh and notify."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import HTTPRequest

from daemon.config import Backend


def graphql_request(backend: Backend, token: str | None, payload: dict[str, Any]) -> HTTPRequest:
    """A POST of `payload` to backend.url with the Bearer token, bounded by backend.timeout."""
    assert backend.url is not None  # callers check: an unset url is their own error to report
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return HTTPRequest(
        backend.url,
        method="POST",
        headers=headers,
        body=json.dumps(payload),
        request_timeout=backend.timeout,
        connect_timeout=backend.timeout,
    )
