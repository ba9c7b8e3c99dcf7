"""The WebSocket fan-out hub: each publication framed once and handed to every subscriber.

Publication calls `publish` (a publication listener). The hub takes notifications in seq order
(daemon/seqorder.py: syncs of different calendars publish concurrently), encodes and frames
each one once, and appends the same bytes to the outbox of every socket subscribed to its
calendar (or to "*"): no Task, no await, no per-client encoding. Each outbox is written once
per loop tick and bounded (daemon/outbox.py); a socket over its bound is closed with 4008 and
aborted a second later, and nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from tornado.iostream import IOStream

from daemon.clock import rfc3339
from daemon.config import WebSocket
from daemon.configfile import Subscriber
from daemon.outbox import PING_FRAME, Flusher, Outbox, json_frame
from daemon.seqorder import InOrder
from daemon.subscriptions import Subscriptions
from storage.base import Notification, StoreError
from storage.protocols import NotificationFeed, StoreEpoch

log = logging.getLogger(__name__)

ABORT_AFTER = 1.0  # seconds a closed socket has to take its close frame before the TCP abort
REPLAY_PAGE = 200  # notifications read (and written) per step of a replay

SLOW_CONSUMER = 4008
GOING_AWAY = 1001
INTERNAL_ERROR = 1011  # the stream cannot be kept gap-free: reconnect and resume with `after`
INTERRUPTED = "notification stream interrupted"


def notification_message(notification: Notification) -> dict[str, Any]:
    """A `notification` message of contract 5."""
    return {
        "type": "notification",
        "id": notification.id,
        "seq": notification.seq,
        "calendar_id": notification.calendar_id,
        "source": notification.source,
        "resource_state": notification.resource_state,
        "changes": list(notification.changes),
        "full_resync": notification.full_resync,
        "received_at": rfc3339(notification.received_at),
    }


class Client:
    """One socket as the hub sees it (slots: ten thousand of them must stay small)."""

    __slots__ = (
        "_abort",
        "buffer",
        "calendars",
        "closer",
        "closing",
        "heard",
        "id_bytes",
        "last_seq",
        "outbox",
        "pinged",
        "replay_target",
        "subscriber",
        "wildcard",
    )

    def __init__(
        self,
        outbox: Outbox,
        closer: Callable[[int, str], None],
        subscriber: Subscriber | None = None,
    ) -> None:
        self.outbox = outbox
        self.closer = closer  # the handler's close(code, reason)
        # The credential it came with: what it may subscribe to; a reload may change or revoke it.
        self.subscriber = subscriber
        self.calendars: set[str] = set()
        self.id_bytes = 0  # of the ids in `calendars` (bounded: daemon/subscriptions.py)
        self.wildcard = False  # subscribed to every calendar ("*" with an all-seeing token)
        self.last_seq = 0  # highest seq queued to this socket: its order, and no duplicate
        self.buffer: list[tuple[int, bytes]] | None = None  # live frames held during a replay
        self.replay_target: int | None = None  # the hub's last seq when the replay began
        self.heard = True  # a frame came from the client since the last ping
        self.pinged = False
        self.closing = False
        self._abort: asyncio.TimerHandle | None = None

    @property
    def subscription_count(self) -> int:
        return len(self.calendars) + (1 if self.wildcard else 0)


class FanoutHub:
    """Every open socket, its subscriptions, and the one path notifications take to them."""

    def __init__(
        self, notifications: NotificationFeed, meta: StoreEpoch, config: WebSocket
    ) -> None:
        self.notifications = notifications
        self.meta = meta
        self.config = config
        self.flusher = Flusher()
        self.clients: set[Client] = set()
        self.index = Subscriptions(config.max_subscriptions)
        self.sockets_in_use = 0  # upgrades under way and open sockets: max_connections
        self.closing = False
        # A replay page and what is already queued must fit in the backlog bound together.
        self.replay_page = max(1, min(REPLAY_PAGE, config.max_queue // 2))
        self.order = InOrder(notifications, self._fan_out, self._gap)  # publication, in seq order
        self._epoch: str | None = None
        # Read by the metrics collector.
        self.subscriptions = 0  # the index's count, as of its last change
        self.slow_consumer_closes = 0
        self.replays = 0

    @property
    def connected(self) -> int:
        return len(self.clients)

    @property
    def frames_sent(self) -> int:
        return self.flusher.frames_sent

    async def start(self) -> None:
        """Learn where publication stands (the store is open); a store that is down now is
        asked again later."""
        try:
            await self.order.start()
            self._epoch = await self.meta.store_epoch()
        except StoreError as error:
            log.warning("fanout_start_postponed", extra={"reason": str(error)})

    async def store_epoch(self) -> str:
        if self._epoch is None:
            self._epoch = await self.meta.store_epoch()
        return self._epoch

    # -- sockets -----------------------------------------------------------------------------
    def connect(
        self,
        stream: IOStream,
        closer: Callable[[int, str], None],
        subscriber: Subscriber | None = None,
    ) -> Client | None:
        """A socket is open; None when the hub is shutting down."""
        if self.closing:
            return None
        client = Client(Outbox(stream, self.flusher, self.config.max_queue), closer, subscriber)
        self.clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        """The socket is gone (closed by either side, or aborted)."""
        if client._abort is not None:
            client._abort.cancel()
            client._abort = None
        client.outbox.discard()
        client.buffer = None
        self.unsubscribe(client, list(client.calendars), everything=True)
        self.clients.discard(client)

    def send(self, client: Client, message: dict[str, Any]) -> None:
        """One message to one socket, in order with its notifications."""
        if not client.closing and not client.outbox.send(json_frame(message)):
            self._slow_consumer(client)

    def close(self, client: Client, code: int, reason: str, *, keep_backlog: bool = True) -> None:
        """Send the close frame (after the backlog, unless told to drop it) and abort the TCP
        connection if the client has not finished the close within ABORT_AFTER."""
        if client.closing:
            return
        client.closing = True
        if keep_backlog:
            client.outbox.flush()
        client.outbox.discard()
        client.buffer = None
        client.closer(code, reason)
        stream = client.outbox.stream
        client._abort = asyncio.get_running_loop().call_later(ABORT_AFTER, stream.close)

    def close_all(self, code: int = GOING_AWAY, reason: str = "server shutting down") -> None:
        """Shutdown: no more publication, every socket closed (and aborted a second later)."""
        self.closing = True
        self.order.close()
        for client in list(self.clients):
            self.close(client, code, reason)

    def _slow_consumer(self, client: Client) -> None:
        self.slow_consumer_closes += 1
        log.warning("websocket_slow_consumer", extra={"backlog": client.outbox.backlog})
        self.close(client, SLOW_CONSUMER, "slow consumer", keep_backlog=False)

    # -- liveness ----------------------------------------------------------------------------
    def ping_all(self) -> None:
        """Ping every socket; one that sent nothing since the previous ping is dropped."""
        for client in list(self.clients):
            if client.closing:
                continue
            if client.pinged and not client.heard:
                self.close(client, 1000, "ping timed out", keep_backlog=False)
                continue
            client.heard = False
            client.pinged = True
            if not client.outbox.send(PING_FRAME):
                self._slow_consumer(client)

    async def ping(self) -> None:
        self.ping_all()  # periodic work is a coroutine in the service's scheduler

    # -- subscriptions -----------------------------------------------------------------------
    def subscribe(
        self, client: Client, calendars: list[str], wildcard: bool, *, replay: bool
    ) -> tuple[list[str], list[str], bool]:
        """Add subscriptions within the socket's bounds (daemon/subscriptions.py). Returns
        (calendars subscribed, calendars refused for a bound, whether "*" is subscribed). With
        `replay`, live notifications are held from now on until `replay` has sent the stored
        ones."""
        accepted, refused, wildcard = self.index.add(client, calendars, wildcard)
        self.subscriptions = self.index.count
        if replay and (accepted or wildcard) and not client.closing:
            client.buffer = []
            client.replay_target = self.order.last
        return accepted, refused, wildcard

    def unsubscribe(self, client: Client, calendars: list[str], *, everything: bool) -> None:
        self.index.remove(client, calendars, everything=everything)
        self.subscriptions = self.index.count

    # -- publication -------------------------------------------------------------------------
    def publish(self, notification: Notification) -> None:
        """A notification was published (a publication listener): sent out in seq order."""
        self.order.push(notification)

    def _fan_out(self, notification: Notification) -> None:
        group = self.index.by_calendar.get(notification.calendar_id)
        wildcards = self.index.wildcards
        if not group and not wildcards:
            return  # nobody listens: not even encoded
        seq = notification.seq
        assert seq is not None
        frame = json_frame(notification_message(notification))
        limit = self.config.max_queue
        slow: list[Client] = []
        for clients in (group or (), wildcards):
            for client in clients:
                if seq <= client.last_seq:
                    continue  # subscribed twice (a calendar and "*"), or replayed already
                buffer = client.buffer
                if buffer is not None:
                    buffer.append((seq, frame))
                    if len(buffer) > limit:
                        slow.append(client)
                    continue
                client.last_seq = seq
                if not client.outbox.send(frame):
                    slow.append(client)
        for client in slow:  # after the loop: closing changes no set, but stay clear of it
            self._slow_consumer(client)

    def _gap(self, after: int, before: int) -> None:
        """The seqs between `after` and `before` are published but could not be read: close
        every socket that might have wanted one of them. Which calendars they were for is not
        known (the store that would say is failing), so that is every socket with a
        subscription, those still replaying included (their held live frames would have the
        same hole). A socket with none could miss nothing and stays."""
        lost = [c for c in self.clients if c.subscription_count and not c.closing]
        log.warning(
            "websocket_gap_closes", extra={"after": after, "before": before, "sockets": len(lost)}
        )
        for client in lost:
            self.close(client, INTERNAL_ERROR, INTERRUPTED)

    # -- replay ------------------------------------------------------------------------------
    async def replay(
        self, client: Client, calendars: list[str] | None, after: int, epoch: str | None
    ) -> None:
        """After `subscribe(..., replay=True)`: send the stored notifications with seq > after
        of `calendars` (None: all), then `replayed`, then the live ones held meanwhile."""
        self.replays += 1
        try:
            count, complete = await self._replay(client, calendars, after, epoch)
        except StoreError as error:
            # What the store holds is not lost, only unreadable now: rather than a `replayed`
            # with a hole behind it (complete: false would send the client to refetch for
            # nothing), the socket closes and the client resumes with `after` later.
            log.warning("websocket_replay_failed", extra={"after": after, "reason": str(error)})
            self.send(client, {"type": "error", "code": "replay_failed", "message": str(error)})
            self.close(client, INTERNAL_ERROR, INTERRUPTED)
            return
        self.send(client, {"type": "replayed", "count": count, "complete": complete})
        buffer, client.buffer = client.buffer, None
        for seq, frame in buffer or ():
            if seq > client.last_seq and not client.closing:
                client.last_seq = seq
                if not client.outbox.send(frame):
                    self._slow_consumer(client)

    async def _replay(
        self, client: Client, calendars: list[str] | None, after: int, epoch: str | None
    ) -> tuple[int, bool]:
        if client.buffer is None:
            return 0, True  # nothing was subscribed
        if epoch is not None and epoch != await self.store_epoch():
            return 0, False  # those seqs come from another store: nothing here matches them
        target = client.replay_target
        if target is None:
            target = await self.notifications.last_seq()
        # A seq past the last one given was not given by this store (a restored backup, a new
        # database): the client must refetch.
        complete = after <= target
        # This socket has sent live notifications up to last_seq already: the replay starts
        # there, so its order holds; what the new calendars had below that is not sent.
        cursor = max(after, client.last_seq)
        if after < client.last_seq:
            missed = await self.notifications.list(
                calendar_ids=calendars, after=after, up_to=client.last_seq, limit=1
            )
            complete = complete and not missed
        count = 0
        while cursor < target:
            if not await client.outbox.drain():  # one page in the kernel at a time
                break
            page = await self.notifications.list(
                calendar_ids=calendars, after=cursor, up_to=target, limit=self.replay_page
            )
            for notification in page:
                seq = notification.seq
                assert seq is not None
                if seq > client.last_seq and not client.closing:
                    client.last_seq = seq
                    count += 1
                    if not client.outbox.send(json_frame(notification_message(notification))):
                        self._slow_consumer(client)
            if len(page) < self.replay_page:
                break
            cursor = page[-1].seq or target
        # Read last: a purge that ran during the replay may have taken what it meant to send.
        complete = complete and after >= await self.notifications.purged_through_seq()
        return count, complete
