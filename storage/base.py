"""What the service keeps, as plain records, and the `Store` protocol both backends implement.

Times are float seconds since the epoch (UTC); callers pass `now` from the injected clock, so a
store never reads the time itself. Every method is a coroutine and every write is atomic on its
own: no caller needs a transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ChannelState = Literal["pending", "active", "retiring", "failed"]
CHANNEL_STATES: tuple[ChannelState, ...] = ("pending", "active", "retiring", "failed")

# What enqueue_unknown_stop did: queued it; nothing, as the id is queued already or remembered
# as stopped; nothing, as the queue is at its bound.
StopOutcome = Literal["queued", "known", "full"]

NotificationSource = Literal["webhook", "poll"]
ResourceState = Literal["sync", "exists", "not_exists"]

# A notification is `received` when stored, then `published` (it got a seq and deliveries) or
# `skipped` (its sync brought nothing new: never sent, never replayed).
NotificationState = Literal["received", "published", "skipped"]

TargetKind = Literal["fcm", "backend"]
# pending: waiting for its next attempt; in_flight: claimed by a worker (its lease says until
# when); sent; failed (gave up, last_error says why); expired (still not final after
# storage.retention_days); cancelled (room deleted or token gone).
DeliveryState = Literal["pending", "in_flight", "sent", "failed", "expired", "cancelled"]
DELIVERY_STATES: tuple[DeliveryState, ...] = (
    "pending",
    "in_flight",
    "sent",
    "failed",
    "expired",
    "cancelled",
)
FINAL_DELIVERY_STATES: frozenset[str] = frozenset({"sent", "failed", "expired", "cancelled"})
# What an operator may send again (POST /v1/deliveries/retry): deliveries that gave up.
RetryableState = Literal["failed", "expired"]
RETRYABLE_STATES: tuple[RetryableState, ...] = ("failed", "expired")


class StoreError(Exception):
    """The store could not do what was asked (the database is down, the disk is full...)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now; the call may succeed later."""


class StoreConfigError(StoreError):
    """The store can never work as configured (bad URL, unwritable path); stops the start."""


class DuplicateNotification(StoreError):
    """A notification with this channel id and message number is stored already."""


class DuplicateChannel(StoreError):
    """A channel with this id is stored already."""


@dataclass(frozen=True)
class Room:
    calendar_id: str
    name: str
    firebase_tokens: tuple[str, ...]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Channel:
    id: str
    calendar_id: str
    resource_id: str  # "" until `watch` answers or `sync` arrives
    token: str
    expiration: float | None  # None until Google gives it
    state: ChannelState
    confirmed: bool  # Google's `sync` message arrived
    last_message_number: int  # 0 before any message
    last_error: str | None
    created_at: float
    updated_at: float
    attempts: int = 0  # watch attempts made (background retry of a pending channel)
    next_attempt_at: float | None = None  # when the background retry may try again


@dataclass(frozen=True)
class ChannelStop:
    """A `channels.stop` still owed to Google, retried until it succeeds or Google says 404."""

    channel_id: str
    resource_id: str
    calendar_id: str | None
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: an FCM registration token, or the backend (token None)."""

    kind: TargetKind
    token: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: int
    notification_id: int
    calendar_id: str
    target: Target
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    updated_at: float
    lease_until: float | None = None  # set while in_flight


@dataclass(frozen=True)
class Notification:
    id: int
    calendar_id: str
    source: NotificationSource
    channel_id: str | None  # None for poll
    message_number: int | None  # None for poll
    resource_state: ResourceState
    received_at: float
    state: NotificationState
    changes: tuple[dict[str, Any], ...] = ()
    full_resync: bool = False
    seq: int | None = None
    published_at: float | None = None
    deliveries: tuple[Delivery, ...] = field(default=())  # filled by list/get calls


@dataclass(frozen=True)
class Lease:
    """A named lease in the store: who holds it (a random id per process run, with its host
    and pid for people), since when, and until when unless renewed."""

    name: str
    holder: str
    host: str
    pid: int
    since: float
    until: float


@dataclass(frozen=True)
class RetrySkip:
    """A delivery a retry left as it was, and why (storage/rules.py: the reasons)."""

    id: int
    reason: str
    state: DeliveryState | None = None  # None when no such delivery is stored


@dataclass(frozen=True)
class RetryOutcome:
    """What retry_deliveries did: the ids made pending again, and those it left alone."""

    retried: tuple[int, ...] = ()
    skipped: tuple[RetrySkip, ...] = ()


@dataclass(frozen=True)
class NotificationPage:
    notifications: list[Notification]
    store_epoch: str


