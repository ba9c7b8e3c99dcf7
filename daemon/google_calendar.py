"""Google Calendar gateway: events.watch, channels.stop and events.list off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import google.auth.exceptions
import google_auth_httplib2
import httplib2
from google.oauth2 import service_account
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

SCOPE = "https://www.googleapis.com/auth/calendar.readonly"
# 403s that Google documents as "slow down and retry", unlike 403 forbidden.
_TRANSIENT_403 = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"})

# A full list read for its sync token alone: Google's partial response leaves the events out.
TOKENS_ONLY = "nextPageToken,nextSyncToken"

T = TypeVar("T")
# Told how long each Google request took, by method (watch, stop, list, token); from the threads.
Observe = Callable[[str, float], None]


def _ignore(method: str, seconds: float) -> None:
    return None


class GoogleError(Exception):
    """A Google call failed. `status` is the HTTP status, 0 when Google never answered."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class TransientGoogleError(GoogleError):
    """Worth retrying with backoff: 429, 5xx, rate limits, timeouts, connection errors."""


class GoogleTimeout(TransientGoogleError):
    """No answer within request_timeout, queueing included.

    The call may still be running in its thread: `late` resolves with its
    result (or its error) when it ends, so that a watch that answers after
    its caller gave up can still be recorded. `late` is None when the call
    timed out in its own socket and nothing is left running.
    """

    def __init__(self, message: str, late: asyncio.Future[Any] | None = None) -> None:
        super().__init__(0, "timeout", message)
        self.late = late


class PermanentGoogleError(GoogleError):
    """Google refused for good (403 forbidden, 404 notFound, other 4xx): do not retry."""


class SyncTokenExpired(GoogleError):
    """410: the sync token is no longer valid; a full sync is required."""


@dataclass(frozen=True)
class WatchResult:
    resource_id: str
    expiration: float  # epoch seconds


@dataclass(frozen=True)
class EventList:
    items: list[dict[str, Any]]
    next_sync_token: str


@dataclass(frozen=True)
class _Collections:
    """One thread's `service.events()` and `service.channels()`, built once: the client
    builds every method of a collection anew at each such call."""

    events: Any
    channels: Any


def error_from_http(exc: HttpError) -> GoogleError:
    """Type an HttpError by its status and the reason in Google's JSON error body."""
    status = int(exc.resp.status)
    reason, message = "", str(getattr(exc, "reason", "") or "")
    try:
        error = json.loads(exc.content.decode("utf-8"))["error"]
        message = str(error.get("message") or message)
        details = error.get("errors") or []
        if details:
            reason = str(details[0].get("reason") or "")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        pass  # not Google's JSON (a proxy's HTML page): the status decides alone
    reason = reason or f"http{status}"
    if status == 410:
        return SyncTokenExpired(status, reason, message)
    if status == 429 or status >= 500 or (status == 403 and reason in _TRANSIENT_403):
        return TransientGoogleError(status, reason, message)
    return PermanentGoogleError(status, reason, message)


