"""One asyncio lock per key, kept only while someone holds or waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    """`async with locks.hold(key)`: one holder per key at a time, first come first served.

    Bound: an entry exists only while a task holds or waits for that key, so the dict never
    holds more keys than there are tasks using it (ids of deleted rooms leave nothing behind).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[asyncio.Lock, int]] = {}

    def busy(self, key: str) -> bool:
        """Someone holds the key's lock now (a `hold` would wait)."""
        entry = self._entries.get(key)
        return entry is not None and entry[0].locked()

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._entries.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._entries[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._entries[key]
            if users <= 1:
                del self._entries[key]
            else:
                self._entries[key] = (lock, users - 1)
