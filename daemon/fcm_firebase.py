"""The firebase-admin sender: `send_each_async`, one request per attempt, no retries of its own."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests

from daemon.clock import Clock, SystemClock
from daemon.fcm_auth import REFRESH_MARGIN, fcm_url, needs_refresh
from daemon.fcm_outcome import SendOutcome, classify, shorten, timeout_outcome
from daemon.readiness import NotReady

# setup.cfg pins firebase-admin==7.7.0 for this module: the three functions below are all the
# private API it touches (firebase_admin._http_client, _retry, messaging internals). Before
# moving the pin, check each against the new version's source.


def _messaging_service(app: Any) -> Any:
    from firebase_admin import messaging

    return messaging._get_messaging_service(app)


async def _patch(service: Any, url: str, http_timeout: float) -> None:
    """Aim `service` at `url`, with an async client that neither retries nor refreshes."""
    from firebase_admin import _http_client, _retry

    if not hasattr(service, "_fcm_url") or not hasattr(service, "_async_client"):
        raise RuntimeError("firebase-admin internals changed; daemon/fcm_firebase.py needs 7.7.0")
    service._fcm_url = url
    client = _http_client.HttpxAsyncClient(
        credential=service._credential,
        timeout=http_timeout,
        retry_config=_retry.HttpxRetry(max_retries=0),
    )
    client.async_client.auth._max_refresh_attempts = 0
    unused, service._async_client = service._async_client, client
    await unused.aclose()


def _credential_and_client(service: Any) -> tuple[Any, Any]:
    """The service's google-auth credential and its (patched) async client."""
    return service._credential, service._async_client


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
        self._client: Any = None
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
        from firebase_admin import credentials

        loop = asyncio.get_running_loop()
        cert = await loop.run_in_executor(self._executor, credentials.Certificate, self._file)
        app = firebase_admin.initialize_app(
            cert,
            {"projectId": self._project_id, "httpTimeout": self._attempt_timeout},
            name=f"mrm-push-fcm-{uuid.uuid4()}",
        )
        try:
            service = _messaging_service(app)
            await _patch(service, self._url, self._attempt_timeout)
        except BaseException:
            await loop.run_in_executor(self._executor, firebase_admin.delete_app, app)
            raise
        self._app = app
        self._credential, self._client = _credential_and_client(service)
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
            if not needs_refresh(self._credential, self._refresh_margin, self._force_refresh):
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
            return timeout_outcome(self._attempt_timeout)
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
        app, client, self._app, self._client = self._app, self._client, None, None
        if app is None:
            return
        import firebase_admin

        await client.aclose()
        # delete_app() closes the (now closed) client through asyncio.run(), which
        # cannot run on a running loop: it goes to the executor.
        await asyncio.get_running_loop().run_in_executor(
            self._executor, firebase_admin.delete_app, app
        )
        if self._auth_request is not None:
            self._auth_request.session.close()
