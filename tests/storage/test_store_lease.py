"""The `Store` contract, leases: acquire, renew, release, each atomic, against every backend."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from storage.base import Lease
from tests.storage.helpers import T0

NAME = "instance"
SECONDS = 15.0


@asynccontextmanager
async def handles(backend, count: int) -> AsyncIterator[list]:
    """More handles on the backend's database, as other processes would have."""
    opened = [backend.make() for _ in range(count)]
    try:
        for handle in opened:
            await handle.open()
        yield opened
    finally:
        for handle in opened:
            await handle.close()


def lease(holder: str, now: float = T0, *, name: str = NAME, pid: int = 100) -> Lease:
    return Lease(name, holder, f"host-{holder}", pid, since=now, until=now + SECONDS)


@pytest.mark.gen_test(timeout=10)
async def test_a_free_lease_is_taken_and_a_second_holder_is_refused(store):
    assert await store.meta.get_lease(NAME) is None
    mine = lease("a")
    assert await store.meta.acquire_lease(mine, T0) == mine
    assert await store.meta.get_lease(NAME) == mine

    # Another holder while it runs: refused, and told who holds it (nothing changes).
    assert await store.meta.acquire_lease(lease("b", T0 + 5), T0 + 5) == mine
    assert await store.meta.acquire_lease(lease("b", T0 + 14.9), T0 + 14.9) == mine
    assert await store.meta.get_lease(NAME) == mine
    # Leases by other names are other leases.
    other = lease("b", name="partition-1")
    assert await store.meta.acquire_lease(other, T0 + 5) == other
    assert await store.meta.get_lease(NAME) == mine


@pytest.mark.gen_test(timeout=10)
async def test_an_expired_lease_is_taken_over(store):
    await store.meta.acquire_lease(lease("a"), T0)
    # Expiry is inclusive: at `until` it is free.
    taker = lease("b", T0 + SECONDS, pid=200)
    got = await store.meta.acquire_lease(taker, T0 + SECONDS)
    assert got == taker and got.since == T0 + SECONDS and got.pid == 200
    # The old holder is refused now, whatever it asks.
    assert await store.meta.acquire_lease(lease("a", T0 + 16), T0 + 16) == taker
    assert await store.meta.renew_lease(NAME, "a", T0 + 99) == taker
    assert not await store.meta.release_lease(NAME, "a")
    assert await store.meta.get_lease(NAME) == taker


@pytest.mark.gen_test(timeout=10)
async def test_the_holder_renews_and_a_non_holder_cannot(store):
    mine = await store.meta.acquire_lease(lease("a"), T0)
    renewed = await store.meta.renew_lease(NAME, "a", T0 + 20)
    assert renewed == dataclasses.replace(mine, until=T0 + 20)  # since is kept
    assert await store.meta.renew_lease(NAME, "b", T0 + 60) == renewed  # refused, told the holder
    assert await store.meta.get_lease(NAME) == renewed
    # Still ours after its expiry as long as nobody took it: the renewal goes through.
    assert (await store.meta.renew_lease(NAME, "a", T0 + 100)).until == T0 + 100
    # Acquiring again as the same holder is a renewal too: since kept, host and pid updated.
    again = await store.meta.acquire_lease(lease("a", T0 + 50, pid=101), T0 + 50)
    assert (again.since, again.until, again.pid) == (T0, T0 + 50 + SECONDS, 101)
    assert await store.meta.renew_lease("nobody-holds-this", "a", T0 + 1) is None


@pytest.mark.gen_test(timeout=10)
async def test_release_frees_the_lease_for_the_next_holder_at_once(store):
    await store.meta.acquire_lease(lease("a"), T0)
    assert not await store.meta.release_lease(NAME, "b")  # not b's to release
    assert (await store.meta.get_lease(NAME)).holder == "a"
    assert await store.meta.release_lease(NAME, "a")
    assert await store.meta.get_lease(NAME) is None
    assert not await store.meta.release_lease(NAME, "a")
    nxt = lease("b", T0 + 1)
    assert await store.meta.acquire_lease(nxt, T0 + 1) == nxt  # long before a's expiry


@pytest.mark.gen_test(timeout=10)
async def test_a_lease_outlives_the_handle_that_took_it(store, backend):
    mine = await store.meta.acquire_lease(lease("a"), T0)
    async with handles(backend, 1) as [again]:
        assert await again.meta.get_lease(NAME) == mine


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
async def test_holders_racing_for_the_lease_get_one_winner(store, backend, expired):
    """Twelve holders on four handles ask at once, for a free lease or an expired one."""
    if expired:
        await store.meta.acquire_lease(lease("old", T0 - 100), T0 - 100)
    now = T0 + 1
    asks = [lease(f"h{i}", now) for i in range(12)]
    async with handles(backend, 3) as more:
        stores = [store, *more]
        answers = await asyncio.gather(
            *(stores[i % len(stores)].meta.acquire_lease(ask, now) for i, ask in enumerate(asks))
        )
    winners = {answer.holder for answer in answers}
    assert len(winners) == 1, answers
    [winner] = winners
    assert winner in {ask.holder for ask in asks}
    assert all(answer == answers[0] for answer in answers)
    assert await store.meta.get_lease(NAME) == answers[0]
