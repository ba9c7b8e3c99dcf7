"""FCM senders as callers see them: the protocol, the one for `fcm.backend`, timed attempts."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from daemon.clock import Clock
from daemon.fcm_auth import REFRESH_MARGIN
from daemon.fcm_firebase import FirebaseAdminSender
from daemon.fcm_outcome import SendOutcome

__all__ = ["FcmSender", "SendOutcome", "TimedSender", "make_sender"]


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


def make_sender(
    backend: str,
    *,
    service_account_file: str,
    project_id: str,
    endpoint: str,
    attempt_timeout: float,
    executor: Executor,
    threads: int,
    clock: Clock | None = None,
    refresh_margin: float = REFRESH_MARGIN,
    notification_body: str | None = None,
) -> FcmSender:
    """The sender for `fcm.backend`: "firebase-admin" (default) or "pyfcm".

    `executor` runs the blocking work (credential refreshes; pyfcm's requests) on `threads`
    threads: pyfcm sends no more at once than that.
    """
    if backend == "firebase-admin":
        return FirebaseAdminSender(
            service_account_file,
            project_id,
            endpoint,
            attempt_timeout,
            executor,
            clock=clock,
            refresh_margin=refresh_margin,
            notification_body=notification_body,
        )
    if backend == "pyfcm":
        from daemon.fcm_pyfcm import PyFcmSender  # pyfcm is loaded only when chosen

        return PyFcmSender(
            service_account_file,
            project_id,
            endpoint,
            attempt_timeout,
            executor,
            threads=threads,
            clock=clock,
            refresh_margin=refresh_margin,
            notification_body=notification_body,
        )
    raise ValueError(f"unknown fcm.backend {backend!r}: use firebase-admin or pyfcm")


class TimedSender:
    """An FcmSender that tells `observe` each attempt's seconds, one the worker's guard cuts
    short included."""

    def __init__(self, sender: FcmSender, observe: Callable[[float], None]) -> None:
        self.sender = sender
        self._observe = observe

    @property
    def max_in_flight(self) -> int:
        return self.sender.max_in_flight

    async def start(self) -> None:
        await self.sender.start()

    async def send(
        self, token: str, data: dict[str, str], collapse_key: str, ttl_seconds: int
    ) -> SendOutcome:
        started = time.perf_counter()
        try:
            return await self.sender.send(token, data, collapse_key, ttl_seconds)
        finally:
            self._observe(time.perf_counter() - started)

    async def check(self) -> None:
        await self.sender.check()

    async def close(self) -> None:
        await self.sender.close()
