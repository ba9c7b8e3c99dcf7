"""The records the store keeps (frozen dataclasses, Literal states) and the errors it raises.

The `Store` and its repositories are in storage/protocols.py, the rules in storage/rules.py.
Times are float seconds since the epoch (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
    # Read only when asked for (with_deliveries=True), and by publish.
    deliveries: tuple[Delivery, ...] = field(default=())


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
    """What a retry did: the ids made pending again, and those it left alone."""

    retried: tuple[int, ...] = ()
    skipped: tuple[RetrySkip, ...] = ()
