"""FCM senders: one HTTP request per attempt, FCM's answer turned into one outcome kind."""

from __future__ import annotations

import asyncio
import email.utils
import json
import uuid
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import google.auth.exceptions
import google.auth.transport.requests
import requests
import requests.adapters

from daemon.clock import Clock, SystemClock
from daemon.readiness import NotReady

DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# google-auth itself refreshes 3 min 45 s before expiry, blocking; we refresh first, off the loop.
REFRESH_MARGIN = 300.0

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


class FcmSender(Protocol):
    """Sends one data message to one registration token per call."""

    @property
    def max_in_flight(self) -> int:
        """Sends it runs at once without one waiting for another (the worker claims no more)."""

    async def start(self) -> None: ...

    async def send(
        self, token: str, data: dict[str, str], collapse_key: str, ttl_seconds: int
    ) -> SendOutcome: ...

    async def check(self) -> None:
        """Credentials loaded and an access token obtained; raises with the reason otherwise."""

    async def close(self) -> None: ...


def fcm_url(endpoint: str, project_id: str) -> str:
    return f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"


def shorten(text: str, token: str) -> str:
    """Never log or store a whole registration token: keep its last 8 characters."""
    if token and len(token) > 8:
        return text.replace(token, "..." + token[-8:])
    return text


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


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
    wait = parse_retry_after(retry_after, now)

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


def _needs_refresh(credential: Any, margin: float, force: bool) -> bool:
    if force or not credential.token:
        return True
    if credential.expiry is None:  # google-auth's "never expires"
        return False
    # google-auth keeps expiry as a naive UTC datetime, on the real clock.
    left: timedelta = credential.expiry - datetime.now(UTC).replace(tzinfo=None)
    return left < timedelta(seconds=margin)


def _timeout_outcome(seconds: float) -> SendOutcome:
    return SendOutcome("retry", error=f"no answer from FCM within {seconds:g} s")


