"""What only the SQLite backend promises: a restart keeps everything, the file and its schema,
and errors that say what went wrong."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from storage import make_store
from storage.base import StoreConfigError, StoreError, StoreUnavailable, Target
from storage.sqlite import MIGRATIONS, SqliteStore
from tests.storage.helpers import T0, make_channel, publish_new

REPO = str(Path(__file__).resolve().parents[2])


def size(path: Path) -> int:
    return os.stat(path).st_size


@pytest.mark.gen_test(timeout=10)
async def test_a_restart_keeps_everything(tmp_path):
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path)
    await store.open()
    epoch = await store.meta.store_epoch()
    await store.rooms.put("cal-1", "Kampala", ["t1", "t2"], T0)
    await store.rooms.tombstone_token("cal-1", "t2", T0 + 1000, T0)
    await store.channels.set_sync_token("cal-1", "sync-1")
    channel = make_channel("ch-1", "cal-1", state="active", expiration=T0 + 3600)
    await store.channels.insert(channel)
    await store.channels.advance_message_number("ch-1", 4)
    await store.channels.enqueue_stop("ch-old", "res-old", "cal-1", T0)
    first = await publish_new(store, "cal-1", [Target("fcm", "t1"), Target("backend")], T0)
    purged = await publish_new(store, "cal-1", [], T0)
    waiting = await store.notifications.add("cal-1", "webhook", "exists", T0 + 1, "ch-1", 5)
    await store.outbox.finish(first.deliveries[1].id, "sent", T0 + 1)
    assert await store.notifications.purge(T0 + 1, T0 + 1) == 1  # `purged` (seq 2) goes
    (in_flight,) = await store.outbox.claim(T0 + 2, T0 + 600)  # the crash comes now
    await store.close()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.meta.store_epoch() == epoch
        room = await store.rooms.get("cal-1")
        assert (room.name, room.firebase_tokens) == ("Kampala", ("t1",))
        assert await store.rooms.tombstoned_tokens("cal-1", T0 + 2) == {"t2"}
        assert await store.channels.get_sync_token("cal-1") == "sync-1"
        assert (
            await store.channels.get("ch-1")
        ).last_message_number == 5  # raised by notification 5
        assert [s.channel_id for s in await store.channels.list_stops()] == ["ch-old"]
        assert await store.notifications.get(purged.id) is None
        assert await store.notifications.purged_through_seq() == 2
        assert await store.notifications.last_seq() == 2
        assert [n.id for n in await store.notifications.received()] == [waiting.id]
        stored_first = await store.notifications.get(first.id, with_deliveries=True)
        assert stored_first.seq == 1
        assert [d.state for d in stored_first.deliveries] == ["in_flight", "sent"]

        # The worker's claim died with the process: released at start, then claimable.
        assert await store.outbox.claim(T0 + 3, T0 + 60) == []
        assert await store.outbox.release_claims() == 1
        (again,) = await store.outbox.claim(T0 + 3, T0 + 60)
        assert again.id == in_flight.id

        # Counters go on: no id or seq is given twice.
        published = await store.notifications.publish(waiting.id, [], True, [], T0 + 4)
        assert published.seq == 3
        newer = await store.notifications.add("cal-1", "poll", "exists", T0 + 5)
        assert newer.id > waiting.id > purged.id
        with pytest.raises(StoreError):  # DuplicateNotification survives the restart too
            await store.notifications.add("cal-1", "webhook", "exists", T0 + 6, "ch-1", 5)
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_open_creates_missing_directories_and_a_private_wal_file(tmp_path):
    path = tmp_path / "var" / "lib" / "mrm-push.sqlite3"
    store = SqliteStore(str(path))
    await store.open()
    await store.close()
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds device tokens
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        epoch = raw.execute("SELECT value FROM meta WHERE key = 'store_epoch'").fetchone()[0]
    assert len(epoch) == 32 and int(epoch, 16) >= 0


@pytest.mark.gen_test(timeout=10)
async def test_a_relative_path_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = make_store("sqlite:///data/mrm-push.sqlite3")
    assert isinstance(store, SqliteStore)
    await store.open()
    await store.close()
    assert (tmp_path / "data" / "mrm-push.sqlite3").exists()


@pytest.mark.gen_test(timeout=10)
async def test_an_unusable_directory_is_a_one_line_config_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = str(blocker / "mrm-push.sqlite3")
    with pytest.raises(StoreConfigError) as raised:
        await SqliteStore(path).open()
    message = str(raised.value)
    assert path in message and "\n" not in message
    assert message.endswith(f"directory {blocker}: File exists")  # the OS's reason


@pytest.mark.gen_test(timeout=10)
async def test_an_unopenable_file_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "a-directory"
    path.mkdir()
    with pytest.raises(StoreConfigError) as raised:
        await SqliteStore(str(path)).open()
    assert str(raised.value) == f"storage: cannot create or open {path}: Is a directory"


PROBE = """
import asyncio, sys
try:
    from storage.sqlite import SqliteStore
    from storage.base import StoreConfigError
