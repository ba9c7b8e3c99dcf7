"""The instance lease (contract 1): one `serve` per store; a killed one's lease is taken over.

First `InstanceLease` on a real store with a clock the test drives, then `serve` as real
processes: a second one beside a live one, a restart right after SIGKILL, and a run whose lease
another instance took while it was frozen.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from mongomock_motor import AsyncMongoMockClient
from tornado.netutil import bind_sockets

from daemon.app import ALWAYS_PERIODIC, Service
from daemon.clock import rfc3339
from daemon.configfile import ConfigError, load_config
from daemon.lease import LEASE_NAME, InstanceLease, InstanceRunning, LeaseLost
from storage.mongo import MongoStore
from storage.sqlite import SqliteStore
from tests.fixtures import call, store, write_config  # noqa: F401
from tests.storage.test_mongo_specific import Faults, FlakyClient
from tests.test_crash import ServiceProcess

T0 = 1_800_000_000.0
SECONDS = 15


class SteppingClock:
    """Wall time that jumps ahead by what is slept, after letting the other process act."""

    def __init__(self) -> None:
        self.time = T0
        self.slept: list[float] = []
        self.meanwhile: Callable[[], Awaitable[None]] | None = None

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.time += seconds
        if self.meanwhile is not None:
            await self.meanwhile()


def instance(store: SqliteStore, clock: SteppingClock, host: str, pid: int) -> InstanceLease:
    return InstanceLease(store.meta, SECONDS, clock, host=host, pid=pid)


@pytest.mark.gen_test(timeout=10)
async def test_a_start_beside_a_live_holder_fails_naming_it_within_a_renewal(store):
    clock = SteppingClock()
    first = instance(store, clock, "web-1", 4242)
    await first.acquire()
    clock.meanwhile = first.renew  # the first instance is alive: it renews while we wait
    second = instance(store, clock, "web-2", 99)
    with pytest.raises(InstanceRunning) as raised:
        await second.acquire()
    message = str(raised.value)
    assert "another mrm-push holds this store's instance lease" in message
    assert f"host web-1, pid 4242, holding it since {rfc3339(T0)}, renewed until" in message
    # Told after one look past a renewal, long before the lease would have expired.
    assert sum(clock.slept) <= 1.5 * SECONDS / 3
    assert (await store.meta.get_lease(LEASE_NAME)).holder == first.holder
    assert second.held is None


@pytest.mark.gen_test(timeout=10)
async def test_a_dead_holders_lease_is_taken_over_when_it_expires(store, caplog):
    caplog.set_level(logging.INFO, logger="daemon.lease")
    clock = SteppingClock()
    dead = instance(store, clock, "web-1", 4242)
    await dead.acquire()  # then killed: it never renews
    second = instance(store, clock, "web-1", 4343)
    await second.acquire()
    assert clock.now() == T0 + SECONDS  # not a moment before the dead one's expiry
    lease = await store.meta.get_lease(LEASE_NAME)
    assert (lease.holder, lease.pid, lease.since) == (second.holder, 4343, T0 + SECONDS)
    events = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert events == [
        ("INFO", "instance_lease_taken"),
        ("WARNING", "instance_lease_waiting"),
        ("INFO", "instance_lease_taken"),
    ]
    assert "pid 4242" in caplog.records[-1].previous


@pytest.mark.gen_test(timeout=10)
async def test_a_third_process_taking_the_lease_while_we_wait_is_a_live_instance(store):
    clock = SteppingClock()
    await instance(store, clock, "web-1", 1).acquire()  # dies
    third = instance(store, clock, "web-3", 3)

    async def third_takes_it() -> None:
        if clock.now() >= T0 + SECONDS:
            await third.try_acquire()

    clock.meanwhile = third_takes_it
    with pytest.raises(InstanceRunning, match="host web-3, pid 3"):
        await instance(store, clock, "web-2", 2).acquire()


@pytest.mark.gen_test(timeout=10)
async def test_a_renewal_after_another_took_the_lease_is_refused_and_lost(store):
    clock = SteppingClock()
    first = instance(store, clock, "web-1", 1)
    await first.acquire()
    clock.time += SECONDS + 1  # the first could not renew in time
    second = instance(store, clock, "web-2", 2)
    assert await second.try_acquire()
    with pytest.raises(LeaseLost, match="another holder has it: host web-2, pid 2"):
        await first.renew()
    assert first.held is None
    await first.release()  # a lost lease is not ours to release
    assert (await store.meta.get_lease(LEASE_NAME)).holder == second.holder


@pytest.mark.gen_test(timeout=20)
async def test_with_mongodb_down_at_start_the_work_waits_for_the_lease(tmp_path):
    faults = Faults()
    faults.down = True
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    service = Service(load_config(str(write_config(tmp_path)), environ={}), store=store)
    await service.start(bind_sockets(0, "127.0.0.1"))
    try:
        # Listening and saying why it is unready, but doing nothing without the lease.
        assert service.instance_lease.held is None
        # Only the lease task, and the metrics task (it reports being unready meanwhile).
        running = {name for name, c in service.periodic.items() if c.is_running()}
        assert running == set(ALWAYS_PERIODIC) == {"lease", "metrics"}
        _, body = await call(service, "GET", "/readyz", key=None)
        assert "mongodb unreachable" in body["checks"]["storage"]
        faults.down = False
        _, body = await call(service, "GET", "/readyz", key=None)
        assert body["checks"]["storage"] == "the instance lease is not held yet: no work is done"

        await service.keep_lease()  # the lease task's next run: the database answers now
        assert (await store.meta.get_lease(LEASE_NAME)).holder == service.instance_lease.holder
        assert all(callback.is_running() for callback in service.periodic.values())
        _, body = await call(service, "GET", "/readyz", key=None)
        assert body["checks"]["storage"] == "ok"
    finally:
        await service.stop()
    assert await store.meta.get_lease(LEASE_NAME) is None  # released at the stop


# -- serve as real processes -------------------------------------------------------------------
LEASE_SECONDS = 1  # renewed every third of a second


@pytest.fixture
def database(tmp_path) -> Path:
    return tmp_path / "lease.sqlite3"


@pytest.fixture
def serve(io_loop, tmp_path, database) -> Iterator[Callable[[], ServiceProcess]]:
    """Makes `serve` processes on one store (each on a port of its own)."""
    config = write_config(
        tmp_path,
        {
            "storage": {"url": f"sqlite:///{database}", "lease_seconds": LEASE_SECONDS},
            "logging": {"level": "info"},
        },
    )
    made: list[ServiceProcess] = []

    def make() -> ServiceProcess:
        made.append(ServiceProcess(config, ""))
        return made[-1]

    yield make
    for process in made:
        io_loop.run_sync(process.cleanup)


def stored_lease(database: Path) -> tuple[str, int] | None:
    """(host, pid) of the instance lease in the file, read as another program would."""
    with sqlite3.connect(database, timeout=5) as db:
        row = db.execute("SELECT host, pid FROM leases WHERE name = ?", (LEASE_NAME,)).fetchone()
    return None if row is None else (row[0], row[1])


def pid_of(process: ServiceProcess) -> int:
    assert process.process is not None
    return process.process.pid


@pytest.mark.gen_test(timeout=40)
async def test_a_second_serve_exits_1_naming_the_holder(serve, database):
    first, second = serve(), serve()
    await first.start()
    await second.spawn()
    waiting = await second.wait_event("instance_lease_waiting")
    assert waiting["holder_pid"] == pid_of(first)
    assert await second.exited() == 1, second.tail()
    [line] = [e["text"] for e in second.events if e["event"] is None]
    assert line.startswith(
        "mrm-push: cannot start: another mrm-push holds this store's instance lease"
        f" (host {os.uname().nodename}, pid {pid_of(first)}, holding it since "
    ), line
    # It did nothing: no recovery (no claims of the first taken back), never listened.
    assert not second.logged("recovered") and not second.logged("listening")
    assert stored_lease(database) == (os.uname().nodename, pid_of(first))

    # A clean stop lets the lease go: the next start takes it at once.
    await first.terminate()
    assert first.logged("instance_lease_released") and stored_lease(database) is None
    await second.start()
    assert not second.logged("instance_lease_waiting"), second.tail()
    await second.terminate()


@pytest.mark.gen_test(timeout=40)
async def test_a_restart_right_after_sigkill_waits_for_the_lease_then_takes_it(
    serve, database, io_loop
):
    service = serve()
    await service.start()
    killed = pid_of(service)
    await service.kill()
    assert stored_lease(database) == (os.uname().nodename, killed)  # left behind

    began = io_loop.asyncio_loop.time()
    await service.start()  # at once: it waits instead of exiting
    took = io_loop.asyncio_loop.time() - began
    waiting = await service.wait_event("instance_lease_waiting", 0)
    taken = await service.wait_event("instance_lease_taken", 0)
    assert waiting["holder_pid"] == killed
    assert f"pid {killed}," in taken["previous"]
    assert taken["ts"] >= waiting["until"]  # not before the dead one's lease expired
    assert took < LEASE_SECONDS + 5, took  # within the lease time (plus a cold start)
    assert stored_lease(database) == (os.uname().nodename, pid_of(service))
    await service.terminate()


@pytest.mark.gen_test(timeout=40)
async def test_a_serve_whose_lease_was_taken_meanwhile_stops_and_exits_1(serve, database):
    frozen, other = serve(), serve()
    await frozen.start()
    assert frozen.process is not None
    # Frozen (as by a long stall): it cannot renew, its lease expires, another instance
    # starts and takes it over.
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        await other.start()
        assert other.logged("instance_lease_waiting")
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    lost = await frozen.wait_event("instance_lease_lost")
    assert lost["level"] == "error"
    assert (
        f"another holder has it: host {os.uname().nodename}, pid {pid_of(other)},"
        in (lost["reason"])
    )
    assert await frozen.exited() == 1, frozen.tail()
    assert frozen.logged("stopped") and not frozen.logged("instance_lease_released")
    # The other one keeps the lease and runs on.
    assert stored_lease(database) == (os.uname().nodename, pid_of(other))
    await other.terminate()


@pytest.mark.gen_test(timeout=20)
async def test_a_mongodb_schema_newer_than_this_release_stops_the_start(tmp_path):
    client = AsyncMongoMockClient()
    await client["site"]["meta"].insert_one({"_id": "schema", "version": 99})
    store = MongoStore("mongodb://h/site", client=client)
    service = Service(load_config(str(write_config(tmp_path)), environ={}), store=store)
    with pytest.raises(ConfigError, match="schema version 99, newer than this") as raised:
        await service.start(bind_sockets(0, "127.0.0.1"))
    assert raised.value.key == "storage.url"  # `serve` exits 2, naming the key
    assert await client["site"]["leases"].find_one({}) is None  # no lease was taken
