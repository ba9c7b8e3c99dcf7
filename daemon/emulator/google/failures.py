"""Failure injection: the next calls of a Calendar API method fail, answer late, or are held."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from daemon.emulator.google.errors import REASONS, error_for

METHODS = ("watch", "stop", "list")


@dataclass
class Failure:
    method: str
    count: int
    status: int | None
    reason: str | None
    message: str | None
    delay: float
    calendar_id: str | None
    hold: asyncio.Event | None = None  # the call waits until the test sets it
    taken: asyncio.Event = field(default_factory=asyncio.Event)  # set when a call takes it

    async def undergo(self) -> None:
        """What a call that took this failure goes through: the wait, then the error if any."""
        self.taken.set()
        if self.delay > 0:
            await asyncio.sleep(self.delay)  # real seconds: a demo shows a slow Google
        if self.hold is not None:
            await self.hold.wait()
        if self.status is not None or self.reason is not None:
            raise error_for(self.status, self.reason, self.message)


class Failures:
    """Failures waiting for the calls they are meant for, oldest first (not kept on restart)."""

    def __init__(self) -> None:
        self._waiting: list[Failure] = []

    def inject(
        self,
        method: str,
        *,
        count: int = 1,
        status: int | None = None,
        reason: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        calendar_id: str | None = None,
        hold: asyncio.Event | None = None,
    ) -> Failure:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if status is None and reason is not None and reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}: give a status too")
        failure = Failure(method, count, status, reason, message, delay, calendar_id, hold)
        self._waiting.append(failure)
        return failure

    def clear(self) -> None:
        self._waiting.clear()

    def take(self, method: str, calendar_id: str | None) -> Failure | None:
        """The oldest failure for this call, one of its `count` used up."""
        for failure in self._waiting:
            if failure.method == method and failure.calendar_id in (None, calendar_id):
                failure.count -= 1
                if failure.count <= 0:
                    self._waiting.remove(failure)
                return failure
        return None
