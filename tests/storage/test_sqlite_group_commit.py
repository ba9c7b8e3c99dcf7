"""Group commit: concurrent notifications share a transaction, each caller answered only once
its row is committed; a failed batch stores none of its rows and fails every caller in it."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from storage.base import DuplicateNotification, StoreError, StoreUnavailable
from storage.sqlite import SqliteStore
from storage.sqlite.group_commit import GroupCommit
from tests.storage.helpers import T0, make_channel


async def open_store(tmp_path) -> tuple[SqliteStore, str]:
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path)
    await store.open()
    await store.channels.insert(make_channel("ch-1", "cal-1", state="active"))
    return store, path


def committed_rows(path: str) -> list[tuple[str, int | None]]:
    """What another connection sees: only what was committed."""
    with sqlite3.connect(path) as other:
        return other.execute(
            "SELECT calendar_id, message_number FROM notifications ORDER BY id"
        ).fetchall()


@pytest.mark.gen_test(timeout=10)
async def test_concurrent_notifications_share_transactions_and_are_committed_when_answered(
    tmp_path,
):
    store, path = await open_store(tmp_path)
    try:
        group = store.notifications._group
        before = group.batches

        async def add(number: int) -> tuple[int, list[tuple[str, int | None]]]:
            stored = await store.notifications.add(
                "cal-1", "webhook", "exists", T0, channel_id="ch-1", message_number=number
            )
            # Answered: the row is in the file for any other reader already.
            return stored.id, committed_rows(path)

        answers = await asyncio.gather(*(add(n) for n in range(1, 51)))
        for number, (_, visible) in enumerate(answers, start=1):
            assert ("cal-1", number) in visible
        ids = [notification_id for notification_id, _ in answers]
        assert ids == sorted(ids) and len(set(ids)) == 50
        # 50 callers queued before the flusher first ran: one transaction for all of them.
        assert group.batches - before == 1
        channel = await store.channels.get("ch-1")
        assert channel is not None and channel.last_message_number == 50
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_duplicate_in_a_batch_fails_only_its_own_caller(tmp_path):
    store, path = await open_store(tmp_path)
    try:

        async def add(number: int) -> int | str:
            try:
                stored = await store.notifications.add(
                    "cal-1", "webhook", "exists", T0, channel_id="ch-1", message_number=number
                )
            except DuplicateNotification:
                return "duplicate"
            return stored.id

        first = await add(1)
        answers = await asyncio.gather(add(2), add(1), add(3), add(2))
        assert isinstance(first, int)
        assert answers[1] == "duplicate" and answers[3] == "duplicate"
        assert isinstance(answers[0], int) and isinstance(answers[2], int)
        assert committed_rows(path) == [("cal-1", 1), ("cal-1", 2), ("cal-1", 3)]
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_failed_batch_stores_none_of_its_rows_and_fails_every_caller(tmp_path):
    store, path = await open_store(tmp_path)
    try:
        await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 1)
        # The disk is full from here on: no page may be added to the file.
        with sqlite3.connect(path) as other:
            pages = other.execute("PRAGMA page_count").fetchone()[0]
        db = store._ingest.connection()
        await db.execute(f"PRAGMA max_page_count = {int(pages)}")
        # Held, so that the rows below queue up and are written as one batch.
        await store._ingest._lock.acquire()
        big = "cal-" + "x" * 200_000  # needs pages the file may not grow by
        calls = [
            store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 2),
            store.notifications.add(big, "webhook", "exists", T0, "ch-1", 3),
            store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 4),
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0)  # every caller queued its row
        store._ingest._lock.release()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
        assert committed_rows(path) == [("cal-1", 1)]
        channel = await store.channels.get("ch-1")
        assert channel is not None and channel.last_message_number == 1
        # The next batch is written normally once the disk has room again.
        await db.execute("PRAGMA max_page_count = 1073741823")
        stored = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 2)
        assert stored.message_number == 2
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_the_queue_of_rows_waiting_is_bounded(tmp_path):
    store, _ = await open_store(tmp_path)
    try:
        group = GroupCommit(store._ingest, max_batch=2, max_pending=3)
        await store._ingest._lock.acquire()  # nothing is written meanwhile
        row = ("cal-1", "webhook", None, None, "exists", T0)
        waiting = [asyncio.ensure_future(group.add(row)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(StoreUnavailable, match="waiting to be stored"):
            await group.add(row)
        store._ingest._lock.release()
        stored = await asyncio.gather(*waiting)
        assert all(found is not None for found in stored)
        assert group.batches == 2  # max_batch rows per transaction
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_webhook_waits_for_no_call_queued_on_the_pipelines_connection(tmp_path):
    store, path = await open_store(tmp_path)
    try:
        # A sync, publication or delivery holding the main connection as long as it likes.
        await store._conn._lock.acquire()
        try:
            channel = await store.channels.get("ch-1")
            assert channel is not None
            stored = await store.notifications.add("cal-1", "webhook", "exists", T0, "ch-1", 7)
            assert committed_rows(path) == [("cal-1", 7)]
        finally:
            store._conn._lock.release()
        # What the webhook's connection wrote, the other one reads.
        assert (await store.notifications.get(stored.id)) == stored
    finally:
        await store.close()
