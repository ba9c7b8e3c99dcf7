"""FcmEmulator: the one object tests and the emulator app use for FCM, over its parts."""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from daemon.clock import Clock
from daemon.emulator.fcm.control import control_routes
from daemon.emulator.fcm.failures import Behaviour, TokenState
from daemon.emulator.fcm.inbox import Inbox
from daemon.emulator.fcm.message import field_value
from daemon.emulator.fcm.send import Route, send_routes


class TokenChecker(Protocol):
    """What the OAuth emulator offers the APIs (daemon/emulator/oauth.py)."""

    def verify(self, authorization_header: str | None, scope: str) -> bool: ...


class FcmEmulator:
    """Records accepted messages per token and answers as FCM would, failures on demand.

    Tokens are valid unless told otherwise (or malformed). Delays use real time:
    they exist to trip the client's own (real-time) timeout; holds use none.
    """

    def __init__(
        self, oauth: TokenChecker, clock: Clock, *, project_id: str = "mrm-push-emulator"
    ) -> None:
        self.oauth = oauth
        self.clock = clock
        self.project_id = project_id
        self.requests = 0
        self.behaviour = Behaviour()
        self.inbox = Inbox()

    # -- behaviour on demand --------------------------------------------------

    def set_state(self, token: str, state: TokenState) -> None:
        """Answer this token with UNREGISTERED, SENDER_ID_MISMATCH, an invalid-token 400, or OK."""
        self.behaviour.set_state(token, state)

    def fail(
        self,
        token: str | None,
        status: int,
        count: int = 1,
        *,
        retry_after: float | str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next `count` requests for `token` (None: any token) with this status.

        `retry_after` (seconds, or an HTTP date string) is sent as the Retry-After header.
        403 is FCM's answer for a project whose FCM API is disabled, 404 Google's front end's
        for an endpoint it does not know (HTML): neither carries an FCM errorCode.
        """
        self.behaviour.fail(token, status, count, retry_after, message)

    def delay(self, token: str | None, seconds: float) -> None:
        """Hold requests for `token` (None: every token) this many real seconds before answering."""
        self.behaviour.delay(token, seconds)

    def hold_answers(self, token: str | None = None) -> None:
        """Hold the answers to requests for `token` (None: every token) until release(): no
        clock, no sleep; the request is counted (attempts) as it arrives."""
        self.behaviour.hold_answers(token)

    def stop_holding(self, token: str | None = None) -> None:
        """Answer requests for `token` that arrive from now on at once again; the ones held
        already stay held until release() (as after `delay(token, 0)`)."""
        self.behaviour.stop_holding(token)

    def release(self) -> None:
        """End every hold and delay now, including the requests already held."""
        self.behaviour.release()

    def clear(self) -> None:
        """Forget the recorded messages and attempt counts."""
        self.inbox.clear()
        self.requests = 0

    def reset(self) -> None:
        """Back to a blank FCM: no messages, no token states, no queued failures or delays."""
        self.clear()
        self.behaviour.reset()

    # -- what tests read ------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests waiting in a hold or delay now."""
        return self.behaviour.held

    def messages(self, token: str | None = None) -> list[dict[str, Any]]:
        """Accepted messages (oldest first): {"name", "token", "received_at", "message"}."""
        return self.inbox.messages(token)

    def attempts(self, token: str) -> int:
        """How many send requests named this token, whatever the answer."""
        return self.inbox.attempts(token)

    # A timeout argument (ASYNC109) on purpose: a test reads best as one call with its bound.
    async def wait_for(
        self,
        token: str,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        """Wait until `token` has received `count` messages; return its messages."""
        await self.inbox.wait("messages", token, count, timeout)
        return self.messages(token)

    async def wait_for_attempts(
        self,
        token: str,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> int:
        """Wait until `count` send requests named `token` (answered or not)."""
        await self.inbox.wait("attempts", token, count, timeout)
        return self.attempts(token)

    # -- the API ----------------------------------------------------------------

    def note_attempt(self, token: str) -> None:
        self.inbox.note_attempt(token)

    async def hold(self, token: str) -> None:
        await self.behaviour.hold(token)

    def send(self, project_id: str, message: dict[str, Any], validate_only: bool) -> str:
        """Decide the answer for a valid message: its name, or raise FcmApiError."""
        token = field_value(message, "token")
        if token is not None:
            refusal = self.behaviour.refusal(token, project_id)
            if refusal is not None:
                raise refusal
        if validate_only:
            # FCM's dry runs answer a fixed fake id and deliver nothing.
            return f"projects/{project_id}/messages/fake_message_id"
        now = self.clock.now()
        name = f"projects/{project_id}/messages/0:{int(now * 1_000_000)}%{secrets.token_hex(8)}"
        self.inbox.record(name, token, now, message)
        return name

    def routes(self) -> list[Route]:
        return [*send_routes(self), *control_routes(self)]
