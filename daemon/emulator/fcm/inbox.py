"""What FCM accepted, per token, and how many requests named each token; waits on either."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any


class Inbox:
    """Accepted messages (oldest first) and attempt counts; `wait` wakes on the count asked."""

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []
        self._attempts: Counter[str] = Counter()
        self._waiters: list[tuple[str, str, int, asyncio.Future[None]]] = []

    def record(self, name: str, token: str | None, received_at: float, message: Any) -> None:
        self._messages.append(
            {"name": name, "token": token, "received_at": received_at, "message": message}
        )
        self._wake()

    def note_attempt(self, token: str) -> None:
        self._attempts[token] += 1
        self._wake()

    def messages(self, token: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self._messages if token is None or m["token"] == token]

    def attempts(self, token: str) -> int:
        return self._attempts[token]

    def clear(self) -> None:
        self._messages.clear()
        self._attempts.clear()

    async def wait(self, what: str, token: str, count: int, limit: float) -> None:
        """Until `token` has `count` "messages" or "attempts"; TimeoutError after `limit` s."""
        if self._count(what, token) >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (what, token, count, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, limit)
        except TimeoutError:
            have = self._count(what, token)
            raise TimeoutError(
                f"token ...{token[-8:]}: {have} {what} after {limit}s, wanted {count}"
            ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _count(self, what: str, token: str) -> int:
        return self._attempts[token] if what == "attempts" else len(self.messages(token))

    def _wake(self) -> None:
        for what, token, count, future in list(self._waiters):
            if not future.done() and self._count(what, token) >= count:
                future.set_result(None)
