"""The `Store`: its lifecycle and one small repository per aggregate, each a Protocol.

Callers depend on the narrowest of these they need (a worker that only reads notifications
takes a `NotificationReader`); daemon/app.py hands each one the store's repository. Times are
float seconds since the epoch (UTC); callers pass `now` from the injected clock, so a store never
reads the time itself. Every method is a coroutine and every write is atomic on its own: no
caller needs a transaction. The rules that are not persistence are in storage/rules.py.
"""

from __future__ import annotations

import builtins
from typing import Any, Protocol

from storage.base import (
    Channel,
    ChannelState,
    ChannelStop,
    Delivery,
    DeliveryState,
    Lease,
    Notification,
    NotificationSource,
    ResourceState,
    RetryableState,
    RetryOutcome,
    Room,
    StopOutcome,
    Target,
    TargetKind,
)


class RoomReader(Protocol):
    async def get(self, calendar_id: str) -> Room | None: ...

    async def list(self) -> builtins.list[Room]:
        """Every room, ordered by calendar id."""


class TokenTombstones(Protocol):
    async def tombstone_token(self, calendar_id: str, token: str, until: float, now: float) -> bool:
        """Drop a token FCM refused, remembering it until `until`; cancels its non-final
        deliveries to the room. Returns whether the token was in the room."""


class RoomRepository(RoomReader, TokenTombstones, Protocol):
    """Rooms, their token sets and the tombstones of refused tokens."""

    async def put(
        self,
        calendar_id: str,
        name: str | None,
        firebase_tokens: builtins.list[str] | None,
        now: float,
    ) -> tuple[Room, bool]:
        """Create or update; returns (room, created). `name` None keeps the name ("" for a new
        room); `firebase_tokens` None keeps the token set, a list replaces it (order kept,
        duplicates dropped, the tombstones of the tokens it names cleared, the non-final
        deliveries of the tokens it leaves out cancelled: rules.replace_tokens)."""

    async def add_tokens(
        self, calendar_id: str, tokens: builtins.list[str], now: float, *, respect_tombstones: bool
    ) -> tuple[Room, builtins.list[str]] | None:
        """Add tokens to the room's set; returns (room, tokens actually added), None for an
        unknown room. With respect_tombstones, a token tombstoned (and not expired at `now`) is
        not added; without it, its tombstone is cleared and it is added (rules.add_tokens)."""

    async def remove_token(self, calendar_id: str, token: str, now: float) -> bool:
        """Remove a token and cancel its non-final deliveries to this room; False when the room
        or the token is not there."""

    async def tombstoned_tokens(self, calendar_id: str, now: float) -> set[str]: ...

    async def delete(self, calendar_id: str) -> bool:
        """Forget the room and its tokens, tombstones and sync token; cancel its non-final
        deliveries. Channels are kept (the caller stops them). False when unknown."""

    async def count_without_channel(self, now: float) -> int:
        """Rooms with no live confirmed channel: none of the calendar's channels is `active`
        or `retiring` (replaced, still listening until stopped), confirmed, and expiring
        after `now`."""


class ChannelReader(Protocol):
    async def get(self, channel_id: str) -> Channel | None: ...

    async def list(
        self,
        calendar_id: str | None = None,
        states: tuple[ChannelState, ...] | None = None,
        expiring_before: float | None = None,
    ) -> builtins.list[Channel]:
        """Filtered channels ordered by created_at, then id. `expiring_before` keeps channels
        with an expiration below it (channels without one are left out)."""


class SyncTokens(Protocol):
    async def get_sync_token(self, calendar_id: str) -> str | None: ...

    async def set_sync_token(self, calendar_id: str, sync_token: str | None) -> None: ...


class ChannelStops(Protocol):
    """`channels.stop` calls still owed to Google, and the ids of those done."""

    async def enqueue_stop(
        self, channel_id: str, resource_id: str, calendar_id: str | None, now: float
    ) -> bool:
        """Queue a `channels.stop`, due now; once per channel id: False when already queued."""

    async def enqueue_unknown_stop(
        self, channel_id: str, resource_id: str, now: float, max_queued: int
    ) -> StopOutcome:
        """Queue a stop (due now, no calendar) for a channel a webhook call named but the store
        does not know, at a cost that does not grow with the queue or the remembered ids:
        "known" when the id is queued already or remembered (finish_stop) until after `now`;
        "full" when the queue holds `max_queued` stops or more; else "queued"."""

    async def count_stops(self) -> int:
        """How many stops are queued, without reading them (the store keeps the count)."""

    async def due_stops(self, now: float, limit: int = 100) -> builtins.list[ChannelStop]:
        """Queued stops whose next_attempt_at <= now, oldest first."""

    async def list_stops(self) -> builtins.list[ChannelStop]: ...

    async def finish_stop(
        self, channel_id: str, remember_until: float, now: float, max_remembered: int
    ) -> None:
        """The stop is done (or given up): off the queue, its id remembered until
        `remember_until`, so that enqueue_unknown_stop queues nothing more for it. Ids
        remembered until `now` or earlier are forgotten; past `max_remembered` ids, those
        closest to being forgotten go first."""

    async def reschedule_stop(
        self, channel_id: str, next_attempt_at: float, last_error: str
    ) -> None:
        """Count one more failed attempt and set when to try again."""

    async def remove_stop(self, channel_id: str) -> None:
        """Off the queue, not remembered."""


