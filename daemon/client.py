"""The operator commands' client of a running service: its HTTP API and its /ws feed.

Through tornado's own clients; every failure is one line saying what answered (or what did
not)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.simple_httpclient import HTTPTimeoutError
from tornado.websocket import WebSocketClientConnection, websocket_connect

CONNECT_TIMEOUT = 5.0  # seconds; the request timeout is the command's --timeout
BODY_SHOWN = 200  # characters of a non-JSON error answer put in the line


class CommandFailed(Exception):
    """What ends a command with one line on stderr and `exit_code` (1: the service said no or
    could not be reached; 2: the command line or the config is wrong)."""

    exit_code = 1


class UsageError(CommandFailed):
    exit_code = 2


class ServiceError(CommandFailed):
    """The service answered with an error: its status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class Unreachable(CommandFailed):
    """No HTTP answer from the URL: refused, unknown host, timed out, cut off."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url


def split_url(url: str) -> tuple[str, str | None]:
    """(the base URL without user-info or a trailing slash, the user-info's password or None).
    A password in the URL is taken as the API key, as the service takes a Basic password;
    the URL shown in any message never holds it."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises on a port that is no number
    except ValueError as error:
        raise UsageError(f"--url: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("--url: give http://host[:port] or https://host[:port]")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # IPv6: urlsplit took the brackets off
    netloc = host if port is None else f"{host}:{port}"
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return base, parts.password or None


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # parsed JSON, the text for a non-JSON answer, None when empty
    text: str


class ApiClient:
    """Calls on one service; `base_url` holds no secret (see split_url)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout
        self._http = AsyncHTTPClient(force_instance=True)

    def close(self) -> None:
        self._http.close()

    def url(self, path: str, query: dict[str, Any] | None = None) -> str:
        given = {k: v for k, v in (query or {}).items() if v is not None}
        return self.base_url + path + (f"?{urlencode(given)}" if given else "")

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        token: str | None = None,
        auth: bool = True,
        ok: tuple[int, ...] = (),
    ) -> Answer:
        """One request; raises ServiceError for a 4xx/5xx (unless its status is in `ok`) and
        Unreachable when nothing answered. `token` replaces the API key (the metrics token)."""
        headers = {"Accept": "application/json"}
        secret = token if token is not None else (self.api_key if auth else None)
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        payload = None if body is None else json.dumps(body).encode()
        if payload is None and method in ("POST", "PUT"):
            payload = b""
        if payload:
            headers["Content-Type"] = "application/json"
        request = HTTPRequest(
            self.url(path, query),
            method=method,
            headers=headers,
            body=payload,
            connect_timeout=min(CONNECT_TIMEOUT, self.timeout),
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except HTTPTimeoutError:
            raise Unreachable(self.base_url, f"no answer within {self.timeout:g} s") from None
        except HTTPClientError as error:  # no HTTP answer (599): a cut connection
            raise Unreachable(self.base_url, error.message or str(error)) from None
        except OSError as error:  # refused, unknown host, TLS
            raise Unreachable(self.base_url, error.strerror or str(error)) from None
        if response.code == 599:
            reason = str(response.error) if response.error else "no answer"
            raise Unreachable(self.base_url, reason)
        answer = _answer(response)
        if answer.status >= 400 and answer.status not in ok:
            raise _service_error(answer, method, path)
        return answer

    async def get(self, path: str, **query: Any) -> Any:
        return (await self.call("GET", path, query=query)).body

    def ws_url(self) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws"

    async def websocket(self, token: str) -> WebSocketClientConnection:
        """Open /ws with a subscriber token; raises ServiceError when refused before the
        upgrade (401, 403, 503), Unreachable when nothing answered."""
        request = HTTPRequest(
            self.ws_url(),
            headers={"Authorization": f"Bearer {token}"},
            connect_timeout=min(CONNECT_TIMEOUT, self.timeout),
            request_timeout=self.timeout,
        )
        try:
            # Our own pings find a server that went away without closing (a dead host).
            return await websocket_connect(request, ping_interval=25, ping_timeout=25)
        except HTTPClientError as error:
            if error.response is None or error.code == 599:
                raise Unreachable(self.ws_url(), error.message or str(error)) from None
            raise _service_error(_answer(error.response), "GET", "/ws") from None
        except OSError as error:
            raise Unreachable(self.ws_url(), error.strerror or str(error)) from None


def path_of(*parts: str) -> str:
    """A path with each id percent-encoded whole ("/" included)."""
    return "".join("/" + quote(part, safe="") for part in parts)


def _answer(response: HTTPResponse) -> Answer:
    text = response.body.decode("utf-8", "replace") if response.body else ""
    body: Any = text or None
    if response.headers.get("Content-Type", "").startswith("application/json") and text:
        try:
            body = json.loads(text)
        except ValueError:
            pass
    return Answer(response.code, body, text)


def _service_error(answer: Answer, method: str, path: str) -> ServiceError:
    body = answer.body
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "code" in error:
        return ServiceError(answer.status, str(error["code"]), str(error.get("message", "")))
    # Not the service's error shape (a proxy's page, say): its first line, shortened.
    first = answer.text.strip().splitlines()[0][:BODY_SHOWN] if answer.text.strip() else ""
    return ServiceError(answer.status, "http_error", f"{method} {path}: {first or 'no body'}")