class FirebaseAdminSender:
    """Sends with firebase-admin 7.7's `send_each_async`, one request per attempt.

    What firebase-admin does on its own and how this class undoes it (all of it
    private API, hence the exact pin in setup.cfg):
    - it refreshes the OAuth token with a blocking call inside the httpx auth flow:
      we refresh in the executor before it would (REFRESH_MARGIN), and stop the flow
      from refreshing on a 401 (`_max_refresh_attempts = 0`);
    - it retries 500/503 four times ignoring Retry-After: the app's async client is
      replaced by one built with `retry_config=HttpxRetry(max_retries=0)`;
    - the endpoint is the service's `_fcm_url`, set per app;
    - its httpx client belongs to the loop it first ran on, so every sender has its
      own app, deleted in close().
    """

    # Async requests: httpx's pool (100 connections by default) holds the worker's 64.
    max_in_flight = 64

    def __init__(
        self,
        service_account_file: str,
        project_id: str,
        endpoint: str,
        attempt_timeout: float,
        executor: Executor,
        *,
        clock: Clock | None = None,
        refresh_margin: float = REFRESH_MARGIN,
        notification_body: str | None = None,
    ) -> None:
        self._file = service_account_file
        self._notification_body = notification_body
        self._project_id = project_id
        self._url = fcm_url(endpoint, project_id)
        self._attempt_timeout = attempt_timeout
        self._executor = executor
        self._clock: Clock = clock or SystemClock()
        self._refresh_margin = refresh_margin
        self._app: Any = None
        self._service: Any = None
        self._credential: Any = None
        self._auth_request: google.auth.transport.requests.Request | None = None
        self._force_refresh = False
        self._refresh_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        """Load the key and set up a private firebase-admin app (no network); raises if bad."""
        async with self._start_lock:
            if self._app is None:
                await self._start()

    async def _start(self) -> None:
        import firebase_admin
        from firebase_admin import _http_client, _retry, credentials, messaging

        loop = asyncio.get_running_loop()
        cert = await loop.run_in_executor(self._executor, credentials.Certificate, self._file)
        app = firebase_admin.initialize_app(
            cert,
            {"projectId": self._project_id, "httpTimeout": self._attempt_timeout},
            name=f"mrm-push-fcm-{uuid.uuid4()}",
        )
        try:
            service = messaging._get_messaging_service(app)
            if not hasattr(service, "_fcm_url") or not hasattr(service, "_async_client"):
                raise RuntimeError("firebase-admin internals changed; daemon/fcm.py needs 7.7.0")
            service._fcm_url = self._url
            client = _http_client.HttpxAsyncClient(
                credential=service._credential,
                timeout=self._attempt_timeout,
                retry_config=_retry.HttpxRetry(max_retries=0),
            )
            client.async_client.auth._max_refresh_attempts = 0
            unused, service._async_client = service._async_client, client
            await unused.aclose()
        except BaseException:
            await loop.run_in_executor(self._executor, firebase_admin.delete_app, app)
            raise
        self._app, self._service = app, service
        self._credential = service._credential
        self._auth_request = google.auth.transport.requests.Request()

    async def check(self) -> None:
        try:
            await self.start()
        except Exception as exc:
            raise NotReady(f"could not load the service-account key: {exc}") from exc
        try:
            await self._ensure_token()
        except TimeoutError:
            raise NotReady(
                f"no access token within {self._attempt_timeout:g} s from the token endpoint"
            ) from None
        except Exception as exc:
            raise NotReady(f"could not get an access token: {exc}") from exc

    async def _ensure_token(self) -> None:
        async with self._refresh_lock:
            if not _needs_refresh(self._credential, self._refresh_margin, self._force_refresh):
                return
            loop = asyncio.get_running_loop()
            refresh = loop.run_in_executor(
                self._executor, self._credential.refresh, self._auth_request
            )
            await asyncio.wait_for(refresh, self._attempt_timeout)
            self._force_refresh = False

    async def send(
        self, token: str, data: dict[str, str], collapse_key: str, ttl_seconds: int
    ) -> SendOutcome:
        from firebase_admin import exceptions, messaging

        try:
            await self.start()
        except Exception as exc:  # a bad key: never drop the delivery, let readiness say why
            return SendOutcome("retry", error=f"could not load the service-account key: {exc}")
        try:
            await self._ensure_token()
        except TimeoutError:
            return SendOutcome("retry", error="no access token in time")
        except (google.auth.exceptions.GoogleAuthError, requests.RequestException) as exc:
            return SendOutcome("retry", error=f"could not get an access token: {exc}")
        with warnings.catch_warnings():
            # 7.7 deprecates `token` for `fid` (installation ids); the tablets hand us
            # registration tokens, which FCM HTTP v1 takes as `message.token`.
            warnings.simplefilter("ignore", DeprecationWarning)
            body = self._notification_body
            message = messaging.Message(
                token=token,
                data=data,
                # fcm.notification_body: for tablet builds that read getNotification().
                notification=messaging.Notification(body=body) if body is not None else None,
                android=messaging.AndroidConfig(
                    priority="high", collapse_key=collapse_key, ttl=timedelta(seconds=ttl_seconds)
                ),
            )
        try:
            batch = await asyncio.wait_for(
                messaging.send_each_async([message], dry_run=False, app=self._app),
                self._attempt_timeout,
            )
        except TimeoutError:
            return _timeout_outcome(self._attempt_timeout)
        except ValueError as exc:  # firebase-admin's own check of the message
            return SendOutcome("fatal", error=shorten(str(exc), token))
        except exceptions.FirebaseError as exc:
            return self._from_error(exc, token)
        result = batch.responses[0]
        if result.success:
            return SendOutcome("sent", message_id=result.message_id, status=200)
        return self._from_error(result.exception, token)

    def _from_error(self, exc: Any, token: str) -> SendOutcome:
        response = getattr(exc, "http_response", None)
        if response is None:
            # No answer at all: timeout, connection refused or reset, token refresh failure.
            return SendOutcome("retry", error=shorten(str(exc), token))
        outcome = classify(
            response.status_code,
            response.content,
            response.headers.get("Retry-After"),
            token=token,
            now=self._clock.now(),
        )
        if outcome.status == 401:
            self._force_refresh = True
        return outcome

    async def close(self) -> None:
        app, service, self._app, self._service = self._app, self._service, None, None
        if app is None:
            return
        import firebase_admin

        await service._async_client.aclose()
        # delete_app() closes the (now closed) client through asyncio.run(), which
        # cannot run on a running loop: it goes to the executor.
        await asyncio.get_running_loop().run_in_executor(
            self._executor, firebase_admin.delete_app, app
        )
        if self._auth_request is not None:
            self._auth_request.session.close()


def make_sender(backend: str, **kwargs: Any) -> FcmSender:
    """The sender for `fcm.backend`: "firebase-admin" (default) or "pyfcm"."""
    if backend == "firebase-admin":
        return FirebaseAdminSender(**kwargs)
    if backend == "pyfcm":
        from daemon.fcm_pyfcm import PyFcmSender  # pyfcm is loaded only when chosen

        return PyFcmSender(**kwargs)
    raise ValueError(f"unknown fcm.backend {backend!r}: use firebase-admin or pyfcm")
