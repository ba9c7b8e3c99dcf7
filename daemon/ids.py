"""What a calendar id and an FCM token may look like: one rule for the API and for refresh."""

from __future__ import annotations

import re

CALENDAR_ID_MAX = 1024
# FCM registration tokens are URL-safe base64 with ':' (about 160 characters today).
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_\-:.]{1,4096}")
TOKEN_RULE = "a firebase token is 1-4096 of A-Z a-z 0-9 _ - : ."  # noqa: S105 - a message


def calendar_id_problem(calendar_id: str) -> str | None:
    """Why a calendar id is refused (None when it is fine)."""
    if not calendar_id:
        return "calendar_id is empty"
    if len(calendar_id) > CALENDAR_ID_MAX:
        return f"calendar_id is over {CALENDAR_ID_MAX} chars"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in calendar_id):
        return "calendar_id holds control characters"
    return None


def valid_token(token: object) -> bool:
    return isinstance(token, str) and TOKEN_PATTERN.fullmatch(token) is not None
