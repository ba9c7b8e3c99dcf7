"""Google's error answers for the Calendar API: reasons, their statuses, and the JSON body."""

from __future__ import annotations

from typing import Any

REASONS: dict[str, tuple[int, str, str]] = {
    # reason: (status, domain, message)
    "invalid": (400, "global", "Invalid Value"),
    "required": (400, "global", "Required"),
    "channelIdNotUnique": (400, "global", "Channel id not unique"),
    "authError": (401, "global", "Invalid Credentials"),
    "forbidden": (403, "global", "Forbidden"),
    "insufficientPermissions": (403, "global", "Insufficient Permission"),
    "rateLimitExceeded": (403, "usageLimits", "Rate Limit Exceeded"),
    "userRateLimitExceeded": (403, "usageLimits", "User Rate Limit Exceeded"),
    "quotaExceeded": (403, "usageLimits", "Calendar usage limits exceeded."),
    "notFound": (404, "global", "Not Found"),
    "fullSyncRequired": (
        410,
        "global",
        "Sync token is no longer valid, a full sync is required.",
    ),
    "backendError": (500, "global", "Backend Error"),
}
_DEFAULT_REASON = {
    400: "invalid",
    401: "authError",
    403: "forbidden",
    404: "notFound",
    410: "fullSyncRequired",
    429: "rateLimitExceeded",
}
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class GoogleApiError(Exception):
    """An error answer, rendered as Google's JSON error body."""

    def __init__(self, status: int, reason: str | None = None, message: str | None = None) -> None:
        reason = reason or _DEFAULT_REASON.get(status, "backendError")
        _, domain, default_message = REASONS.get(reason, (status, "global", "Error"))
        super().__init__(message or default_message)
        self.status = status
        self.reason = reason
        self.domain = domain
        self.message = message or default_message

    def body(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "domain": self.domain,
            "reason": self.reason,
            "message": self.message,
        }
        if self.reason == "fullSyncRequired":
            detail.update(locationType="parameter", location="syncToken")
        if self.reason == "authError":
            detail.update(locationType="header", location="Authorization")
        error: dict[str, Any] = {"code": self.status, "message": self.message, "errors": [detail]}
        if self.status in _STATUS_NAMES:
            error["status"] = _STATUS_NAMES[self.status]
        return {"error": error}


def error_for(
    status: int | None = None, reason: str | None = None, message: str | None = None
) -> GoogleApiError:
    """A Google error from a status, a reason, or both (the other is filled in)."""
    if status is None:
        status = REASONS[reason][0] if reason in REASONS else 500
    return GoogleApiError(status, reason, message)
