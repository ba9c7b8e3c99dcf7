"""The rules of what the store keeps that are not persistence, once for both backends.

A backend reads what a rule needs, asks the rule, and writes what it decided; the contract
suite (tests/storage/) holds both to the same answers. Here: the token set and its tombstones,
the delivery state machine (finish, retry), what a channel update may set, which notifications
a purge may drop, and the argument checks the protocols promise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.base import (
    CHANNEL_STATES,
    RETRYABLE_STATES,
    Channel,
    Delivery,
    DeliveryState,
    NotificationState,
    RetryableState,
    RetryOutcome,
    RetrySkip,
)

# -- arguments ---------------------------------------------------------------------------------


def clamp(limit: int) -> int:
    """A page size as the stores take it: a negative one is an empty page."""
    return max(limit, 0)


def calendars(calendar_id: str | None, calendar_ids: Sequence[str] | None) -> list[str] | None:
    """The calendars a notification listing keeps (None: every one); both filters given keep
    the calendars both name."""
    if calendar_ids is None:
        return None if calendar_id is None else [calendar_id]
    return [c for c in dict.fromkeys(calendar_ids) if calendar_id is None or c == calendar_id]


def check_retry(ids: Sequence[int] | None, state: RetryableState | None) -> None:
    if (ids is None) == (state is None):
        raise ValueError("outbox.retry: give ids or state")


# -- the token set and its tombstones ------------------------------------------------------------


def dedupe(items: Iterable[str]) -> list[str]:
    """Order kept, duplicates dropped."""
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class TokenChange:
    """What a change of a room's token set does: the set afterwards (in order), the tokens it
    added, the tombstones it clears, and the tokens whose non-final deliveries to the room it
    cancels (a token that leaves takes them with it)."""

    tokens: list[str]
    added: list[str] = dataclasses.field(default_factory=list)
    clear_tombstones: list[str] = dataclasses.field(default_factory=list)
    cancel: list[str] = dataclasses.field(default_factory=list)
    changed: bool = False  # the set differs: the room's updated_at moves


def replace_tokens(current: Sequence[str] | None, wanted: Sequence[str]) -> TokenChange:
    """A PUT with a token list (`current` None: a new room). The list becomes the set; the
    tombstones of the tokens it names are cleared; the tokens it leaves out are cancelled."""
    tokens = dedupe(wanted)
    before = list(current or ())
    was = set(before)
    return TokenChange(
        tokens=tokens,
        added=[t for t in tokens if t not in was],
        clear_tombstones=tokens,
        cancel=sorted(was - set(tokens)),
        changed=tokens != before,
    )


def add_tokens(
    current: Sequence[str],
    wanted: Sequence[str],
    tombstoned: Iterable[str],
    *,
    respect_tombstones: bool,
) -> TokenChange:
    """Tokens joining the set. `tombstoned`: the room's live tombstones. Respecting them (a
    refresh), a tombstoned token stays out; not respecting them (an explicit add), it is added
    and its tombstone cleared."""
    tokens = list(current)
    buried = set(tombstoned)
    added: list[str] = []
    for token in dedupe(wanted):
        if respect_tombstones and token in buried:
            continue
        if token not in tokens:
            tokens.append(token)
            added.append(token)
    cleared = [] if respect_tombstones else dedupe(wanted)
    return TokenChange(tokens, added, clear_tombstones=cleared, changed=bool(added))


def remove_token(current: Sequence[str], token: str) -> TokenChange:
    """A token taken out (by an operator, or refused by FCM). Its non-final deliveries are
    cancelled whether or not it was still in the set."""
    tokens = [t for t in current if t != token]
    return TokenChange(tokens, cancel=[token], changed=len(tokens) != len(current))


# -- deliveries ----------------------------------------------------------------------------------

# Not final yet: what cancellation, expiry and a claim may still take.
NON_FINAL_STATES: tuple[DeliveryState, ...] = ("pending", "in_flight")
# What an attempt's outcome may set (`pending` again: a retry at next_attempt_at).
FINISH_STATES: tuple[DeliveryState, ...] = ("pending", "sent", "failed", "cancelled")
# Final states a finish never changes: a delivery cancelled or expired meanwhile stays so.
STICKY_STATES: tuple[DeliveryState, ...] = ("cancelled", "expired")


def check_finish(state: str) -> None:
    """outbox.finish's state: an outcome, never `in_flight` (that is a claim's) nor
    `expired` (retention's)."""
    if state not in FINISH_STATES:
        raise ValueError(f"outbox.finish: cannot finish as {state!r}")


# Stable reasons a retry leaves a delivery alone, as the API shows them in `skipped`.
NOT_FOUND = "not_found"  # no delivery with that id (never made, or purged with its notification)
NOT_RETRYABLE = "not_retryable"  # neither failed nor expired: pending, in flight, sent, cancelled
ROOM_GONE = "room_gone"  # the room was deleted since
TOKEN_DROPPED = "token_dropped"  # noqa: S105 - a reason: the token is no longer in the set
TOKEN_TOMBSTONED = "token_tombstoned"  # noqa: S105 - a reason: FCM refused it, kept out


@dataclass(frozen=True)
class RoomTokens:
    """What the retry rule needs of a room: its token set and its live tombstones."""

    tokens: frozenset[str]
    tombstoned: frozenset[str] = frozenset()


def target_refusal(delivery: Delivery, room: RoomTokens | None) -> str | None:
    """Why the delivery's target can no longer be sent to (None: it can). A token that left the
    room since (removed, replaced by a PUT, refused by FCM) is never brought back."""
    if room is None:
        return ROOM_GONE
    if delivery.target.kind != "fcm":
        return None
    token = delivery.target.token
    if token is not None and token in room.tombstoned:
        return TOKEN_TOMBSTONED
    if token is None or token not in room.tokens:
        return TOKEN_DROPPED
    return None


def retry_refusal(delivery: Delivery, room: RoomTokens | None) -> str | None:
    """Why the delivery may not be retried (None: it may): only what gave up goes again."""
    if delivery.state not in RETRYABLE_STATES:
        return NOT_RETRYABLE
    return target_refusal(delivery, room)


def retry_plan(
    found: Iterable[Delivery],
    rooms: Mapping[str, RoomTokens | None],
    asked: Sequence[int] | None = None,
) -> RetryOutcome:
    """Decide every delivery found (the ids `asked` that were not found are skipped too); both
    lists in id order."""
    retried: list[int] = []
    skipped: list[RetrySkip] = []
    seen: set[int] = set()
    for delivery in found:
        seen.add(delivery.id)
        reason = retry_refusal(delivery, rooms.get(delivery.calendar_id))
        if reason is None:
            retried.append(delivery.id)
        else:
            skipped.append(RetrySkip(delivery.id, reason, delivery.state))
    skipped.extend(RetrySkip(i, NOT_FOUND) for i in dict.fromkeys(asked or ()) if i not in seen)
    return RetryOutcome(tuple(sorted(retried)), tuple(sorted(skipped, key=lambda s: s.id)))


# -- channels ------------------------------------------------------------------------------------

UPDATABLE_CHANNEL_FIELDS = frozenset(f.name for f in dataclasses.fields(Channel)) - {
    "id",
    "calendar_id",
    "created_at",
    "updated_at",
}


def channel_update(fields: Mapping[str, Any]) -> dict[str, Any]:
    """channels.update's fields, checked: a field it may not set is a TypeError (like an
    unexpected keyword), a state that does not exist a ValueError."""
    unknown = set(fields) - UPDATABLE_CHANNEL_FIELDS
    if unknown:
        raise TypeError(f"channels.update: cannot set {', '.join(sorted(unknown))}")
    if "state" in fields and fields["state"] not in CHANNEL_STATES:
        raise ValueError(f"channels.update: unknown state {fields['state']!r}")
    checked = dict(fields)
    if "confirmed" in checked:
        checked["confirmed"] = bool(checked["confirmed"])
    return checked


# -- retention -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeCandidate:
    """What the purge rule needs of a notification."""

    id: int
    state: NotificationState
    seq: int | None
    published_at: float | None
    received_at: float


def may_purge(n: PurgeCandidate, published_before: float, received_before: float) -> bool:
    """The notification's own part: published before `published_before`, or skipped and
    received before `received_before`; never a `received` one (its sync has not run)."""
    if n.state == "published":
        return n.published_at is not None and n.published_at < published_before
    return n.state == "skipped" and n.received_at < received_before


def holds_back(state: DeliveryState, updated_at: float, published_before: float) -> bool:
    """A delivery that keeps its published notification: not final, or changed since the cutoff
    (one that expired or failed late keeps its notification visible a while)."""
    return state in NON_FINAL_STATES or updated_at >= published_before


def purge_plan(
    candidates: Iterable[PurgeCandidate],
    deliveries: Iterable[tuple[int, DeliveryState, float]],
    published_before: float,
    received_before: float,
) -> tuple[list[int], int]:
    """The notifications to drop (with their deliveries) and the highest seq among them (0 when
    none). `deliveries`: (notification id, state, updated_at) of the candidates' deliveries. A
    backend may narrow the candidates by the same rule in its query; this decides."""
    held = {
        nid
        for nid, state, updated_at in deliveries
        if holds_back(state, updated_at, published_before)
    }
    going = [
        n
        for n in candidates
        if may_purge(n, published_before, received_before)
        and not (n.state == "published" and n.id in held)
    ]
    top = max((n.seq for n in going if n.seq is not None), default=0)
    return sorted(n.id for n in going), top
