"""The base handler: auth decisions, bounded JSON bodies, and one JSON error shape."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
from collections.abc import Awaitable
from http.client import responses
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from tornado import httputil, web

from daemon.configfile import Secrets
from daemon.ids import valid_token
from daemon.logs import SECRETS_FIELD
from daemon.redact import path_tokens
from storage.base import StoreError

if TYPE_CHECKING:
    from daemon.app import Service

log = logging.getLogger(__name__)

# Every concrete handler names one; a route whose handler has none stops the start.
AuthDecision = Literal["public", "api_key", "metrics", "webhook", "legacy", "subscriber"]
AUTH_DECISIONS: frozenset[str] = frozenset(
    {"public", "api_key", "metrics", "webhook", "legacy", "subscriber"}
)


class ApiError(web.HTTPError):
    """An error answer: `{"error": {"status", "code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, reason=None)
        self.code = code
        self.message = message


def constant_time_in(candidate: str, secrets: tuple[str, ...]) -> bool:
    """Whether `candidate` is one of `secrets`, comparing every one in constant time."""
    given = candidate.encode()
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret.encode())
    return found


def bearer_token(request: httputil.HTTPServerRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def basic_password(request: httputil.HTTPServerRequest) -> str | None:
    """The password of HTTP Basic auth, whatever the user name: `requests` turns the user-info
    of a base URL (`https://mrm:KEY@push.example`) into this, so mrm_api's unchanged calls
    can carry the API key."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon and password else None


def api_key_given(request: httputil.HTTPServerRequest) -> str:
    """The API key a request presents: Bearer, X-Api-Key or a Basic password ("" for none)."""
    return (
        bearer_token(request)
        or request.headers.get("X-Api-Key", "")
        or basic_password(request)
        or ""
    )


# Query arguments that hold tokens (the legacy routes' firebase_token, /ws's access_token).
TOKEN_ARGS = ("firebase_token", "access_token")
JSON_DEPTH_MAX = 32  # contract 2: deeper JSON is refused
# Plain ASCII digits only (str.isdigit() and int() also take Arabic-Indic or fullwidth digits,
# and isdigit() takes "²"), and few enough that int() never meets its 4,300-digit limit.
_INTEGER = re.compile(r"-?[0-9]{1,19}")
_LENGTH = re.compile(r"[0-9]{1,19}")
# json.loads turns "\\ud800" into a lone surrogate, which no store can keep (not Unicode).
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadJson(ValueError):
    """Text that is not a JSON value this service takes; the message says why, as a predicate
    ("is nested deeper than 32 levels") to follow "the body" or "the frame"."""


def _refuse_constant(name: str) -> Any:
    raise BadJson(f"holds {name}, which is not JSON")


