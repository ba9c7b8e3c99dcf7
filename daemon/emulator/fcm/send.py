"""FCM HTTP v1's `messages:send` route: authorisation, validation, then the emulator's answer."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import tornado.web

from daemon.emulator.fcm.message import FcmApiError, invalid, validate_request

if TYPE_CHECKING:
    from daemon.emulator.fcm.emulator import FcmEmulator

Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_NOT_FOUND_PAGE = (
    "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
    "  <title>Error 404 (Not Found)!!1</title>\n"
    "  <p><b>404.</b> <ins>That\u2019s an error.</ins>\n"
    "  <p>{message}  <ins>That\u2019s all we know.</ins>\n"
)


class FcmHandler(tornado.web.RequestHandler):
    """What every FCM route shares: the emulator, JSON bodies, one error shape for the rest."""

    def initialize(self, fcm: FcmEmulator) -> None:
        self.fcm = fcm

    def check_xsrf_cookie(self) -> None:  # an API, not a browser form
        pass

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.finish({"error": {"status": status_code, "message": message}})

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, "body is not a JSON object")
        return body


class SendHandler(FcmHandler):
    """POST /v1/projects/{project_id}/messages:send"""

    closed = False

    def on_connection_close(self) -> None:
        self.closed = True

    def write_fcm_error(self, error: FcmApiError) -> None:
        self.set_status(error.code)
        if error.retry_after is not None:
            self.set_header("Retry-After", str(error.retry_after))
        if error.code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')
        if error.html:
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish(_NOT_FOUND_PAGE.format(message=error.message))
            return
        self.finish(error.body())

    async def post(self, project_id: str) -> None:
        self.fcm.requests += 1
        # Counted before any check so that tests see every request that named a token.
        token = _peek_token(self.request.body)
        if token is not None:
            self.fcm.note_attempt(token)
        try:
            self._authorize(project_id)
            try:
                body = json.loads(self.request.body)
            except ValueError:
                raise invalid("Invalid JSON payload received. Unexpected token.") from None
            message, validate_only = validate_request(body)
            if token is not None:
                await self.fcm.hold(token)
            name = self.fcm.send(project_id, message, validate_only)
        except FcmApiError as error:
            if not self.closed:
                self.write_fcm_error(error)
            return
        if not self.closed:
            self.finish({"name": name})

    def _authorize(self, project_id: str) -> None:
        header = self.request.headers.get("Authorization")
        if not self.fcm.oauth.verify(header, FCM_SCOPE):
            grant = getattr(self.fcm.oauth, "grant", None)
            if grant is not None and grant(header) is not None:
                # A live token without the scope: Google answers 403, not 401.
                raise FcmApiError(
                    403, "PERMISSION_DENIED", "Request had insufficient authentication scopes."
                )
            raise FcmApiError(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            )
        if project_id != self.fcm.project_id:
            # What Google IAM answers for a project the caller cannot send for (or that
            # does not exist); FCM's SENDER_ID_MISMATCH is about a token, not the path.
            raise FcmApiError(
                403,
                "PERMISSION_DENIED",
                "Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' "
                "(or it may not exist).",
            )


def _peek_token(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    message = body.get("message") if isinstance(body, dict) else None
    token = message.get("token") if isinstance(message, dict) else None
    return token if isinstance(token, str) else None


def send_routes(fcm: FcmEmulator) -> list[Route]:
    return [(r"/v1/projects/([^/]+)/messages:send", SendHandler, {"fcm": fcm})]