except ImportError:
    sys.exit(3)
try:
    asyncio.run(SqliteStore(sys.argv[1]).open())
except StoreConfigError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_a_read_only_directory_is_a_config_error(existing):
    """Run as an unprivileged user (root writes anywhere): with no file yet, and with a file
    made before the directory turned read-only (SQLite then cannot make its WAL files)."""
    command = [sys.executable, "-c", PROBE]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        directory = os.path.join(top, "ro")
        os.mkdir(directory, 0o755)
        path = os.path.join(directory, "mrm-push.sqlite3")
        if existing:
            with sqlite3.connect(path) as raw:
                raw.execute("CREATE TABLE t (x)")
            os.chmod(path, 0o666)
        os.chmod(directory, 0o555)
        probe = subprocess.run(
            [*command, path],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        os.chmod(directory, 0o755)
    if probe.returncode == 3:
        pytest.skip("the unprivileged user cannot read the checkout")
    assert probe.returncode == 2, probe.stderr
    (line,) = probe.stdout.splitlines()
    assert line.startswith("storage: cannot ") and path in line
    assert ("Permission denied" if not existing else "readonly") in line


@pytest.mark.gen_test(timeout=10)
async def test_a_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreConfigError, match="newer"):
        await SqliteStore(path).open()


@pytest.mark.gen_test(timeout=10)
async def test_a_locked_database_is_unavailable_not_broken(tmp_path):
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path, busy_timeout=0.05)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)  # another process holding the lock
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.rooms.put("cal-1", "R", [], T0)
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.notifications.add("cal-1", "poll", "exists", T0)
        assert await store.rooms.get("cal-1") is None  # WAL: reads go on
        other.execute("ROLLBACK")
        _, created = await store.rooms.put("cal-1", "R", [], T0)
        assert created
    finally:
        other.close()
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_closed_store_says_so(tmp_path):
    store = SqliteStore(str(tmp_path / "mrm-push.sqlite3"))
    with pytest.raises(StoreUnavailable):
        await store.ping()
    await store.open()
    await store.ping()
    await store.close()
    await store.close()  # twice is harmless
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreError):
        await store.rooms.get("cal-1")


