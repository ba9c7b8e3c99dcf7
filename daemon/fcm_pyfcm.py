"""The pyfcm sender: blocking requests in a bounded thread pool, one request per attempt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import google.auth.exceptions
import google.auth.transport.requests
import requests
import requests.adapters

from daemon.clock import Clock, SystemClock
from daemon.fcm_auth import REFRESH_MARGIN, fcm_url, needs_refresh
from daemon.fcm_outcome import SendOutcome, classify, shorten, timeout_outcome
from daemon.readiness import NotReady

T = TypeVar("T")

# Past the longest a thread can take within its own bounds (a wait behind another thread's
# token refresh is not one of them: the token is fresh then): the refresh, the connect and
# the answer, attempt_timeout each.
BACKSTOP_PARTS = 3
BACKSTOP_MARGIN = 5.0


class GivenUp(Exception):
    """The caller stopped waiting for this attempt before its request went out."""


class Attempt:
    """One attempt as both sides see it. The loop may give it up; the thread may start sending
    it; whichever comes first decides, under a lock held only for that flip."""

    __slots__ = ("_given_up", "_lock", "_sending")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given_up = False
        self._sending = False

    def start_sending(self) -> bool:
        """In the thread, just before the request: False when it was given up already."""
        with self._lock:
            if self._given_up:
                return False
            self._sending = True
            return True

    def give_up(self) -> bool:
        """In the loop: no request may start from now on. True when one already had."""
        with self._lock:
            self._given_up = True
            return self._sending


class ThreadSlots:
    """Submits blocking calls to the pool only when one of its threads is free for them.

    The slot is taken (waiting here, in the loop, untimed) before the call is submitted, and
    given back when the thread is done with it, even when the caller stopped waiting: a call
    handed to the pool never queues there behind another.
    """

    def __init__(self, executor: Executor, threads: int) -> None:
        if threads < 1:
            raise ValueError("ThreadSlots needs at least one thread")
        self._executor = executor
        self.threads = threads
        self._free = asyncio.Semaphore(threads)

    async def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        try:
            job = self._executor.submit(fn, *args)
        except BaseException:
            self._free.release()
            raise

        def done(_: concurrent.futures.Future[T]) -> None:
            try:
                loop.call_soon_threadsafe(self._free.release)
            except RuntimeError:  # the loop is closed: nobody waits for a slot any more
                pass

        job.add_done_callback(done)
        return job


class TimedRequest(google.auth.transport.requests.Request):
    """google-auth's requests transport with our timeout for the token refresh (its default
    is 120 s, and google-auth passes none)."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        super().__init__(session=session)
        self._timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return super().__call__(  # type: ignore[no-untyped-call]
            url,
            method=method,
            body=body,
            headers=headers,
            timeout=self._timeout if timeout is None else timeout,
            **kwargs,
        )


def _make_pyfcm_client(
    service_account_file: str,
    project_id: str,
    endpoint: str,
    refresh_margin: float,
    timeout: float,
) -> Any:
    from pyfcm import FCMNotification

    class OneRequestFCM(FCMNotification):  # type: ignore[misc]
        """pyfcm's client sending exactly one request per call.

        pyfcm 2.1's send_request sleeps on Retry-After and calls itself again, retries
        502/503 in its urllib3 adapter, and refreshes the token on a timer: all of it
        is replaced here; the payload is still built by pyfcm's parse_payload.
        """

        def __init__(self) -> None:
            self._adapter = requests.adapters.HTTPAdapter(max_retries=0)
            super().__init__(
                service_account_file=service_account_file,
                project_id=project_id,
                adapter=self._adapter,
            )
            self._fcm_end_point = fcm_url(endpoint, project_id)
            self._token_lock = threading.Lock()
            self._sessions: list[requests.Session] = []
            self.force_refresh = False

        def load(self) -> None:
            with self._token_lock:
                if self.credentials is None:
                    # google-auth's from_service_account_file: token_uri from the file.
                    self._initialize_credentials()

        def token_fresh(self) -> bool:
            """Whether a send would use the token as it is (read without the lock, from the
            loop: a stale answer only means a thread is asked to look)."""
            credentials = self.credentials
            if credentials is None:
                return False
            return not needs_refresh(credentials, refresh_margin, self.force_refresh)

        def access_token(self) -> str:
            self.load()
            with self._token_lock:
                if needs_refresh(self.credentials, refresh_margin, self.force_refresh):
                    self.credentials.refresh(TimedRequest(self._session(), timeout))
                    self.force_refresh = False
                return str(self.credentials.token)

        def _session(self) -> requests.Session:
            session = getattr(self.thread_local, "one_request_session", None)
            if session is None:
                session = requests.Session()
                session.mount("http://", self._adapter)
                session.mount("https://", self._adapter)
                self.thread_local.one_request_session = session
                self._sessions.append(session)
            return session

        def send_request(
            self, payload: Any = None, timeout: Any = None, attempt: Attempt | None = None
        ) -> requests.Response:
            headers = {
                "Content-Type": "application/json",
                "Authorization": "Bearer " + self.access_token(),
            }
            if attempt is not None and not attempt.start_sending():
                raise GivenUp
            return self._session().post(
                self.fcm_end_point, data=payload, headers=headers, timeout=timeout
            )

        def close(self) -> None:
            for session in self._sessions:
                session.close()
            self._adapter.close()

    return OneRequestFCM()


