"""The service's periodic tasks: plain async methods, each on its own timer, never doubled."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from tornado.ioloop import PeriodicCallback

log = logging.getLogger(__name__)

Work = Callable[[], Awaitable[Any]]


class PeriodicTasks:
    """Named timers (`callbacks`, started and stopped by the service) and their runs.

    A run still going when the next is due is not doubled, a failure is logged and never fatal,
    and nothing runs while `may_run()` is false (stopping, or the instance lease lost). Bounded
    by the names the service registers: one run at most of each at a time.
    """

    def __init__(
        self,
        may_run: Callable[[], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.may_run = may_run
        self.spawn = spawn  # keeps a run started by run_now referenced until it is done
        self.callbacks: dict[str, PeriodicCallback] = {}
        self._runs: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._running: set[str] = set()

    def add(self, name: str, work: Work, interval: float) -> None:
        """Run `work` every `interval` seconds (with 10 % jitter) once started."""

        async def run() -> None:
            if name in self._running or not self.may_run():
                return
            self._running.add(name)
            try:
                await work()
            except Exception:
                log.exception("periodic_failed", extra={"task": name})
            finally:
                self._running.discard(name)

        self.callbacks[name] = PeriodicCallback(run, interval * 1000, jitter=0.1)
        self._runs[name] = run

    def start(self, names: Iterable[str]) -> None:
        for name in names:
            self.callbacks[name].start()

    def stop(self) -> None:
        for callback in self.callbacks.values():
            callback.stop()

    def run_now(self, name: str) -> None:
        """Start one task's work now (unless it is running already)."""
        if name in self._runs and self.may_run():
            self.spawn(self._runs[name]())
