"""Group commit of new notifications: the rows of several callers in one transaction.

Each webhook's row used to be its own BEGIN, INSERT, UPDATE and COMMIT: four hops to
aiosqlite's thread and one fsync, all under the connection's lock, one webhook after another.
Here a caller queues its row and waits; one flusher at a time writes every row queued so far
in one BEGIN IMMEDIATE ... COMMIT, run as one function on aiosqlite's thread. Rows that arrive
while a batch is being written go into the next one, so batches grow with the load and a lone
webhook waits for nobody. Each caller's future is resolved only after its batch committed
(durable: synchronous=FULL), so a 200 still means stored; a batch that fails stores none of
its rows and fails every caller in it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

from storage.base import StoreError, StoreUnavailable
from storage.sqlite.connection import Connection, in_transaction

# Rows written in one transaction; more wait for the next one.
GROUP_COMMIT_MAX_BATCH = 256
# Rows queued at most: past it a caller is refused at once (a webhook answers 503 and Google
# retries it) rather than queueing without bound behind a store that cannot keep up.
GROUP_COMMIT_MAX_PENDING = 10_000

NotificationRow = tuple[str, str, str | None, int | None, str, float]

_INSERT = (
    "INSERT INTO notifications (calendar_id, source, channel_id, message_number,"
    " resource_state, received_at, state, changes, full_resync)"
    " VALUES (?, ?, ?, ?, ?, ?, 'received', '[]', 0) RETURNING *"
)
_ADVANCE = "UPDATE channels SET last_message_number = ? WHERE id = ? AND last_message_number < ?"


def insert_rows(
    db: sqlite3.Connection, rows: Sequence[NotificationRow]
) -> list[sqlite3.Row | None]:
    """On aiosqlite's thread, inside the batch's transaction (`in_transaction`): each row, or
    None for one the unique (channel, message number) pair refused (a duplicate fails only its
    own statement, not the batch)."""
    stored: list[sqlite3.Row | None] = []
    for row in rows:
        try:
            # fetchall: the statement must be finished before the COMMIT.
            inserted = db.execute(_INSERT, row).fetchall()
        except sqlite3.IntegrityError:
            stored.append(None)
            continue
        stored.append(inserted[0])
        channel_id, message_number = row[2], row[3]
        if channel_id is not None and message_number is not None:
            db.execute(_ADVANCE, (message_number, channel_id, message_number))
    return stored


class GroupCommit:
    """Queues notification rows and writes them in batches, one flusher at a time."""

    def __init__(
        self,
        conn: Connection,
        max_batch: int = GROUP_COMMIT_MAX_BATCH,
        max_pending: int = GROUP_COMMIT_MAX_PENDING,
    ) -> None:
        self._conn = conn
        self.max_batch = max(1, max_batch)
        self.max_pending = max(1, max_pending)
        self._pending: list[tuple[NotificationRow, asyncio.Future[sqlite3.Row | None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writing = 0  # rows of the batch being written
        # Transactions written so far (the tests read it; batching is otherwise invisible).
        self.batches = 0

    async def add(self, row: NotificationRow) -> sqlite3.Row | None:
        """The stored row once its transaction committed, or None for a duplicate; StoreError
        when the batch failed (none of its rows is stored)."""
        waiting = len(self._pending) + self._writing
        if waiting >= self.max_pending:
            raise StoreUnavailable(
                f"sqlite: {waiting} notifications are waiting to be stored already"
            )
        future: asyncio.Future[sqlite3.Row | None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._writing = len(batch)
            try:
                stored = await self._conn.in_thread(
                    in_transaction, insert_rows, [row for row, _ in batch]
                )
            except asyncio.CancelledError:
                # The loop is closing: this batch may or may not have committed, and nobody is
                # left to write what is queued. Each caller learns it failed.
                for _, future in [*batch, *self._pending]:
                    if not future.done():
                        future.set_exception(StoreUnavailable("sqlite: the store is closing"))
                self._pending.clear()
                raise
            except Exception as exc:  # StoreError, or aiosqlite's own (a closed connection)
                failure = exc if isinstance(exc, StoreError) else StoreUnavailable(f"sqlite: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(type(failure)(str(failure)))
                continue
            finally:
                self._writing = 0
            self.batches += 1
            for (_, future), row in zip(batch, stored, strict=True):
                if not future.done():
                    future.set_result(row)
