"""FCM HTTP v1 stand-in: `messages:send` with FCM's validation and error shapes, plus controls."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import tornado.web

from daemon.clock import Clock

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# FCM documents 4096 bytes for a data message (keys and values together).
MAX_DATA_BYTES = 4096
INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"  # noqa: S105
# Real registration tokens are URL-safe base64 pieces joined by ':'; anything else is refused.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-:.]{1,4096}$")
_DURATION_RE = re.compile(r"^-?\d+(\.\d{1,9})?s$")

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
_NOT_FOUND_PAGE = (
    "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
    "  <title>Error 404 (Not Found)!!1</title>\n"
    "  <p><b>404.</b> <ins>That\u2019s an error.</ins>\n"
    "  <p>{message}  <ins>That\u2019s all we know.</ins>\n"
)


class TokenChecker(Protocol):
    """What the OAuth emulator offers the APIs (daemon/emulator/oauth.py)."""

    def verify(self, authorization_header: str | None, scope: str) -> bool: ...


# The proto messages FCM parses, as {field: sub-schema}; a sub-schema is a nested dict,
# "string", "string_map", "any" (a Struct or a field we do not look into).
_Schema = dict[str, Any]
_ANDROID_NOTIFICATION: _Schema = {
    name: "any"
    for name in (
        "title body icon color sound tag click_action body_loc_key body_loc_args "
        "title_loc_key title_loc_args channel_id ticker sticky event_time local_only "
        "notification_priority default_sound default_vibrate_timings "
        "default_light_settings vibrate_timings visibility notification_count "
        "light_settings image bypass_proxy_notification proxy"
    ).split()
}
_ANDROID: _Schema = {
    "collapse_key": "string",
    "priority": "priority",
    "ttl": "duration",
    "restricted_package_name": "string",
    "data": "string_map",
    "notification": _ANDROID_NOTIFICATION,
    "fcm_options": {"analytics_label": "string"},
    "direct_boot_ok": "any",
    "bandwidth_constrained_ok": "any",
    "restricted_satellite_ok": "any",
}
_MESSAGE: _Schema = {
    "name": "string",
    "data": "string_map",
    "notification": {"title": "string", "body": "string", "image": "string"},
    "android": _ANDROID,
    "webpush": {
        "headers": "string_map",
        "data": "string_map",
        "notification": "any",
        "fcm_options": {"link": "string", "analytics_label": "string"},
    },
    "apns": {
        "headers": "string_map",
        "payload": "any",
        "live_activity_token": "string",
        "fcm_options": {"analytics_label": "string", "image": "string"},
    },
    "fcm_options": {"analytics_label": "string"},
    "token": "string",
    "topic": "string",
    "condition": "string",
    "fid": "string",
}
_TARGETS = ("token", "topic", "condition", "fid")
_TYPE_NAMES = {
    "string": "TYPE_STRING",
    "priority": "type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority",
    "duration": "type.googleapis.com/google.protobuf.Duration",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _field(schema: _Schema, key: str) -> str | None:
    """The proto field a JSON key names: protobuf's JSON parser takes both spellings."""
    if key in schema:
        return key
    for name in schema:
        if _camel(name) == key:
            return name
    return None