class PyFcmSender:
    """Sends with pyfcm 2.1 (blocking, requests) in the executor, one request per attempt.

    An attempt's time is its own request's. Every call handed to the pool first takes one of its
    threads (`ThreadSlots`), so it starts at once and never waits out its timeout in the pool's
    queue; the worker claims no more attempts than there are threads (`max_in_flight`). Inside the
    thread the token refresh and the request are bounded by `fcm.attempt_timeout` (requests'
    connect and read timeouts; google-auth's own default would be 120 s). The asyncio side only
    keeps a generous backstop, for a library that ignores its timeouts; when it fires (or the
    caller gives up: the worker's guard, a stop) the attempt is marked given up, and a thread that
    has not sent the request yet never sends it: no late send can follow an attempt already
    recorded as failed. Once the request is on the wire its outcome is unknown, as for any
    timeout (contract 4 retries those): that is the only way a duplicate can come of it.
    """

    def __init__(
        self,
        service_account_file: str,
        project_id: str,
        endpoint: str,
        attempt_timeout: float,
        executor: Executor,
        *,
        threads: int,
        clock: Clock | None = None,
        refresh_margin: float = REFRESH_MARGIN,
        notification_body: str | None = None,
    ) -> None:
        self._notification_body = notification_body
        # `threads`: how many the executor runs (its maker knows; the pool does not say).
        self._slots = ThreadSlots(executor, threads)
        self._attempt_timeout = attempt_timeout
        self._backstop = BACKSTOP_PARTS * attempt_timeout + BACKSTOP_MARGIN
        self._clock: Clock = clock or SystemClock()
        self._client = _make_pyfcm_client(
            service_account_file, project_id, endpoint, refresh_margin, attempt_timeout
        )

    @property
    def max_in_flight(self) -> int:
        """One send per thread: the worker claims no more, so none waits for a thread."""
        return self._slots.threads

    async def start(self) -> None:
        """Read the key (in the executor; no network); raises if it is missing or bad."""
        await asyncio.wrap_future(await self._slots.submit(self._client.load))

    async def check(self) -> None:
        if self._client.token_fresh():
            return  # nothing to fetch: no thread taken from the sends
        try:
            job = await self._slots.submit(self._client.access_token)
            await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(job)), self._attempt_timeout + BACKSTOP_MARGIN
            )
        except TimeoutError:
            raise NotReady(
                f"no access token within {self._attempt_timeout:g} s from the token endpoint"
            ) from None
        except Exception as exc:
            raise NotReady(f"could not get an access token: {exc}") from exc

    async def send(
        self, token: str, data: dict[str, str], collapse_key: str, ttl_seconds: int
    ) -> SendOutcome:
        attempt = Attempt()
        try:
            job = await self._slots.submit(
                self._send_blocking, attempt, token, data, collapse_key, ttl_seconds
            )
            # Shielded: giving up must not cancel the job, whose thread keeps its slot until it
            # ends; `attempt` keeps it from sending.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), self._backstop)
        except TimeoutError:
            if attempt.give_up():
                return timeout_outcome(self._backstop)
            return SendOutcome(
                "retry",
                error=f"not sent: given up after {self._backstop:g} s before the request went out",
            )
        except asyncio.CancelledError:
            attempt.give_up()
            raise

    def _send_blocking(
        self,
        attempt: Attempt,
        token: str,
        data: dict[str, str],
        collapse_key: str,
        ttl_seconds: int,
    ) -> SendOutcome:
        from pyfcm.errors import InvalidDataError

        try:
            payload = self._client.parse_payload(
                fcm_token=token,
                notification_body=self._notification_body,
                data_payload=data,
                android_config={
                    "priority": "high",
                    "collapse_key": collapse_key,
                    "ttl": f"{ttl_seconds}s",
                },
            )
        except (InvalidDataError, TypeError, ValueError) as exc:
            return SendOutcome("fatal", error=shorten(str(exc), token))
        try:
            response = self._client.send_request(
                payload, timeout=self._attempt_timeout, attempt=attempt
            )
        except GivenUp:
            return SendOutcome("retry", error="not sent: the attempt was given up")
        except (
            google.auth.exceptions.GoogleAuthError,
            requests.RequestException,
            InvalidDataError,  # pyfcm's word for an unreadable key file
            OSError,
        ) as exc:
            return SendOutcome("retry", error=shorten(str(exc), token))
        outcome = classify(
            response.status_code,
            response.content,
            response.headers.get("Retry-After"),
            token=token,
            now=self._clock.now(),
        )
        if outcome.status == 401:
            self._client.force_refresh = True
        return outcome

    async def close(self) -> None:
        self._client.close()