def load_json(raw: bytes | str) -> Any:
    """Parse JSON text (a body or a WebSocket frame): UTF-8, at most JSON_DEPTH_MAX levels deep,
    no lone surrogates in any string or key, no NaN/Infinity. BadJson says what is wrong."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadJson(f"is nested deeper than {JSON_DEPTH_MAX} levels") from None
    except BadJson:
        raise
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise BadJson(f"is not JSON: {error}") from None
    # One pass over the parsed value, without recursion: depth and text of every string.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise BadJson("holds a lone surrogate (not Unicode text)")
        elif isinstance(item, dict | list):
            if depth > JSON_DEPTH_MAX:
                raise BadJson(f"is nested deeper than {JSON_DEPTH_MAX} levels")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((member, depth + 1) for member in item.values())
            else:
                stack.extend((member, depth + 1) for member in item)
    return value


def framing_refusal(headers: httputil.HTTPHeaders, limit: int) -> ApiError | None:
    """The answer to a request whose body cannot be framed (None when it can be read): a
    Content-Length that is no number or over `limit`, a Transfer-Encoding other than chunked,
    or both headers (Tornado refuses these too, with a bare 400, after our prepare())."""
    length = headers.get("Content-Length")
    encoding = headers.get("Transfer-Encoding")
    if encoding is not None:
        if length is not None:
            message = "Transfer-Encoding and Content-Length cannot both be given"
            return ApiError(400, "invalid_transfer_encoding", message)
        if encoding.lower() != "chunked":
            message = "Transfer-Encoding must be chunked, if given"
            return ApiError(400, "invalid_transfer_encoding", message)
    if length is None:
        return None
    if _LENGTH.fullmatch(length) is None:
        return ApiError(400, "invalid_content_length", "Content-Length is not a number")
    if int(length) > limit:
        return ApiError(413, "body_too_large", f"the body is over {limit} bytes")
    return None


@web.stream_request_body
class BaseHandler(web.RequestHandler):
    """JSON in, JSON out. Bodies are streamed so that Content-Length is checked before reading."""

    auth: ClassVar[str | None] = None  # one of AUTH_DECISIONS; checked at start

    _body_parts: list[bytes]
    _body_size: int

    # -- shared objects ----------------------------------------------------------------------
    @property
    def service(self) -> Service:
        return cast("Service", self.settings["service"])

    @property
    def secrets(self) -> Secrets:
        return self.service.secrets

    # -- request life ------------------------------------------------------------------------
    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    async def prepare(self) -> None:
        # The body's framing was checked before routing (handlers/edge.py), for every route.
        self._body_parts = []
        self._body_size = 0
        await self.authenticate()
        self.check_query_text()

    def check_query_text(self) -> None:
        """Every query argument UTF-8 text, refused before the handler runs: an argument read
        late (a flag read for the answer) must not fail after the store has changed."""
        for name, values in self.request.query_arguments.items():
            for value in values:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    shown = name if len(name) <= 64 else name[:61] + "..."
                    raise ApiError(
                        400, "invalid_query", f"query argument {shown!r} is not UTF-8 text"
                    ) from None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        self._body_size += len(chunk)
        limit = self.service.config.server.max_body_size
        if self._body_size > limit:
            # A chunked body has no Content-Length: stop reading as soon as it goes over.
            self.send_error(413, code="body_too_large", message=f"the body is over {limit} bytes")
            self.request.connection.close()  # type: ignore[union-attr]
            return None
        self._body_parts.append(chunk)
        return None

    async def authenticate(self) -> None:
        """Apply the handler's auth decision; raise 401 (changing nothing) when it fails."""
        decision = self.auth
        if decision == "api_key":
            if not self.has_api_key():
                raise ApiError(401, "unauthorized", "a valid API key is required")
        elif decision == "metrics":
            token = self.secrets.metrics_token
            given = bearer_token(self.request) or basic_password(self.request) or ""
            if token is not None and not constant_time_in(given, (token,)):
                raise ApiError(401, "unauthorized", "a valid metrics token is required")
        elif decision is None:  # pragma: no cover - the app refuses such routes at start
            raise ApiError(500, "no_auth_decision", "this route has no auth decision")

    def has_api_key(self) -> bool:
        given = api_key_given(self.request)
        return bool(given) and constant_time_in(given, self.secrets.api_keys)

    # -- input and output --------------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return b"".join(self._body_parts)

    def json_body(self, required: bool = True) -> dict[str, Any]:
        """The body as a JSON object ({} when empty and not required)."""
        raw = self.body
        if not raw.strip():
            if required:
                raise ApiError(400, "invalid_json", "a JSON object body is required")
            return {}
        try:
            value = load_json(raw)
        except BadJson as error:
            raise ApiError(400, "invalid_json", f"the body {error}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return value

    def int_arg(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        """A query integer: plain ASCII digits (a "-" first only where lo < 0), lo to hi."""
        text = self.str_arg(name)
        if text is None or text == "":
            return default
        if (
            _INTEGER.fullmatch(text) is None
            or (text.startswith("-") and lo >= 0)
            or not lo <= int(text) <= hi
        ):
            raise ApiError(
                400, f"invalid_{name}", f"{name} must be an integer from {lo} to {hi} (digits 0-9)"
            )
        return int(text)

    def str_arg(self, name: str) -> str | None:
        """A query argument as sent (its last value; None when absent). Not through
        get_query_argument(), which strips and turns control characters into spaces, so that a
        bad id is refused instead of read as another one."""
        raw = self.request.query_arguments.get(name)
        # UTF-8: check_query_text() has refused anything else before the handler ran.
        return raw[-1].decode("utf-8") if raw else None

    def flag_arg(self, name: str) -> bool:
        return self.str_arg(name) in ("1", "true", "yes")

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(value, separators=(",", ":")))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        if status_code == 500 and exc_info is not None and isinstance(exc_info[1], StoreError):
            # The database is down or refused: say so, and that trying again may work.
            status_code = 503
            kwargs.update(code="storage_unavailable", message=str(exc_info[1]))
            kwargs.pop("exc_info")
        super().send_error(status_code, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        code = kwargs.get("code") or responses.get(status_code, "error").lower()
        message = kwargs.get("message") or responses.get(status_code, "error")
        exc_info = kwargs.get("exc_info")
        if exc_info is not None:
            error = exc_info[1]
            if isinstance(error, ApiError):
                code, message = error.code, error.message
            elif isinstance(error, web.HTTPError) and error.log_message:
                message = error.log_message % error.args if error.args else error.log_message
        code = str(code).replace(" ", "_")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(
            json.dumps({"error": {"status": status_code, "code": code, "message": message}})
        )

    def request_tokens(self) -> list[str]:
        """The FCM and subscriber tokens this request carries (path, query, JSON body): an error
        logged for it has them shortened wherever they appear, the traceback included."""
        found: list[Any] = list(path_tokens(self.request.path))
        for name in TOKEN_ARGS:
            found.extend(
                v.decode("utf-8", "replace") for v in self.request.query_arguments.get(name, ())
            )
        raw = b"".join(getattr(self, "_body_parts", ()))  # none when it failed before prepare()
        try:
            body = load_json(raw) if raw.strip() else None
        except BadJson:
            body = None
        if isinstance(body, dict):
            listed = body.get("firebase_tokens")
            found.append(body.get("firebase_token"))
            found.extend(listed if isinstance(listed, list) else ())
        return [t for t in found if valid_token(t)]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, web.HTTPError):
            return  # answered with its status and code; the access line records it
        tokens = {SECRETS_FIELD: self.request_tokens()}
        if isinstance(value, StoreError):
            log.warning(
                "storage_error",
                extra={"path": self.request.path, "reason": str(value), **tokens},
            )
            return
        log.error(
            "handler_error",
            exc_info=(typ, value, tb),
            extra={"route": type(self).__name__, "path": self.request.path, **tokens},
        )


class NotFoundHandler(BaseHandler):
    """Any path no route matches."""

    auth = "public"

    async def prepare(self) -> None:
        raise ApiError(404, "not_found", "no such route")
