"""The instance lease: one `serve` per store (contract 1), taken at start, renewed, released.

A holder id is random per run, so a restarted process never mistakes its predecessor's lease
for its own. At start a lease held by someone else is watched: renewed since we first saw it
(or taken by yet another holder) means a live instance, and the start fails naming it; not
renewed until it expires means a dead one (SIGKILL, power loss), and it is taken over then.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

from daemon.clock import Clock, rfc3339
from storage.base import Lease
from storage.protocols import Leases

log = logging.getLogger(__name__)

LEASE_NAME = "instance"
# The shortest wait between two looks at another holder's lease (it may expire any moment).
MIN_WAIT = 0.05


def describe(lease: Lease) -> str:
    return (
        f"host {lease.host}, pid {lease.pid}, holding it since {rfc3339(lease.since)},"
        f" renewed until {rfc3339(lease.until)}"
    )


def _fields(lease: Lease) -> dict[str, Any]:
    return {
        "holder_host": lease.host,
        "holder_pid": lease.pid,
        "since": rfc3339(lease.since),
        "until": rfc3339(lease.until),
    }


class InstanceRunning(Exception):
    """Another live process holds the store's instance lease."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        super().__init__(f"another mrm-push holds this store's instance lease ({describe(lease)})")


class LeaseLost(Exception):
    """Our lease is gone: another process holds it now (or nobody, which is as bad: someone
    took it meanwhile and let it go)."""

    def __init__(self, lease: Lease | None) -> None:
        self.lease = lease
        who = f"another holder has it: {describe(lease)}" if lease else "nobody holds it"
        super().__init__(f"the store's instance lease is no longer ours ({who})")


class InstanceLease:
    """This process's claim on the store. `acquire` at start, `renew` every `renew_interval`
    (a third of the lease), `release` at a clean stop so that a restart is immediate."""

    def __init__(
        self,
        leases: Leases,
        seconds: float,
        clock: Clock,
        *,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.leases = leases
        self.seconds = seconds
        self.clock = clock
        self.holder = uuid.uuid4().hex
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()
        self.held: Lease | None = None
        self._seen: Lease | None = None  # another holder's lease, as first seen

    @property
    def renew_interval(self) -> float:
        return self.seconds / 3

    async def try_acquire(self) -> bool:
        """One attempt: True when the lease is ours now; False while another holder's lease
        stands but has not been renewed since we first saw it (try again: `wait_time`).
        Raises InstanceRunning when it has been renewed or taken by yet another holder; a
        StoreError when the store cannot answer."""
        now = self.clock.now()
        ask = Lease(LEASE_NAME, self.holder, self.host, self.pid, now, now + self.seconds)
        got = await self.leases.acquire_lease(ask, now)
        if got.holder == self.holder:
            extra: dict[str, Any] = {"until": rfc3339(got.until)}
            if self._seen is not None:
                extra["previous"] = describe(self._seen)
            log.info("instance_lease_taken", extra=extra)
            self.held, self._seen = got, None
            return True
        seen = self._seen
        if seen is None:
            log.warning(
                "instance_lease_waiting",
                extra={
                    **_fields(got),
                    "reason": "another process holds the instance lease;"
                    " waiting for it to expire unless that process renews it",
                },
            )
            self._seen = got
            return False
        if got.holder != seen.holder or got.until != seen.until:
            raise InstanceRunning(got)
        return False

    def wait_time(self) -> float:
        """Until the next look at the other holder's lease: its expiry, or a little more than
        one renewal interval (a live holder renews within it), whichever comes first."""
        if self._seen is None:
            return 0.0
        left = self._seen.until - self.clock.now()
        return max(MIN_WAIT, min(left, 1.5 * self.renew_interval))

    async def acquire(self) -> None:
        """At start: take the lease, waiting out a holder that no longer renews it. Raises
        InstanceRunning for a live holder, a StoreError when the store cannot answer."""
        while not await self.try_acquire():
            await self.clock.sleep(self.wait_time())

    async def renew(self) -> None:
        """Extend our lease by `seconds` from now; raises LeaseLost when it is not ours any
        more, a StoreError when the store cannot answer (try again next time)."""
        if self.held is None:
            raise LeaseLost(None)
        got = await self.leases.renew_lease(
            LEASE_NAME, self.holder, self.clock.now() + self.seconds
        )
        if got is None or got.holder != self.holder:
            self.held = None
            raise LeaseLost(got)
        self.held = got

    async def release(self) -> None:
        """At a clean stop: let the next start have it at once (errors: it expires anyway)."""
        if self.held is None:
            return
        self.held = None
        await self.leases.release_lease(LEASE_NAME, self.holder)
        log.info("instance_lease_released")
