"""The control API for FCM (/emulator/fcm/...): the inbox, token states, failures, holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tornado.web

from daemon.emulator.fcm.failures import FAILURES, TOKEN_STATES
from daemon.emulator.fcm.send import FcmHandler, Route

if TYPE_CHECKING:
    from daemon.emulator.fcm.emulator import FcmEmulator

MAX_WAIT = 30.0  # seconds a GET .../messages?wait= may hold the request


class MessagesControl(FcmHandler):
    """GET /emulator/fcm/messages?token=[&count=N&wait=seconds]  ·  DELETE (clear messages and
    attempts). With `wait`, the answer comes once the token has `count` (1) messages, or 408."""

    async def get(self) -> None:
        token = self.get_query_argument("token", None)
        wait = self.get_query_argument("wait", None)
        if wait is not None:
            try:
                seconds = min(float(wait), MAX_WAIT)
                count = int(self.get_query_argument("count", "1"))
            except ValueError:
                raise tornado.web.HTTPError(400, "wait and count must be numbers") from None
            if token is None:
                raise tornado.web.HTTPError(400, "wait needs a token")
            try:
                await self.fcm.wait_for(token, count, seconds)
            except TimeoutError as error:
                raise tornado.web.HTTPError(408, str(error)) from None
        self.finish({"messages": self.fcm.messages(token)})

    def delete(self) -> None:
        self.fcm.clear()
        self.set_status(204)
        self.finish()


class TokensControl(FcmHandler):
    """POST /emulator/fcm/tokens {"token", "state": one of TOKEN_STATES}"""

    def post(self) -> None:
        body = self.json_body()
        token, state = body.get("token"), body.get("state")
        if not isinstance(token, str) or state not in TOKEN_STATES:
            raise tornado.web.HTTPError(400, f"need token and state in {TOKEN_STATES}")
        self.fcm.set_state(token, state)
        self.finish({"token": token, "state": state})


class FailuresControl(FcmHandler):
    """POST /emulator/fcm/failures {"token"?, "status", "count"?, "retry_after"?, "message"?}"""

    def post(self) -> None:
        body = self.json_body()
        token, status, count = body.get("token"), body.get("status"), body.get("count", 1)
        retry_after = body.get("retry_after")
        if (
            (token is not None and not isinstance(token, str))
            or status not in FAILURES
            or not isinstance(count, int)
            or count < 1
            or (retry_after is not None and not isinstance(retry_after, int | float | str))
        ):
            raise tornado.web.HTTPError(400, f"need status in {sorted(FAILURES)}, count >= 1")
        self.fcm.fail(token, status, count, retry_after=retry_after, message=body.get("message"))
        self.finish({"token": token, "status": status, "count": count})


class DelayControl(FcmHandler):
    """POST /emulator/fcm/delay {"token"?, "seconds"} (0 ends it)"""

    def post(self) -> None:
        body = self.json_body()
        token, seconds = body.get("token"), body.get("seconds")
        if (token is not None and not isinstance(token, str)) or not isinstance(
            seconds, int | float
        ):
            raise tornado.web.HTTPError(400, "need seconds")
        self.fcm.delay(token, float(seconds))
        if not seconds:
            self.fcm.release()
        self.finish({"token": token, "seconds": seconds})


class HoldControl(FcmHandler):
    """POST /emulator/fcm/hold {"token"?}: hold answers until released  ·  DELETE: release all"""

    def post(self) -> None:
        token = self.json_body().get("token")
        if token is not None and not isinstance(token, str):
            raise tornado.web.HTTPError(400, "token must be a string")
        self.fcm.hold_answers(token)
        self.finish({"token": token, "held": True})

    def delete(self) -> None:
        self.fcm.release()
        self.set_status(204)
        self.finish()


class AttemptsControl(FcmHandler):
    """GET /emulator/fcm/attempts?token= -> {"token", "attempts"}"""

    def get(self) -> None:
        token = self.get_query_argument("token")
        self.finish({"token": token, "attempts": self.fcm.attempts(token)})


class ResetControl(FcmHandler):
    """POST /emulator/fcm/reset: forget everything."""

    def post(self) -> None:
        self.fcm.reset()
        self.set_status(204)
        self.finish()


def control_routes(fcm: FcmEmulator) -> list[Route]:
    kwargs = {"fcm": fcm}
    return [
        (r"/emulator/fcm/messages", MessagesControl, kwargs),
        (r"/emulator/fcm/tokens", TokensControl, kwargs),
        (r"/emulator/fcm/failures", FailuresControl, kwargs),
        (r"/emulator/fcm/delay", DelayControl, kwargs),
        (r"/emulator/fcm/hold", HoldControl, kwargs),
        (r"/emulator/fcm/attempts", AttemptsControl, kwargs),
        (r"/emulator/fcm/reset", ResetControl, kwargs),
    ]
