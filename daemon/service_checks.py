"""The service's own readiness checks: the store with the instance lease, and Google."""

from __future__ import annotations

import asyncio
from typing import Protocol

from daemon.google_calendar import GoogleCalendar, GoogleError
from daemon.lease import InstanceLease
from daemon.readiness import Check, NotReady
from storage.base import StoreUnavailable


class Pingable(Protocol):
    async def ping(self) -> None: ...


def storage_check(store: Pingable, lease: InstanceLease, lease_lost: asyncio.Event) -> Check:
    """ "storage": a round trip to the database works and this instance holds the lease."""

    async def check() -> None:
        await store.ping()
        if lease_lost.is_set():
            raise StoreUnavailable("the instance lease was taken by another instance: stopping")
        if lease.held is None:
            raise StoreUnavailable("the instance lease is not held yet: no work is done")

    return check


def google_check(google: GoogleCalendar | None) -> Check:
    """ "google": the credentials are set and Google gives a token for them."""

    async def check() -> None:
        if google is None:
            raise NotReady("not configured: google.service_account_file is not set")
        try:
            await google.check()
        except GoogleError as error:
            raise NotReady(str(error)) from error

    return check