class ChannelRepository(ChannelReader, SyncTokens, ChannelStops, Protocol):
    """Watch channels, the stops owed to Google, and each calendar's sync token."""

    async def insert(self, channel: Channel) -> None:
        """Raises DuplicateChannel when the id exists."""

    async def update(self, channel_id: str, now: float, **fields: Any) -> Channel | None:
        """Set the given fields and updated_at (rules.channel_update: a field that is not an
        updatable Channel field is a TypeError, an unknown state a ValueError); returns the new
        channel, None when unknown."""

    async def confirm(self, channel_id: str, resource_id: str, now: float) -> Channel | None:
        """Google's `sync`: confirmed = True, and resource_id set where it is still empty."""

    async def advance_message_number(self, channel_id: str, message_number: int) -> bool:
        """Atomically raise last_message_number to `message_number` if it is higher; False when
        it is not (a duplicate) or the channel is unknown."""

    async def delete(self, channel_id: str) -> bool: ...

    async def count_by_state(self) -> dict[ChannelState, int]:
        """How many channels there are by state; states with none left out."""

    async def soonest_expiry(self) -> float | None:
        """The earliest expiration of an `active` channel (those without one left out); None
        when there is none."""


class NotificationReader(Protocol):
    async def get(
        self, notification_id: int, *, with_deliveries: bool = False
    ) -> Notification | None:
        """The notification; its `deliveries` are read only when asked for."""


class NotificationFeed(Protocol):
    """What readers paging by seq need (the WebSocket fan-out, its replays)."""

    async def list(
        self,
        calendar_id: str | None = None,
        calendar_ids: builtins.list[str] | None = None,
        after: int | None = None,
        up_to: int | None = None,
        limit: int = 100,
        include_unpublished: bool = False,
        *,
        with_deliveries: bool = False,
    ) -> builtins.list[Notification]:
        """Published notifications with after < seq <= up_to in seq order; with both calendar
        filters, the calendars both name. include_unpublished: every notification of the filter
        instead, by id (`after`/`up_to` then bound the id). Deliveries only when asked for (the
        operators' listing)."""

    async def last_seq(self) -> int:
        """The highest seq a reader can see, or purged_through_seq when that is higher (0
        before any): a seq taken by a publication that never became visible does not count."""

    async def purged_through_seq(self) -> int:
        """The highest seq a purge has dropped (0 when none): a replay from `after` is complete
        only when after >= this."""


class NotificationRepository(NotificationReader, NotificationFeed, Protocol):
    """Notifications: received, then published (seq and deliveries) or skipped; retention."""

    async def add(
        self,
        calendar_id: str,
        source: NotificationSource,
        resource_state: ResourceState,
        received_at: float,
        channel_id: str | None = None,
        message_number: int | None = None,
    ) -> Notification:
        """Store durably (state `received`) with a new id: strictly increasing, never reused,
        not even after a purge (one may be skipped). Raises DuplicateNotification for a
        (channel_id, message_number) pair that is stored already. With both given, the channel's
        last_message_number is raised to `message_number` in the same step (one write for
        Google's webhook call)."""

    async def received(
        self, limit: int = 1000, calendar_id: str | None = None
    ) -> builtins.list[Notification]:
        """Notifications still waiting for their sync (after a restart too), oldest first;
        only the calendar's when `calendar_id` is given. They have no deliveries."""

    async def publish(
        self,
        notification_id: int,
        changes: builtins.list[dict[str, Any]],
        full_resync: bool,
        targets: builtins.list[Target],
        now: float,
    ) -> Notification:
        """Give a `received` notification the next seq and one pending delivery per target, due
        now, in one step: a reader paging with `after` never skips a seq that becomes visible
        later. Returns it with its deliveries. Publishing twice returns the stored notification
        (with its deliveries) unchanged."""

    async def skip(self, notification_ids: builtins.list[int], now: float) -> None:
        """Their sync brought nothing new: kept for operators, never published. One write for
        all of them; only `received` ones change (published and unknown ids are left alone)."""

    async def purge(self, published_before: float, received_before: float) -> int:
        """Drop what rules.purge_plan lets go (published notifications whose deliveries are all
        final and settled before `published_before`, skipped ones received before
        `received_before`, never a `received` one) with their deliveries; remember the highest
        seq dropped. Returns how many went."""

    async def count_unsynced(self) -> int:
        """Notifications stored and still `received` (their sync has not run yet)."""