class FcmApiError(Exception):
    """One error answer of the FCM API."""

    def __init__(
        self,
        code: int,
        status: str,
        message: str,
        *,
        error_code: str | None = None,
        field: str | None = None,
        retry_after: float | str | None = None,
        details: list[dict[str, Any]] | None = None,
        html: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.error_code = error_code
        self.field = field
        self.retry_after = retry_after
        self.details = details
        self.html = html  # Google's front end, not the API: an HTML page, no JSON at all

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details is not None:
            error["details"] = self.details
        elif self.error_code is not None:
            error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": self.error_code}]
        elif self.field is not None:
            violation = {"field": self.field, "description": self.message}
            error["details"] = [{"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]}]
        return {"error": error}


def _invalid(message: str, field: str | None = None) -> FcmApiError:
    return FcmApiError(400, "INVALID_ARGUMENT", message, field=field)


def _check_value(kind: Any, value: Any, path: str) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise _invalid(f"Invalid value at '{path}', {json.dumps(value)}", field=path)
        _check_object(kind, value, path)
    elif kind == "string_map":
        if not isinstance(value, dict):
            raise _invalid(f"Invalid value at '{path}', {json.dumps(value)}", field=path)
        for index, item in enumerate(value.values()):
            if not isinstance(item, str):
                where = f"{path}[{index}].value"
                raise _invalid(
                    f"Invalid value at '{where}' (TYPE_STRING), {json.dumps(item)}", field=where
                )
    elif kind in _TYPE_NAMES:
        ok = isinstance(value, str)
        if kind == "priority":
            ok = value in ("normal", "high", "NORMAL", "HIGH")
        elif kind == "duration":
            ok = isinstance(value, str) and _DURATION_RE.match(value) is not None
        if not ok:
            raise _invalid(
                f"Invalid value at '{path}' ({_TYPE_NAMES[kind]}), {json.dumps(value)}", field=path
            )


def _check_object(schema: _Schema, value: dict[str, Any], path: str) -> None:
    for key, item in value.items():
        name = _field(schema, key)
        if name is None:
            message = f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': "
            raise _invalid(message + "Cannot find field.", field=path)
        _check_value(schema[name], item, f"{path}.{name}")


def validate_request(body: Any) -> tuple[dict[str, Any], bool]:
    """Check a `messages:send` body as FCM does; return (message, validate_only) or raise."""
    if not isinstance(body, dict):
        raise _invalid("Invalid JSON payload received. Expected an object.")
    for key in body:
        if key not in ("message", "validate_only", "validateOnly"):
            raise _invalid(
                f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            )
    validate_only = body.get("validate_only", body.get("validateOnly", False))
    if not isinstance(validate_only, bool):
        raise _invalid(
            f"Invalid value at 'validate_only' (TYPE_BOOL), {json.dumps(validate_only)}",
            field="validate_only",
        )
    message = body.get("message")
    if not isinstance(message, dict):
        raise FcmApiError(
            400,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
            error_code="INVALID_ARGUMENT",
        )
    _check_object(_MESSAGE, message, "message")
    targets = [name for name in _TARGETS if _field_value(message, name) is not None]
    if not targets:
        raise FcmApiError(
            400,
            "INVALID_ARGUMENT",
            "Recipient of the message is not set.",
            error_code="INVALID_ARGUMENT",
        )
    if len(targets) > 1:
        raise _invalid(
            "Invalid JSON payload received. Oneof field 'target' is already set. "
            f"Cannot set '{targets[1]}'",
            field="message",
        )
    if data_size(message) > MAX_DATA_BYTES:
        raise FcmApiError(
            400, "INVALID_ARGUMENT", "Android message is too big", error_code="INVALID_ARGUMENT"
        )
    return message, validate_only


def _field_value(obj: dict[str, Any], name: str) -> Any:
    return obj.get(name, obj.get(_camel(name)))


def data_size(message: dict[str, Any]) -> int:
    """Bytes of the data payload (keys and values), the message's and Android's override."""
    data = dict(_field_value(message, "data") or {})
    android = _field_value(message, "android") or {}
    data.update(_field_value(android, "data") or {})
    return sum(len(k.encode()) + len(v.encode()) for k, v in data.items())


@dataclass
class _Failure:
    status: int
    retry_after: float | str | None
    message: str | None


class FcmEmulator:
    """Records accepted messages per token and answers as FCM would, failures on demand.

    Tokens are valid unless told otherwise (or malformed). Delays use real time:
    they exist to trip the client's own (real-time) timeout.
    """

    def __init__(
        self, oauth: TokenChecker, clock: Clock, *, project_id: str = "mrm-push-emulator"
    ) -> None:
        self.oauth = oauth
        self.clock = clock
        self.project_id = project_id
        self.requests = 0
        self._states: dict[str, TokenState] = {}
        self._failures: dict[str | None, deque[_Failure]] = {}
        self._delays: dict[str | None, float] = {}
        self._holds: set[str | None] = set()
        self.held = 0  # requests waiting in a hold or delay now
        self._messages: list[dict[str, Any]] = []
        self._attempts: Counter[str] = Counter()
        self._waiters: list[tuple[str, str, int, asyncio.Future[None]]] = []
        self._release = asyncio.Event()

    # -- behaviour on demand --------------------------------------------------

    def set_state(self, token: str, state: TokenState) -> None:
        """Answer this token with UNREGISTERED, SENDER_ID_MISMATCH, an invalid-token 400, or OK."""
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
        if status not in FAILURES:
            raise ValueError(f"status {status} is not one of {sorted(FAILURES)}")
        queue = self._failures.setdefault(token, deque())
        queue.extend(_Failure(status, retry_after, message) for _ in range(count))

    def delay(self, token: str | None, seconds: float) -> None:
        """Hold requests for `token` (None: every token) this many real seconds before answering."""
        if seconds > 0:
            self._delays[token] = seconds
        else:
            self._delays.pop(token, None)

    def hold_answers(self, token: str | None = None) -> None:
        """Hold the answers to requests for `token` (None: every token) until release(): no
        clock, no sleep; the request is counted (attempts) as it arrives."""
        self._holds.add(token)

    def release(self) -> None:
        """End every hold and delay now, including the requests already held."""
        self._delays.clear()
        self._holds.clear()
        self._release.set()
        self._release = asyncio.Event()

    def clear(self) -> None:
        """Forget the recorded messages and attempt counts."""
        self._messages.clear()
        self._attempts.clear()
        self.requests = 0

    def reset(self) -> None:
        """Back to a blank FCM: no messages, no token states, no queued failures or delays."""
        self.clear()
        self._states.clear()
        self._failures.clear()
        self.release()

    # -- what tests read ------------------------------------------------------

    def messages(self, token: str | None = None) -> list[dict[str, Any]]:
        """Accepted messages (oldest first): {"name", "token", "received_at", "message"}."""
        return [m for m in self._messages if token is None or m["token"] == token]

    def attempts(self, token: str) -> int:
        """How many send requests named this token, whatever the answer."""
        return self._attempts[token]

    # A timeout argument (ASYNC109) on purpose: a test reads best as one call with its bound.
    async def wait_for(
        self,
        token: str,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        """Wait until `token` has received `count` messages; return its messages."""
        await self._wait("messages", token, count, timeout)
        return self.messages(token)

    async def wait_for_attempts(
        self,
        token: str,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> int:
        """Wait until `count` send requests named `token` (answered or not)."""
        await self._wait("attempts", token, count, timeout)
        return self._attempts[token]

    async def _wait(self, what: str, token: str, count: int, limit: float) -> None:
        if self._count(what, token) >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (what, token, count, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, limit)
        except TimeoutError:
            have = self._count(what, token)
            raise TimeoutError(
                f"token ...{token[-8:]}: {have} {what} after {limit}s, wanted {count}"
            ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _count(self, what: str, token: str) -> int:
        return self._attempts[token] if what == "attempts" else len(self.messages(token))

    def _wake(self) -> None:
        for what, token, count, future in list(self._waiters):
            if not future.done() and self._count(what, token) >= count:
                future.set_result(None)

    # -- the API ----------------------------------------------------------------

    def note_attempt(self, token: str) -> None:
        self._attempts[token] += 1
        self._wake()

    async def hold(self, token: str) -> None:
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

    def send(self, project_id: str, message: dict[str, Any], validate_only: bool) -> str:
        """Decide the answer for a valid message: its name, or raise FcmApiError."""
        token = _field_value(message, "token")
        if token is not None:
            failure = self._next_failure(token)
            if failure is not None:
                raise _failure_error(failure, project_id)
            state = self._states.get(token)
            if state == "invalid" or _TOKEN_RE.match(token) is None:
                raise FcmApiError(
                    400, "INVALID_ARGUMENT", INVALID_TOKEN_MESSAGE, error_code="INVALID_ARGUMENT"
                )
            if state == "unregistered":
                raise FcmApiError(
                    404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED"
                )
            if state == "sender_id_mismatch":
                raise FcmApiError(
                    403, "PERMISSION_DENIED", "SenderId mismatch", error_code="SENDER_ID_MISMATCH"
                )
        if validate_only:
            # FCM's dry runs answer a fixed fake id and deliver nothing.
            return f"projects/{project_id}/messages/fake_message_id"
        now = self.clock.now()
        name = f"projects/{project_id}/messages/0:{int(now * 1_000_000)}%{secrets.token_hex(8)}"
        self._messages.append(
            {"name": name, "token": token, "received_at": now, "message": message}
        )
        self._wake()
        return name

    def _next_failure(self, token: str) -> _Failure | None:
        for key in (token, None):
            queue = self._failures.get(key)
            if queue:
                return queue.popleft()
        return None

    def routes(self) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
        kwargs = {"fcm": self}
        return [
            (r"/v1/projects/([^/]+)/messages:send", SendHandler, kwargs),
            (r"/emulator/fcm/messages", MessagesControl, kwargs),
            (r"/emulator/fcm/tokens", TokensControl, kwargs),
            (r"/emulator/fcm/failures", FailuresControl, kwargs),
            (r"/emulator/fcm/delay", DelayControl, kwargs),
            (r"/emulator/fcm/hold", HoldControl, kwargs),
            (r"/emulator/fcm/attempts", AttemptsControl, kwargs),
            (r"/emulator/fcm/reset", ResetControl, kwargs),
        ]


def _failure_error(failure: _Failure, project_id: str) -> FcmApiError:
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


class _Base(tornado.web.RequestHandler):
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


class SendHandler(_Base):
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
                raise _invalid("Invalid JSON payload received. Unexpected token.") from None
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


MAX_WAIT = 30.0  # seconds a GET .../messages?wait= may hold the request


class MessagesControl(_Base):
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


class TokensControl(_Base):
    """POST /emulator/fcm/tokens {"token", "state": one of TOKEN_STATES}"""

    def post(self) -> None:
        body = self.json_body()
        token, state = body.get("token"), body.get("state")
        if not isinstance(token, str) or state not in TOKEN_STATES:
            raise tornado.web.HTTPError(400, f"need token and state in {TOKEN_STATES}")
        self.fcm.set_state(token, state)
        self.finish({"token": token, "state": state})


class FailuresControl(_Base):
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


class DelayControl(_Base):
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


class HoldControl(_Base):
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


class AttemptsControl(_Base):
    """GET /emulator/fcm/attempts?token= -> {"token", "attempts"}"""

    def get(self) -> None:
        token = self.get_query_argument("token")
        self.finish({"token": token, "attempts": self.fcm.attempts(token)})


class ResetControl(_Base):
    """POST /emulator/fcm/reset: forget everything."""

    def post(self) -> None:
        self.fcm.reset()
        self.set_status(204)
        self.finish()
