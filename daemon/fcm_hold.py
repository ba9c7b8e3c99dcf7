"""The FCM hold: while FCM refuses the project rather than a token, FCM deliveries wait untouched.

Two things open it (contract 4):
- the SENDER_ID_MISMATCH breaker: more than `fcm.mismatch_breaker` different tokens mismatch
  within MISMATCH_WINDOW seconds of the clock (a wrong project id must not wipe every tablet);
- FCM answering 403 or 404 without an FCM errorCode (the API disabled, a wrong endpoint or
  project): no token is at fault, so none is dropped and no delivery is failed.

While it is open no token is dropped, FCM deliveries stay `pending` as they are (the worker
claims none of them, so nothing is rewritten while they wait), and every PROBE_INTERVAL one
delivery is tried alone. A probe FCM accepts closes the hold and the others go at once; any other
answer keeps it open until the next probe. One object owns all of it (its state, the probes, the
readiness answer); the worker asks it how many FCM deliveries to claim, when to wake and whether
FCM is ready, and tells it what FCM answered (attempts not counted while held: where contract 4
leaves room).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from daemon.clock import rfc3339
from daemon.fcm_outcome import OutcomeKind
from daemon.readiness import NotReady

log = logging.getLogger(__name__)

MISMATCH_WINDOW = 60.0
PROBE_INTERVAL = 120.0

HoldReason = Literal["sender_id_mismatch", "project_refused"]

# Log events by reason: the breaker's names are the ones operators already alert on.
_OPENED = {
    "sender_id_mismatch": "fcm_sender_id_mismatch_breaker_open",
    "project_refused": "fcm_project_refused_hold_open",
}
_CLOSED = {
    "sender_id_mismatch": "fcm_sender_id_mismatch_breaker_closed",
    "project_refused": "fcm_project_refused_hold_closed",
}
_HINTS = {
    "sender_id_mismatch": "fcm.project_id or the key does not match the app's Firebase project",
    "project_refused": (
        "FCM refused the project, not a token: is the Firebase Cloud Messaging API enabled, "
        "and are fcm.endpoint and fcm.project_id right?"
    ),
}


class FcmHold:
    """Whether FCM deliveries are held, why, and when the next probe may go."""

    def __init__(self, mismatch_limit: int) -> None:
        self.mismatch_limit = mismatch_limit
        self.reason: HoldReason | None = None
        self.since: float | None = None
        self.detail = ""  # why it opened (FCM's message for a refused project)
        self.last_probe = ""  # FCM's answer to the last probe
        self.next_probe_at = 0.0
        self._probe: int | None = None  # the delivery whose attempt is the probe under way
        # token -> when it last mismatched; pruned to the window, so at most the tokens of
        # one window (and the breaker opens past `mismatch_limit` of them).
        self._mismatches: dict[str, float] = {}

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    @property
    def probing(self) -> bool:
        """A probe's attempt is under way."""
        return self._probe is not None

    @property
    def held_error(self) -> str:
        """last_error of a delivery the hold sent back to wait."""
        if self.reason == "sender_id_mismatch":
            return "held: SENDER_ID_MISMATCH breaker open"
        return f"held: FCM refused the project ({self.detail})"

    # -- what FCM answered -------------------------------------------------------------------
    def report(
        self, kind: OutcomeKind, token: str, now: float, error: str, ids: dict[str, Any]
    ) -> bool:
        """What FCM answered an attempt that was not a probe; True when its delivery is to wait
        for the hold (FCM refused the project or the sender, and the hold is open) instead of
        being failed and its token dropped."""
        if kind == "sender_mismatch":
            self._note_mismatch(token, now, ids)
        elif kind == "project_refused":
            self._project_refused(now, error, ids)
        return kind in ("unregistered", "sender_mismatch", "project_refused") and self.is_open

    def _note_mismatch(self, token: str, now: float, ids: dict[str, Any]) -> bool:
        """Count a token FCM answered SENDER_ID_MISMATCH for; True while the hold is open, this
        one included (that token is then kept: it shows that something larger is wrong)."""
        if self.is_open:
            return True
        cutoff = now - MISMATCH_WINDOW
        self._mismatches = {t: at for t, at in self._mismatches.items() if at > cutoff}
        self._mismatches[token] = now
        if len(self._mismatches) <= self.mismatch_limit:
            return False
        self._open(
            "sender_id_mismatch",
            now,
            f"more than {self.mismatch_limit} different tokens mismatched within "
            f"{MISMATCH_WINDOW:g} s",
            {**ids, "tokens": len(self._mismatches), "limit": self.mismatch_limit},
        )
        return True

    def _project_refused(self, now: float, error: str, ids: dict[str, Any]) -> None:
        """FCM answered 403/404 without an errorCode: hold (once; later ones change nothing)."""
        if not self.is_open:
            self._open("project_refused", now, error, ids)

    def _open(self, reason: HoldReason, now: float, detail: str, extra: dict[str, Any]) -> None:
        self.reason, self.since, self.detail, self.last_probe = reason, now, detail, ""
        self.next_probe_at = now + PROBE_INTERVAL
        log.error(
            _OPENED[reason],
            extra={
                **extra,
                "error": detail,
                "next_probe_at": rfc3339(self.next_probe_at),
                "hint": _HINTS[reason],
            },
        )

    # -- probes ------------------------------------------------------------------------------
    def capacity(self, now: float, free: int) -> tuple[int, bool]:
        """How many FCM deliveries to claim now (of `free` slots), and whether the one claimed
        is a probe: all of them while open is False, else one at the probe time, else none."""
        if not self.is_open:
            return free, False
        if self.probing or now < self.next_probe_at or free < 1:
            return 0, False
        return 1, True

    def wake_at(self, due: float | None) -> float | None:
        """When FCM work that is due at `due` can be claimed: then, or at the next probe while
        held (None while a probe is answering: its end wakes the worker)."""
        if due is None or not self.is_open:
            return due
        if self.probing:
            return None
        return max(due, self.next_probe_at)

    def probe_started(self, delivery_id: int) -> None:
        """The delivery `capacity` let claim as the probe is being tried."""
        self._probe = delivery_id

    def probe_abandoned(self, delivery_id: int) -> None:
        """The attempt of `delivery_id` is over: when it was the probe and gave no answer (no
        token, its notification gone, the store failed), the next claim probes again with
        another one. After `probe_ended`, or for another delivery, nothing changes."""
        if self._probe == delivery_id:
            self._probe = None

    def probe_ended(self, sent: bool, now: float, error: str, ids: dict[str, Any]) -> None:
        """A probe's answer: FCM accepted (the hold closes) or not (the next one in
        PROBE_INTERVAL)."""
        self._probe = None
        if sent:
            reason = self.reason
            self.reason, self.since, self.detail, self.last_probe = None, None, "", ""
            self._mismatches.clear()
            if reason is not None:
                log.warning(_CLOSED[reason], extra=ids)
            return
        self.last_probe = error
        self.next_probe_at = now + PROBE_INTERVAL
        log.warning(
            "fcm_hold_probe_failed",
            extra={**ids, "reason": self.reason, "error": error},
        )

    # -- readiness ---------------------------------------------------------------------------
    def check(self) -> None:
        """For /readyz "fcm": raises NotReady with the reason while the hold is open."""
        problem = self.problem()
        if problem is not None:
            raise NotReady(problem)

    def problem(self) -> str | None:
        """Why FCM cannot be used now, or None."""
        if self.reason is None or self.since is None:
            return None
        since, probe = rfc3339(self.since), rfc3339(self.next_probe_at)
        last = f" (last probe: {self.last_probe})" if self.last_probe else ""
        if self.reason == "sender_id_mismatch":
            head = f"SENDER_ID_MISMATCH breaker open since {since}: {self.detail} (check "
            head += "fcm.project_id)"
        else:
            head = f"FCM refused the project since {since}: {self.detail}"
        return (
            f"{head}; FCM deliveries are held and no token is dropped; next probe at {probe}{last}"
        )