class OutboxRepository(Protocol):
    """One delivery per published notification and target: the worker's queue, the operators'
    view (GET /v1/deliveries, POST /v1/deliveries/retry)."""

    async def claim(
        self, now: float, lease_until: float, limit: int = 100, kind: TargetKind | None = None
    ) -> builtins.list[Delivery]:
        """Atomically take up to `limit` deliveries that are due (pending with next_attempt_at
        <= now, or in_flight with an expired lease), oldest due first, marking them in_flight
        until `lease_until`. Two claimers never get the same delivery."""

    async def release_claims(self) -> int:
        """Make every in_flight delivery pending again (at start, after a crash)."""

    async def finish(
        self,
        delivery_id: int,
        state: DeliveryState,
        now: float,
        *,
        attempts: int | None = None,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> Delivery | None:
        """Record an outcome (rules.FINISH_STATES: `sent`, `failed`, `cancelled`, or `pending`
        again with its next attempt time; any other state is a ValueError). A delivery that was
        cancelled or expired meanwhile stays so. Returns it, None when unknown."""

    async def cancel(self, calendar_id: str, token: str | None = None) -> int:
        """Cancel the non-final deliveries of a calendar (only those to `token` when given)."""

    async def expire(self, created_before: float, now: float) -> int:
        """Retention: deliveries made before `created_before` that are still pending, or
        in_flight with a lease ended by `now` (a live attempt ends on its own), become
        `expired` (final), so that their notification can be purged. Returns how many."""

    async def next_due(self, kind: TargetKind | None = None) -> float | None:
        """The earliest next_attempt_at of a pending delivery (lease end for in_flight ones),
        only of `kind` when given; None when nothing waits: lets the worker sleep exactly
        until then."""

    async def count(self, state: DeliveryState | None = None) -> int: ...

    async def list(
        self,
        state: DeliveryState | None = None,
        calendar_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> builtins.list[Delivery]:
        """Deliveries newest first (by id, descending), only those with id < `before` when
        given: the next page starts before the last id of this one."""

    async def counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]:
        """How many deliveries the outbox holds by (state, target kind), only the calendar's
        when given; pairs with none are left out."""

    async def retry(
        self,
        now: float,
        *,
        ids: builtins.list[int] | None = None,
        state: RetryableState | None = None,
    ) -> RetryOutcome:
        """Make deliveries that gave up (`failed` or `expired`) pending again, due `now`, with
        attempts 0, last_error and lease cleared and created_at = `now` (so that retention
        counts from the retry, not from the first try). Either the deliveries named by `ids`
        or every one in `state` (both or neither: ValueError). Left as they are, and reported
        in `skipped` with the reason of rules.retry_plan: ids not stored, deliveries in another
        state, and those whose room is gone or whose FCM token has left the room."""


class Leases(Protocol):
    """Named leases. Each call decides atomically, against other processes on the same store
    too. A holder id is random per process run; leases are compared by holder only (host and
    pid are for people). Times are the callers' clocks: wall time, the same for every process."""

    async def acquire_lease(self, lease: Lease, now: float) -> Lease:
        """Take `lease.name` for `lease.holder` until `lease.until` when nobody holds it, when
        its lease has expired (until <= now), or when it is `lease.holder`'s already (then only
        until, host and pid change; since is kept). Returns the lease as stored afterwards:
        ours when taken, else the current holder's, unchanged."""

    async def renew_lease(self, name: str, holder: str, until: float) -> Lease | None:
        """Extend `holder`'s lease to `until`, only while `holder` still holds it (even if it
        has expired: nobody else took it then). Returns the lease as stored afterwards (the
        other holder's, unchanged, when refused), None when nobody holds it."""

    async def release_lease(self, name: str, holder: str) -> bool:
        """Drop the lease if `holder` holds it; False (and nothing changes) otherwise."""

    async def get_lease(self, name: str) -> Lease | None: ...


class StoreEpoch(Protocol):
    async def store_epoch(self) -> str:
        """A random id made once when the store was created."""


class MetaRepository(Leases, StoreEpoch, Protocol):
    """What the store knows of itself: its epoch and the leases on it."""


class Store(Protocol):
    """Everything mrm-push keeps: lifecycle, and one repository per aggregate. `SqliteStore`
    and `MongoStore` implement it."""

    @property
    def rooms(self) -> RoomRepository: ...

    @property
    def channels(self) -> ChannelRepository: ...

    @property
    def notifications(self) -> NotificationRepository: ...

    @property
    def outbox(self) -> OutboxRepository: ...

    @property
    def meta(self) -> MetaRepository: ...

    async def open(self) -> None:
        """Connect and migrate; a database whose schema is newer than this code knows is a
        StoreConfigError. SQLite: raises StoreConfigError when the file cannot be made.
        MongoDB: never fails because the server is down (the schema comes on the first
        success)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable (with the reason) unless a round trip to the database works.
        SQLite also raises while the file at the path is no longer the one opened (deleted or
        replaced) and while the last write failed (disk full: it then tries a 64 KiB write)."""

    async def maintain(self) -> None:
        """Periodic housekeeping. SQLite: checkpoint the WAL into the database and truncate
        it, so that it cannot grow until the disk is full; MongoDB: nothing."""
