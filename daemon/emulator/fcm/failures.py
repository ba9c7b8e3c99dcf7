"""FCM's behaviour on demand: token states, queued failures, late and held answers."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from dataclasses import dataclass
from typing import Literal

from daemon.emulator.fcm.message import FcmApiError

INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"  # noqa: S105
# Real registration tokens are URL-safe base64 pieces joined by ':'; anything else is refused.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-:.]{1,4096}$")

TokenState = Literal["valid", "unregistered", "sender_id_mismatch", "invalid"]
TOKEN_STATES: tuple[str, ...] = ("valid", "unregistered", "sender_id_mismatch", "invalid")

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"

# status code -> (canonical status, FcmError errorCode, message), as FCM answers them. 403 and
# 404 come without an errorCode: they are about the project or the endpoint, not a token (the
# API disabled in the project; a URL Google's front end does not know, answered in HTML).
FAILURES: dict[int, tuple[str, str | None, str]] = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    403: (
        "PERMISSION_DENIED",
        None,
        "Firebase Cloud Messaging API has not been used in project {project} before or it is "
        "disabled. Enable it by visiting https://console.developers.google.com/apis/api/"
        "fcm.googleapis.com/overview?project={project} then retry. If you enabled this API "
        "recently, wait a few minutes for the action to propagate to our systems and retry.",
    ),
    404: ("NOT_FOUND", None, "The requested URL {path} was not found on this server."),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for sending messages."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}


@dataclass
class QueuedFailure:
    status: int
    retry_after: float | str | None
    message: str | None


def failure_error(failure: QueuedFailure, project_id: str) -> FcmApiError:
    """The answer a queued failure stands for, shaped as FCM (or Google's front end) sends it."""
    status, error_code, text = FAILURES[failure.status]
    path = f"/v1/projects/{project_id}/messages:send"
    message = failure.message or text.format(project=project_id, path=path)
    details = None
    if failure.status == 403:
        info = {"service": "fcm.googleapis.com", "consumer": f"projects/{project_id}"}
        details = [
            {
                "@type": ERROR_INFO_TYPE,
                "reason": "SERVICE_DISABLED",
                "domain": "googleapis.com",
                "metadata": info,
            }
        ]
    return FcmApiError(
        failure.status,
        status,
        message,
        error_code=error_code,
        retry_after=failure.retry_after,
        details=details,
        html=failure.status == 404,
    )


class Behaviour:
    """How FCM answers each token: its state, failures queued for it, delays and holds.

    Delays use real time: they exist to trip the client's own (real-time) timeout. Holds use
    no time at all: a held answer waits until release().
    """

    def __init__(self) -> None:
        self._states: dict[str, TokenState] = {}
        self._failures: dict[str | None, deque[QueuedFailure]] = {}
        self._delays: dict[str | None, float] = {}
        self._holds: set[str | None] = set()
        self.held = 0  # requests waiting in a hold or delay now
        self._release = asyncio.Event()

    def set_state(self, token: str, state: TokenState) -> None:
        if state not in TOKEN_STATES:
            raise ValueError(f"unknown token state {state!r}")
        if state == "valid":
            self._states.pop(token, None)
        else:
            self._states[token] = state

    def fail(
        self,
        token: str | None,
        status: int,
        count: int,
        retry_after: float | str | None,
        message: str | None,
    ) -> None:
        if status not in FAILURES:
            raise ValueError(f"status {status} is not one of {sorted(FAILURES)}")
        queue = self._failures.setdefault(token, deque())
        queue.extend(QueuedFailure(status, retry_after, message) for _ in range(count))

    def delay(self, token: str | None, seconds: float) -> None:
        if seconds > 0:
            self._delays[token] = seconds
        else:
            self._delays.pop(token, None)

    def hold_answers(self, token: str | None) -> None:
        self._holds.add(token)

    def stop_holding(self, token: str | None) -> None:
        self._holds.discard(token)

    def release(self) -> None:
        self._delays.clear()
        self._holds.clear()
        self._release.set()
        # Requests held from now on wait for the next release(), not this one.
        self._release = asyncio.Event()

    def reset(self) -> None:
        self._states.clear()
        self._failures.clear()
        self.release()

    async def hold(self, token: str) -> None:
        """Wait as a delay or hold on `token` (or on every token) says, if one does."""
        seconds = self._delays.get(token, self._delays.get(None))
        held = token in self._holds or None in self._holds
        if seconds or held:
            release = self._release
            self.held += 1
            try:
                await asyncio.wait_for(release.wait(), None if held else seconds)
            except TimeoutError:
                pass
            finally:
                self.held -= 1

    def refusal(self, token: str, project_id: str) -> FcmApiError | None:
        """FCM's error for a send to `token`, if any: a queued failure first, then the token."""
        for key in (token, None):
            queue = self._failures.get(key)
            if queue:
                return failure_error(queue.popleft(), project_id)
        state = self._states.get(token)
        if state == "invalid" or _TOKEN_RE.match(token) is None:
            return FcmApiError(
                400, "INVALID_ARGUMENT", INVALID_TOKEN_MESSAGE, error_code="INVALID_ARGUMENT"
            )
        if state == "unregistered":
            return FcmApiError(
                404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED"
            )
        if state == "sender_id_mismatch":
            return FcmApiError(
                403, "PERMISSION_DENIED", "SenderId mismatch", error_code="SENDER_ID_MISMATCH"
            )
        return None