@pytest.mark.gen_test(timeout=20)
async def test_a_cancelled_call_leaves_all_or_nothing(tmp_path):
    """A caller cancelled mid-transaction (a request timing out) must neither half-publish
    nor leave the connection inside a transaction for the next caller."""
    store = SqliteStore(str(tmp_path / "mrm-push.sqlite3"))
    await store.open()
    try:
        targets = [Target("fcm", "t1"), Target("backend")]
        for ticks in range(12):
            n = await store.notifications.add("cal-1", "poll", "exists", T0)
            task = asyncio.ensure_future(store.notifications.publish(n.id, [], True, targets, T0))
            for _ in range(ticks):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stored = await store.notifications.get(n.id, with_deliveries=True)
            if stored.state == "published":
                assert stored.seq is not None and len(stored.deliveries) == 2
            else:
                assert stored.state == "received" and stored.deliveries == ()
            await store.rooms.put("cal-1", "R", [], T0)  # the connection still works
        assert await store.outbox.count() == 2 * await store.notifications.last_seq()
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_migration_2_counts_the_stops_a_version_1_file_holds(tmp_path):
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path)
    await store.open()
    await store.channels.enqueue_stop("ch-1", "res-1", "cal-1", T0)
    await store.channels.enqueue_stop("ch-2", "res-2", None, T0)
    await store.close()
    # Back to what version 1 had: no stopped_channels, no counts, no triggers.
    with sqlite3.connect(path) as raw:
        for trigger in ("channel_stops_insert", "channel_stops_delete"):
            raw.execute(f"DROP TRIGGER {trigger}")
        raw.execute("DROP TABLE stopped_channels")
        raw.execute("DELETE FROM meta WHERE key IN ('stops_queued', 'stops_remembered')")
        raw.execute("DROP TABLE leases")  # migrations 3 and 4, which come again after 2
        raw.execute("DROP INDEX deliveries_state_kind")
        raw.execute("PRAGMA user_version = 1")
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.channels.count_stops() == 2
        assert await store.channels.enqueue_unknown_stop("ch-3", "res-3", T0, 3) == "queued"
        assert await store.channels.enqueue_unknown_stop("ch-4", "res-4", T0, 3) == "full"
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_migration_4_indexes_the_outbox_count_of_a_version_3_file(tmp_path):
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path)
    await store.open()
    await publish_new(store, "cal-1", [Target("fcm", "token-a"), Target("backend")])
    await store.close()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP INDEX deliveries_state_kind")
        raw.execute("PRAGMA user_version = 3")
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.outbox.counts() == {("pending", "fcm"): 1, ("pending", "backend"): 1}
    finally:
        await store.close()
    with sqlite3.connect(path) as raw:
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT state, target_kind, count(*) FROM deliveries"
            " GROUP BY state, target_kind"
        ).fetchall()
    # Read from the index alone, no table rows and no temporary b-tree for the grouping.
    assert [row[3] for row in plan] == [
        "SCAN deliveries USING COVERING INDEX deliveries_state_kind"
    ]


@pytest.mark.gen_test(timeout=20)
async def test_the_wal_is_bounded_and_maintain_truncates_it(tmp_path):
    """SQLite's default checkpoint comes only at 1000 pages (about 4 MB) and never makes the WAL
    smaller, so on a small disk it grows until the disk is full. Ours: a checkpoint every 256
    pages, the WAL cut back to 1 MiB after it, and `maintain` (periodic) truncates it."""
    path = tmp_path / "mrm-push.sqlite3"
    wal = Path(f"{path}-wal")
    store = SqliteStore(str(path))
    await store.open()
    try:
        # One big commit (2 MB of tokens in one room) makes the WAL that big...
        tokens = [f"token-{i:05d}-" + "x" * 180 for i in range(10_000)]
        await store.rooms.put("cal-big", "R", tokens, T0)
        assert size(wal) > 2_000_000
        # ...and the next commits find it checkpointed and cut it back to the limit.
        for n in range(3):
            await store.rooms.put(f"cal-{n}", "R", ["t"], T0)
        assert size(wal) <= 1024 * 1024 + 64 * 1024
        await store.maintain()
        assert size(wal) == 0
        room = await store.rooms.get("cal-big")
        assert room is not None and len(room.firebase_tokens) == 10_000
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_another_process_opening_and_closing_the_file_leaves_ours_intact(tmp_path):
    # Our two connections hold POSIX locks on the file: a descriptor of it opened and closed
    # beside them would drop those locks, and the other process, closing what it then takes
    # for the last connection, would delete the WAL under ours (writes lost, disk I/O errors).
    path = str(tmp_path / "mrm-push.sqlite3")
    store = SqliteStore(path)
    await store.open()
    try:
        await store.rooms.put("cal-1", "Kampala", ["t1"], T0)
        other = (
            "import asyncio, sys\n"
            "from storage.sqlite import SqliteStore\n"
            "async def main():\n"
            "    store = SqliteStore(sys.argv[1])\n"
            "    await store.open()\n"
            "    await store.close()\n"
            "asyncio.run(main())\n"
        )
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", other, path], cwd=REPO, timeout=20
        )
        assert done.returncode == 0
        await store.rooms.put("cal-2", "Lagos", ["t2"], T0)
        with sqlite3.connect(path) as reader:
            found = reader.execute("SELECT calendar_id FROM rooms ORDER BY calendar_id")
            assert [row[0] for row in found] == ["cal-1", "cal-2"]
    finally:
        await store.close()
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert {room.calendar_id for room in await reopened.rooms.list()} == {"cal-1", "cal-2"}
    finally:
        await reopened.close()
