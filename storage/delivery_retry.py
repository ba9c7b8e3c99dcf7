"""The rule of an operator's retry, once for both stores: which deliveries may be sent again.

Only deliveries that gave up (`failed`, `expired`) go again, and only to a room that still
exists and, for FCM, to a token still in its set: a token that left the room since (removed,
replaced by a PUT, refused by FCM and tombstoned) is never brought back by a retry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from storage.base import RETRYABLE_STATES, Delivery, RetryOutcome, RetrySkip

# Stable reasons, as the API shows them in `skipped`.
NOT_FOUND = "not_found"  # no delivery with that id (never made, or purged with its notification)
NOT_RETRYABLE = "not_retryable"  # neither failed nor expired: pending, in flight, sent, cancelled
ROOM_GONE = "room_gone"  # the room was deleted since
TOKEN_DROPPED = "token_dropped"  # noqa: S105 - a reason: the token is no longer in the set
TOKEN_TOMBSTONED = "token_tombstoned"  # noqa: S105 - a reason: FCM refused it, kept out


@dataclass(frozen=True)
class RoomTokens:
    """What the rule needs of a room: its token set and its live tombstones."""

    tokens: frozenset[str]
    tombstoned: frozenset[str] = frozenset()


def target_refusal(delivery: Delivery, room: RoomTokens | None) -> str | None:
    """Why the delivery's target can no longer be sent to (None: it can)."""
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


def refusal(delivery: Delivery, room: RoomTokens | None) -> str | None:
    """Why the delivery may not be retried (None: it may)."""
    if delivery.state not in RETRYABLE_STATES:
        return NOT_RETRYABLE
    return target_refusal(delivery, room)


def plan(
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
        reason = refusal(delivery, rooms.get(delivery.calendar_id))
        if reason is None:
            retried.append(delivery.id)
        else:
            skipped.append(RetrySkip(delivery.id, reason, delivery.state))
    skipped.extend(RetrySkip(i, NOT_FOUND) for i in dict.fromkeys(asked or ()) if i not in seen)
    return RetryOutcome(tuple(sorted(retried)), tuple(sorted(skipped, key=lambda s: s.id)))
