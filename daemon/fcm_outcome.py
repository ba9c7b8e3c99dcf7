"""FCM HTTP v1's answer read as one outcome kind, and an outcome told in one line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from daemon.backoff import retry_after_seconds

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

# project_refused: 403 or 404 without an FCM errorCode (the API disabled, a wrong endpoint or
# project): nothing is wrong with the token, and every other delivery would get the same.
OutcomeKind = Literal[
    "sent", "unregistered", "sender_mismatch", "project_refused", "retry", "fatal"
]
_RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class SendOutcome:
    """What one attempt came to.

    `error` is FCM's message (or ours for timeouts and connection errors), with the
    token shortened; `message_id` is the name FCM gave ("projects/p/messages/id");
    `status` the HTTP status and `code` FCM's errorCode (or canonical status), when known.
    """

    kind: OutcomeKind
    retry_after: float | None = None
    error: str | None = None
    message_id: str | None = None
    status: int | None = None
    code: str | None = None


def shorten(text: str, token: str) -> str:
    """Never log or store a whole registration token: keep its last 8 characters."""
    if token and len(token) > 8:
        return text.replace(token, "..." + token[-8:])
    return text


def timeout_outcome(seconds: float) -> SendOutcome:
    """An attempt FCM did not answer in time: its outcome is unknown, so it is retried."""
    return SendOutcome("retry", error=f"no answer from FCM within {seconds:g} s")


def describe(outcome: SendOutcome) -> str:
    """FCM's answer for last_error and logs: "CODE (HTTP n): message"."""
    head = " ".join(
        part
        for part in (outcome.code, f"(HTTP {outcome.status})" if outcome.status else None)
        if part
    )
    text = outcome.error or outcome.kind
    return f"{head}: {text}" if head else text


def classify(
    status: int, body: bytes | str, retry_after: str | None, *, token: str, now: float
) -> SendOutcome:
    """FCM HTTP v1's answer as an outcome, by FCM's errorCode first, then the HTTP status."""
    payload: Any = None
    try:
        payload = json.loads(body)
    except ValueError:
        pass
    error = payload.get("error") if isinstance(payload, dict) else None
    if 200 <= status < 300:
        name = payload.get("name") if isinstance(payload, dict) else None
        return SendOutcome(
            "sent", message_id=name if isinstance(name, str) else None, status=status
        )
    if not isinstance(error, dict):
        error = {}
    message = error.get("message")
    text = shorten(message, token) if isinstance(message, str) else f"HTTP {status}"
    error_code: str | None = None
    fields: list[str] = []
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == FCM_ERROR_TYPE and error_code is None:
            error_code = detail.get("errorCode")
        elif detail.get("@type") == BAD_REQUEST_TYPE:
            fields += [v.get("field") for v in detail.get("fieldViolations") or []]
    code = error_code or error.get("status")
    wait = retry_after_seconds(retry_after, now)

    def outcome(kind: OutcomeKind) -> SendOutcome:
        return SendOutcome(kind, retry_after=wait, error=text, status=status, code=code)

    # Only FCM's own errorCode drops a token: a bare 404 or 403 is as likely a wrong
    # endpoint or project, and must not wipe every tablet.
    if error_code == "UNREGISTERED":
        return outcome("unregistered")
    if error_code == "SENDER_ID_MISMATCH":
        return outcome("sender_mismatch")
    if (
        status == 400
        and code == "INVALID_ARGUMENT"
        and ("registration token" in text.lower() or "message.token" in fields)
    ):
        return outcome("unregistered")
    if error_code in _RETRY_CODES or status in _RETRY_STATUSES:
        return outcome("retry")
    if status == 401 and error_code != "THIRD_PARTY_AUTH_ERROR":
        # Our access token was refused (revoked, or FCM's clock ahead): get a new one, retry.
        return outcome("retry")
    if status in (403, 404) and error_code is None:
        if not isinstance(message, str):  # not FCM's JSON at all: most likely not FCM's URL
            text = f"HTTP {status} without an FCM error: check fcm.endpoint and fcm.project_id"
        return outcome("project_refused")
    return outcome("fatal")
