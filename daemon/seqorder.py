"""Publication announcements put back in seq order, with no gap, for the WebSocket fan-out.

Syncs of different calendars run concurrently, so the announcement of seq 7 can come before
the one of seq 6. A store shows seq N only once N-1 is committed (`notifications.publish`), so
when 7 is announced while 6 is not, 6 is readable already: it is read from the store rather
than waited for (its announcement may never come, if its announcer failed). What is read and
announced twice goes out once.

When the store fails during such a read, the seqs it did not give are unknown: neither their
contents nor their calendars. What was read goes out up to the first hole; then `on_gap` is
told (the hub closes every socket that could have wanted a missing seq, contract 5: 1011),
and the order goes on past the hole, so that whoever subscribes from then on is served in
order again (and resumes the lost part by replay, which reads the store afresh).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from storage.base import Notification, StoreError
from storage.protocols import NotificationFeed

log = logging.getLogger(__name__)

FILL_PAGE = 500  # notifications read per step when filling a gap


class InOrder:
    """Calls `emit` once per published seq, in increasing seq order."""

    def __init__(
        self,
        notifications: NotificationFeed,
        emit: Callable[[Notification], None],
        on_gap: Callable[[int, int], None],
    ) -> None:
        self.notifications = notifications
        self.emit = emit
        self.on_gap = on_gap  # (last seq emitted, next seq emitted): what lies between is lost
        # The highest seq emitted; None until known (the store may be down at start).
        self.last: int | None = None
        self._held: dict[int, Notification] = {}  # announced ahead of a lower seq
        self._filler: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self) -> None:
        """Begin after what the store has published already."""
        self.last = await self.notifications.last_seq()

    def close(self) -> None:
        self.closed = True
        if self._filler is not None:
            self._filler.cancel()

    def push(self, notification: Notification) -> None:
        """A notification was published (a publication listener)."""
        seq = notification.seq
        if seq is None or self.closed:
            return
        if self.last is None:
            self.last = seq - 1  # unknown at start: the first announcement sets the pace
        if seq <= self.last:
            return  # read from the store already, to fill a gap
        if seq == self.last + 1 and not self._held:
            self.last = seq
            self.emit(notification)
            return
        self._held[seq] = notification
        self._release()
        if self._held and self._filler is None:
            self._filler = asyncio.get_running_loop().create_task(self._fill())

    def _release(self) -> None:
        assert self.last is not None
        while self.last + 1 in self._held:
            self.last += 1
            self.emit(self._held.pop(self.last))

    async def _fill(self) -> None:
        try:
            while self._held and self.last is not None and not self.closed:
                top = max(self._held)
                found, failure = await self._read(self.last, top)
                # `top` is held: every hole below it is met in this loop.
                for seq in sorted(set(found) | {s for s in self._held if s <= top}):
                    notification = self._held.pop(seq, None) or found[seq]
                    if seq <= self.last:
                        continue  # an announcement that came during the read, and was emitted
                    if failure is not None and seq != self.last + 1:
                        # A seq the failed read did not give: lost to whoever could want it.
                        log.warning(
                            "fanout_gap_unfilled",
                            extra={"after": self.last, "before": seq, "reason": failure},
                        )
                        self.on_gap(self.last, seq)
                        failure = None  # told once: the sockets it concerns are closed
                    self.last = seq
                    self.emit(notification)
                # Up to `top`, a whole answer of the store is the truth: a seq it does not have
                # was never published.
                self._release()
        finally:
            self._filler = None

    async def _read(self, after: int, up_to: int) -> tuple[dict[int, Notification], str | None]:
        """The published notifications in (after, up_to], and why that may not be all of them
        (None: it is; else the store failed part way)."""
        found: dict[int, Notification] = {}
        try:
            while after < up_to:
                page = await self.notifications.list(after=after, up_to=up_to, limit=FILL_PAGE)
                found.update((n.seq, n) for n in page if n.seq is not None)
                if len(page) < FILL_PAGE:
                    break
                after = max(found)
        except StoreError as error:
            return found, str(error) or type(error).__name__
        return found, None
