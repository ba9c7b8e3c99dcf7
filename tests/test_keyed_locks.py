"""KeyedLocks: one holder per key, first come first served, nothing kept once unused."""

from __future__ import annotations

import asyncio

import pytest

from daemon.keyed_locks import KeyedLocks


@pytest.mark.gen_test(timeout=5)
async def test_one_holder_per_key_and_nothing_left_behind():
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with locks.hold("a"):
            order.append("first in")
            await release.wait()
            order.append("first out")

    async def second() -> None:
        async with locks.hold("a"):
            order.append("second in")

    holder = asyncio.ensure_future(first())
    await asyncio.sleep(0)  # first() runs up to its wait (no I/O before it)
    assert locks.busy("a") and not locks.busy("b")
    waiter = asyncio.ensure_future(second())
    async with locks.hold("b"):  # another key does not wait
        order.append("b")
    release.set()
    await asyncio.gather(holder, waiter)
    assert order == ["first in", "b", "first out", "second in"]
    assert len(locks) == 0 and not locks.busy("a")
    for key in range(100):
        async with locks.hold(str(key)):
            pass
    assert len(locks) == 0
