"""What both FCM senders share about the request: its URL, and when to refresh its token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

# google-auth itself refreshes 3 min 45 s before expiry, blocking; we refresh first, off the loop.
REFRESH_MARGIN = 300.0


def fcm_url(endpoint: str, project_id: str) -> str:
    return f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"


def needs_refresh(credential: Any, margin: float, force: bool) -> bool:
    """Whether google-auth `credential` needs a new access token before the next send."""
    if force or not credential.token:
        return True
    if credential.expiry is None:  # google-auth's "never expires"
        return False
    # google-auth keeps expiry as a naive UTC datetime, on the real clock.
    left: timedelta = credential.expiry - datetime.now(UTC).replace(tzinfo=None)
    return left < timedelta(seconds=margin)