class Store(Protocol):
    """Everything mrm-push keeps. `SqliteStore` and `MongoStore` implement it."""

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and migrate. SQLite: raises StoreConfigError when the file cannot be made.
        MongoDB: never fails because the server is down (indexes come on the first success)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable (with the reason) unless a round trip to the database works.
        SQLite also raises while the file at the path is no longer the one opened (deleted or
        replaced) and while the last write failed (disk full: it then tries a 64 KiB write)."""

    async def maintain(self) -> None:
        """Periodic housekeeping. SQLite: checkpoint the WAL into the database and truncate
        it, so that it cannot grow until the disk is full; MongoDB: nothing."""

    async def store_epoch(self) -> str:
        """A random id made once when the store was created."""

    # -- leases ------------------------------------------------------------------------------
    # Each call decides atomically, against other processes on the same store too. A holder id
    # is random per process run; leases are compared by holder only (host and pid are for
    # people). Times are the callers' clocks: wall time, the same for every process.
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

    # -- rooms and tokens --------------------------------------------------------------------
    async def get_room(self, calendar_id: str) -> Room | None: ...

    async def list_rooms(self) -> list[Room]:
        """Every room, ordered by calendar id."""

    async def put_room(
        self, calendar_id: str, name: str | None, firebase_tokens: list[str] | None, now: float
    ) -> tuple[Room, bool]:
        """Create or update; returns (room, created). `name` None keeps the name ("" for a new
        room); `firebase_tokens` None keeps the token set, a list replaces it (order kept,
        duplicates dropped), clears the tombstones of the tokens it names and cancels the
        non-final deliveries of the tokens it leaves out."""

    async def add_tokens(
        self, calendar_id: str, tokens: list[str], now: float, *, respect_tombstones: bool
    ) -> tuple[Room, list[str]] | None:
        """Add tokens to the room's set; returns (room, tokens actually added), None for an
        unknown room. With respect_tombstones, a token tombstoned (and not expired at `now`) is
        not added; without it, its tombstone is cleared and it is added."""

    async def remove_token(self, calendar_id: str, token: str, now: float) -> bool:
        """Remove a token and cancel its non-final deliveries to this room; False when the room
        or the token is not there."""

    async def tombstone_token(self, calendar_id: str, token: str, until: float, now: float) -> bool:
        """Drop a token FCM refused, remembering it until `until`; cancels its pending
        deliveries. Returns whether the token was in the room."""

    async def tombstoned_tokens(self, calendar_id: str, now: float) -> set[str]: ...

    async def delete_room(self, calendar_id: str) -> bool:
        """Forget the room and its tokens, tombstones and sync token; cancel its non-final
        deliveries. Channels are kept (the caller stops them). False when unknown."""

    # -- channels ----------------------------------------------------------------------------
    async def insert_channel(self, channel: Channel) -> None:
        """Raises DuplicateChannel when the id exists."""

    async def get_channel(self, channel_id: str) -> Channel | None: ...

    async def list_channels(
        self,
        calendar_id: str | None = None,
        states: tuple[ChannelState, ...] | None = None,
        expiring_before: float | None = None,
    ) -> list[Channel]:
        """Filtered channels ordered by created_at, then id. `expiring_before` keeps channels
        with an expiration below it (channels without one are left out)."""

    async def update_channel(self, channel_id: str, now: float, **fields: Any) -> Channel | None:
        """Set the given fields and updated_at (rules.channel_update: a field that is not an
        updatable Channel field is a TypeError, an unknown state a ValueError); returns the new
        channel, None when unknown."""

    async def confirm_channel(
        self, channel_id: str, resource_id: str, now: float
    ) -> Channel | None:
        """Google's `sync`: confirmed = True, and resource_id set where it is still empty."""

    async def advance_message_number(self, channel_id: str, message_number: int) -> bool:
        """Atomically raise last_message_number to `message_number` if it is higher; False when
        it is not (a duplicate) or the channel is unknown."""

    async def delete_channel(self, channel_id: str) -> bool: ...

    # -- channel stops -----------------------------------------------------------------------
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

    async def due_stops(self, now: float, limit: int = 100) -> list[ChannelStop]:
        """Queued stops whose next_attempt_at <= now, oldest first."""

    async def list_stops(self) -> list[ChannelStop]: ...

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

    # -- sync tokens -------------------------------------------------------------------------
    async def get_sync_token(self, calendar_id: str) -> str | None: ...

    async def set_sync_token(self, calendar_id: str, sync_token: str | None) -> None: ...

    # -- notifications -----------------------------------------------------------------------
    async def add_notification(
        self,
        calendar_id: str,
        source: NotificationSource,
        resource_state: ResourceState,
        received_at: float,
        channel_id: str | None = None,
        message_number: int | None = None,
    ) -> Notification:
        """Store durably (state `received`) with the next id, which is never reused, not even
        after a purge. Raises DuplicateNotification for a (channel_id, message_number) pair that
        is stored already. With both given, the channel's last_message_number is raised to
        `message_number` in the same step (one write for Google's webhook call)."""

    async def get_notification(self, notification_id: int) -> Notification | None:
        """With its deliveries."""

    async def received_notifications(
        self, limit: int = 1000, calendar_id: str | None = None
    ) -> list[Notification]:
        """Notifications still waiting for their sync (after a restart too), oldest first;
        only the calendar's when `calendar_id` is given."""

    async def publish_notification(
        self,
        notification_id: int,
        changes: list[dict[str, Any]],
        full_resync: bool,
        targets: list[Target],
        now: float,
    ) -> Notification:
        """Give a `received` notification the next seq and one pending delivery per target, due
        now, in one step: a reader paging with `after` never skips a seq that becomes visible
        later. Publishing twice returns the stored notification unchanged."""

    async def skip_notification(self, notification_id: int, now: float) -> None:
        """Its sync brought nothing new: kept for operators, never published."""

    async def list_notifications(
        self,
        calendar_id: str | None = None,
        calendar_ids: list[str] | None = None,
        after: int | None = None,
        up_to: int | None = None,
        limit: int = 100,
        include_unpublished: bool = False,
    ) -> list[Notification]:
        """Published notifications with after < seq <= up_to in seq order (with their
        deliveries). include_unpublished: every notification of the filter instead, by id
        (`after`/`up_to` then bound the id)."""

    async def last_seq(self) -> int:
        """The highest seq a reader can see, or purged_through_seq when that is higher (0
        before any): a seq taken by a publication that never became visible does not count."""

    async def purge_notifications(self, published_before: float, received_before: float) -> int:
        """Drop published notifications published before `published_before` whose deliveries
        are all final and were last changed before it too (a delivery that expired or failed
        late keeps its notification visible a while), and unpublished ones received before
        `received_before` (never a `received` one); remember the highest seq dropped. Returns
        how many went."""

    async def purged_through_seq(self) -> int:
        """The highest seq a purge has dropped (0 when none): a replay from `after` is complete
        only when after >= this."""

    # -- delivery outbox ---------------------------------------------------------------------
    async def claim_deliveries(
        self, now: float, lease_until: float, limit: int = 100, kind: TargetKind | None = None
    ) -> list[Delivery]:
        """Atomically take up to `limit` deliveries that are due (pending with next_attempt_at
        <= now, or in_flight with an expired lease), oldest due first, marking them in_flight
        until `lease_until`. Two claimers never get the same delivery."""

    async def release_claims(self) -> int:
        """Make every in_flight delivery pending again (at start, after a crash)."""

    async def finish_delivery(
        self,
        delivery_id: int,
        state: DeliveryState,
        now: float,
        *,
        attempts: int | None = None,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> Delivery | None:
        """Record an outcome: `sent`, `failed`, `cancelled`, or `pending` again with its next
        attempt time (any other state is a ValueError, rules.check_finish). A delivery that was
        cancelled or expired meanwhile stays so. Returns it."""

    async def cancel_deliveries(self, calendar_id: str, token: str | None = None) -> int:
        """Cancel the non-final deliveries of a calendar (only those to `token` when given)."""

    async def expire_deliveries(self, created_before: float, now: float) -> int:
        """Retention: deliveries made before `created_before` that are still pending, or
        in_flight with a lease ended by `now` (a live attempt ends on its own), become
        `expired` (final), so that their notification can be purged. Returns how many."""

    async def next_delivery_due(self, kind: TargetKind | None = None) -> float | None:
        """The earliest next_attempt_at of a pending delivery (lease end for in_flight ones),
        only of `kind` when given; None when nothing waits: lets the worker sleep exactly
        until then."""

    async def count_deliveries(self, state: DeliveryState | None = None) -> int: ...

    # -- the outbox for operators (GET /v1/deliveries, POST /v1/deliveries/retry) --------------
    async def list_deliveries(
        self,
        state: DeliveryState | None = None,
        calendar_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        """Deliveries newest first (by id, descending), only those with id < `before` when
        given: the next page starts before the last id of this one."""

    async def delivery_counts(
        self, calendar_id: str | None = None
    ) -> dict[tuple[DeliveryState, TargetKind], int]:
        """How many deliveries the outbox holds by (state, target kind), only the calendar's
        when given; pairs with none are left out."""

    async def retry_deliveries(
        self,
        now: float,
        *,
        ids: list[int] | None = None,
        state: RetryableState | None = None,
    ) -> RetryOutcome:
        """Make deliveries that gave up (`failed` or `expired`) pending again, due `now`, with
        attempts 0, last_error and lease cleared and created_at = `now` (so that retention
        counts from the retry, not from the first try). Either the deliveries named by `ids`
        or every one in `state`. Left as they are, and reported in `skipped` with the reason
        of storage/rules.py: ids not stored, deliveries in another state, and those
        whose room is gone or whose FCM token has left the room (a token dropped since is
        never resurrected)."""

    # -- counts for the metrics (grouped counts in the database, never rows read) -----------
    async def count_unsynced_notifications(self) -> int:
        """Notifications stored and still `received` (their sync has not run yet)."""

    async def channel_counts(self) -> dict[ChannelState, int]:
        """How many channels there are by state; states with none left out."""

    async def count_rooms_without_channel(self, now: float) -> int:
        """Rooms with no live confirmed channel: none of the calendar's channels is `active`
        or `retiring` (replaced, still listening until stopped), confirmed, and expiring
        after `now`."""

    async def soonest_channel_expiry(self) -> float | None:
        """The earliest expiration of an `active` channel (those without one left out); None
        when there is none."""