def _error_from_refresh(exc: google.auth.exceptions.RefreshError) -> GoogleError:
    data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
    reason = str(data.get("error") or "token_refresh_failed")
    message = str(data.get("error_description") or (exc.args[0] if exc.args else exc))
    if getattr(exc, "retryable", False):
        return TransientGoogleError(0, reason, message)
    # invalid_grant and friends: a wrong, deleted or undelegated key; an operator must act.
    return PermanentGoogleError(0, reason, message)


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    # A late outcome nobody awaits must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class GoogleCalendar:
    """The Calendar API through google-api-python-client, in a bounded thread pool.

    One httplib2.Http, one service object and its collections per thread
    (none is thread-safe); one shared credentials object, refreshed under a
    lock so that concurrent first calls fetch one token, not one each.
    """

    def __init__(
        self,
        service_account_file: str,
        subject: str | None,
        calendar_endpoint: str,
        request_timeout: float,
        max_concurrency: int,
        *,
        page_size: int = 250,
        observe: Observe = _ignore,
    ) -> None:
        credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            service_account_file, scopes=[SCOPE]
        )
        if subject:
            credentials = credentials.with_subject(subject)
        self._credentials = credentials
        self._endpoint = calendar_endpoint
        self.request_timeout = request_timeout
        self.page_size = page_size
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="google-calendar"
        )
        self._local = threading.local()
        self._refresh_lock = threading.Lock()
        self._observe = observe

    # -- in the worker thread ------------------------------------------------

    def _collections(self) -> _Collections:
        local = self._local
        if getattr(local, "collections", None) is None:
            local.http = httplib2.Http(timeout=self.request_timeout)
            authorized = google_auth_httplib2.AuthorizedHttp(self._credentials, http=local.http)
            service = build(
                "calendar",
                "v3",
                credentials=None,
                http=authorized,
                static_discovery=True,
                cache_discovery=False,
                client_options={"api_endpoint": self._endpoint},
            )
            local.collections = _Collections(service.events(), service.channels())
        collections: _Collections = local.collections
        return collections

    def _ensure_token(self) -> None:
        with self._refresh_lock:
            if not self._credentials.valid:
                with self._timed("token"):
                    self._credentials.refresh(google_auth_httplib2.Request(self._local.http))

    @contextlib.contextmanager
    def _timed(self, method: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._observe(method, time.perf_counter() - started)

    def _in_thread(self, call: Callable[[_Collections], T], method: str | None) -> T:
        try:
            api = self._collections()
            self._ensure_token()
            if method is None:
                return call(api)
            with self._timed(method):
                return call(api)
        except HttpError as exc:
            raise error_from_http(exc) from exc
        except google.auth.exceptions.RefreshError as exc:
            raise _error_from_refresh(exc) from exc
        except TimeoutError as exc:  # socket.timeout included
            raise GoogleTimeout(f"no answer within {self.request_timeout}s") from exc
        except (
            google.auth.exceptions.TransportError,
            httplib2.HttpLib2Error,
            http.client.HTTPException,
            OSError,
        ) as exc:
            raise TransientGoogleError(
                0, "connectionError", str(exc) or type(exc).__name__
            ) from exc

    # -- on the event loop -----------------------------------------------------

    async def _run(self, call: Callable[[_Collections], T], method: str | None) -> T:
        """Run `call(collections)` in the pool; give up after request_timeout, queueing included.
        The request's own time is observed under `method` (None: no request, a token only)."""
        loop = asyncio.get_running_loop()
        job = self._executor.submit(self._in_thread, call, method)
        outcome: asyncio.Future[T] = asyncio.wrap_future(job, loop=loop)
        try:
            return await asyncio.wait_for(asyncio.shield(outcome), self.request_timeout)
        except TimeoutError:
            late: asyncio.Future[Any]
            if job.cancel():  # still queued: it will never run
                late = loop.create_future()
                late.set_exception(GoogleTimeout("gave up before the call started"))
            else:
                late = outcome
            late.add_done_callback(_mark_retrieved)
            raise GoogleTimeout(
                f"no answer within {self.request_timeout}s (queueing included)", late=late
            ) from None
        except asyncio.CancelledError:
            job.cancel()
            outcome.add_done_callback(_mark_retrieved)
            raise

    async def watch(
        self, calendar_id: str, channel_id: str, token: str | None, address: str, ttl: float
    ) -> WatchResult:
        body: dict[str, Any] = {
            "id": channel_id,
            "type": "web_hook",
            "address": address,
            "params": {"ttl": str(int(ttl))},
        }
        if token is not None:
            body["token"] = token

        def call(api: _Collections) -> WatchResult:
            answer = api.events.watch(calendarId=calendar_id, body=body).execute(num_retries=0)
            try:
                return WatchResult(
                    resource_id=str(answer["resourceId"]),
                    expiration=int(answer["expiration"]) / 1000.0,
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise TransientGoogleError(200, "badResponse", f"watch answer: {exc!r}") from exc

        return await self._run(call, "watch")

    async def stop(self, channel_id: str, resource_id: str) -> None:
        body = {"id": channel_id, "resourceId": resource_id}

        def call(api: _Collections) -> None:
            api.channels.stop(body=body).execute(num_retries=0)

        await self._run(call, "stop")

    async def list_events(self, calendar_id: str, sync_token: str | None) -> EventList:
        """Every page of a full list (sync_token None) or of an incremental sync.

        Full and incremental lists use the same parameters, as Google asks;
        showDeleted is left at its default: a full list skips cancelled events,
        an incremental one always carries them.
        """
        params = self._list_params(calendar_id)
        if sync_token is not None:
            params["syncToken"] = sync_token
        items: list[dict[str, Any]] = []
        next_sync = await self._every_page(params, items.extend)
        return EventList(items=items, next_sync_token=next_sync)

    async def full_sync_token(self, calendar_id: str) -> str:
        """The sync token a full list ends with, without the events: every page is still read
        (Google gives the token on the last), each asked for its two tokens only."""
        params = dict(self._list_params(calendar_id), fields=TOKENS_ONLY)
        return await self._every_page(params, lambda items: None)

    def _list_params(self, calendar_id: str) -> dict[str, Any]:
        return {"calendarId": calendar_id, "singleEvents": True, "maxResults": self.page_size}

    async def _every_page(
        self, params: dict[str, Any], keep: Callable[[list[dict[str, Any]]], None]
    ) -> str:
        """Read pages until the last, handing each page's items to `keep`; its nextSyncToken."""
        page_token: str | None = None
        while True:
            page_params = dict(params, pageToken=page_token) if page_token else params
            page: dict[str, Any] = await self._run(
                functools.partial(_list_page, page_params), "list"
            )
            keep(page.get("items") or [])
            page_token = page.get("nextPageToken")
            if page_token:
                continue
            next_sync = page.get("nextSyncToken")
            if not next_sync:
                raise TransientGoogleError(200, "badResponse", "last page without nextSyncToken")
            return str(next_sync)

    async def check(self) -> None:
        """Obtain (or refresh) an access token; raises a GoogleError saying why not."""

        def call(api: _Collections) -> None:
            return None  # _in_thread has made sure of a valid token

        await self._run(call, None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _list_page(params: dict[str, Any], api: _Collections) -> dict[str, Any]:
    page: dict[str, Any] = api.events.list(**params).execute(num_retries=0)
    return page
