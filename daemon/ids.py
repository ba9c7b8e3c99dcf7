"""What a calendar id, a name and an FCM token may look like: one rule for the API and refresh."""

from __future__ import annotations

import re

CALENDAR_ID_MAX = 1024
# FCM registration tokens are URL-safe base64 with ':' (about 160 characters today).
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_\-:.]{1,4096}")
TOKEN_RULE = "a firebase token is 1-4096 of A-Z a-z 0-9 _ - : ."  # noqa: S105 - a message
# Control characters (C0, DEL, C1) and lone surrogates: never in an id or a name. A surrogate
# cannot even be stored (it is not Unicode text), and a control character would be stored.
UNFIT_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Google's client puts the calendar id into the URL path as one segment; these two would be
# read as a path step (another resource), whatever the encoding.
PATH_STEPS = frozenset({".", ".."})


def text_problem(what: str, value: str) -> str | None:
    """Why a piece of text is refused as an id or name (None when it is fine)."""
    found = UNFIT_CHARACTERS.search(value)
    if found is None:
        return None
    if "\ud800" <= found.group() <= "\udfff":
        return f"{what} holds a lone surrogate (not Unicode text)"
    return f"{what} holds control characters"


def calendar_id_problem(calendar_id: str) -> str | None:
    """Why a calendar id is refused (None when it is fine)."""
    if not calendar_id:
        return "calendar_id is empty"
    if len(calendar_id) > CALENDAR_ID_MAX:
        return f"calendar_id is over {CALENDAR_ID_MAX} chars"
    if calendar_id in PATH_STEPS:
        return "calendar_id may not be . or .."
    return text_problem("calendar_id", calendar_id)


def valid_token(token: object) -> bool:
    return isinstance(token, str) and TOKEN_PATTERN.fullmatch(token) is not None
