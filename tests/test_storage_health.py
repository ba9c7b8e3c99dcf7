"""The SQLite file under a running service: deleted or replaced, or on a disk that is full.

A real service over HTTP on a real file; the full disk is a real one (a 2 MB tmpfs, which needs
the right to mount: the test is skipped without it).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from storage.sqlite.connection import WAL_SIZE_LIMIT
from tests.fixtures import call, make_service  # noqa: F401  (fixture)

ROOM = "room-{}@resource.calendar.google.com"
WEBHOOK_HEADERS = {
    "X-Goog-Channel-ID": "channel-1",
    "X-Goog-Message-Number": "7",
    "X-Goog-Resource-ID": "resource-1",
    "X-Goog-Resource-State": "exists",
}


async def storage_check(service) -> tuple[int, str]:
    status, body = await call(service, "GET", "/readyz", key=None)
    return status, body["checks"]["storage"]


def size(path: Path) -> int:
    return os.stat(path).st_size


def records(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


def another_sqlite_file(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE unrelated (x)")
    os.chmod(path, 0o600)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_the_file_deleted_or_replaced_under_a_running_service(
    make_service, tmp_path, caplog, how
):
    caplog.set_level(logging.INFO)
    service = await make_service()
    path = tmp_path / "mrm-push.sqlite3"
    assert await storage_check(service) == (503, "ok")  # (Google and FCM are not configured)
    assert (await call(service, "PUT", "/v1/rooms/" + quote(ROOM.format(1)), {}))[0] == 201

    if how == "deleted":
        path.unlink()
        said = "was deleted"
    else:
        another_sqlite_file(tmp_path / "other.sqlite3")
        replacement = (tmp_path / "other.sqlite3").read_bytes()
        os.replace(tmp_path / "other.sqlite3", path)
        said = "was replaced by another file"
    reason = (
        f"sqlite: {path} {said} while in use; the store refuses every call until that file is"
        " back at its path, or the service is restarted"
    )
    for _ in range(3):  # every probe says so; the ERROR line comes once
        assert await storage_check(service) == (503, reason)
    [error] = records(caplog, "storage_file_gone")
    assert error.levelno == logging.ERROR and error.reason == reason

    # Nothing lands in a file nobody will read: writes (and reads) are refused with 503, the
    # webhook too, so that Google sends the notification again later.
    status, body = await call(service, "PUT", "/v1/rooms/" + quote(ROOM.format(2)), {})
    assert status == 503 and body["error"]["code"] == "storage_unavailable"
    assert body["error"]["message"] == reason
    status, _ = await call(service, "POST", "/notifications", key=None, headers=WEBHOOK_HEADERS)
    assert status == 503
    assert (await call(service, "GET", "/v1/rooms"))[0] == 503
    if how == "replaced":
        assert path.read_bytes() == replacement  # the file now at the path was not touched


@pytest.mark.gen_test(timeout=20)
async def test_the_file_moved_away_and_back_is_the_store_again(make_service, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    service = await make_service()
    path = tmp_path / "mrm-push.sqlite3"
    assert (await call(service, "PUT", "/v1/rooms/" + quote(ROOM.format(1)), {}))[0] == 201
    os.rename(path, tmp_path / "moved.sqlite3")
    status, reason = await storage_check(service)
    assert status == 503 and "was deleted while in use" in reason
    os.rename(tmp_path / "moved.sqlite3", path)  # the same inode: the same file
    assert await storage_check(service) == (503, "ok")
    assert len(records(caplog, "storage_file_back")) == 1
    status, body = await call(service, "GET", "/v1/rooms")
    assert status == 200 and [r["calendar_id"] for r in body["rooms"]] == [ROOM.format(1)]
    assert (await call(service, "PUT", "/v1/rooms/" + quote(ROOM.format(2)), {}))[0] == 201


# -- a full disk -------------------------------------------------------------------------------
DISK_SIZE = "2m"


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MB tmpfs of our own (root, or CAP_SYS_ADMIN, is needed to mount it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of the disk; returns the file that holds them."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as error:
        assert error.errno == 28, error  # ENOSPC
    try:
        while True:  # the last partial block
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    os.close(fd)
    return filler


async def put_room(service, n: int, tokens: int = 1) -> tuple[int, dict]:
    body = {"firebase_tokens": [f"token-{n}-{i}-" + "x" * 150 for i in range(tokens)]}
    return await call(service, "PUT", "/v1/rooms/" + quote(ROOM.format(n)), body)


@pytest.mark.gen_test(timeout=30)
async def test_a_full_disk_makes_storage_unready_until_writes_work_again(
    small_disk, make_service, caplog
):
    caplog.set_level(logging.INFO)
    path = small_disk / "mrm-push.sqlite3"
    wal = Path(f"{path}-wal")
    service = await make_service({"storage": {"url": f"sqlite:///{path}"}})
    assert await storage_check(service) == (503, "ok")

    filler = fill(small_disk)
    for n in range(1000):  # SQLite reuses what the WAL holds already, then needs more
        status, body = await put_room(service, n)
        if status != 201:
            break
    assert status == 503 and body["error"]["code"] == "storage_unavailable", body
    full = f"sqlite: the last write to {path} failed: database or disk is full"
    for _ in range(3):  # each probe tries a real write: still full
        assert await storage_check(service) == (503, full)
    assert [r.levelno for r in records(caplog, "storage_writes_failing")] == [logging.ERROR]

    filler.unlink()
    # The next probe's write works: ready again, and the WAL is given back at once.
    assert await storage_check(service) == (503, "ok")
    assert size(wal) == 0
    assert len(records(caplog, "storage_writes_recovered")) == 1
    assert (await put_room(service, n))[0] == 201

    # The WAL stays bounded as writes go on: cut back after SQLite's checkpoints, truncated by
    # the periodic maintenance; it never takes the disk again.
    largest = 0
    for m in range(n + 1, n + 120):
        assert (await put_room(service, m, tokens=20))[0] == 201
        largest = max(largest, size(wal))
    assert largest <= WAL_SIZE_LIMIT + 64 * 1024, largest
    await service.store.maintain()
    assert size(wal) == 0
    assert await storage_check(service) == (503, "ok")
    assert len(records(caplog, "storage_writes_failing")) == 1  # one incident, one ERROR
