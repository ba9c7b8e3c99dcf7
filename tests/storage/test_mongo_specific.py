"""MongoStore's own behaviour: driver choice, unready while MongoDB is down, indexes made on the
first success, and publication without transactions. The shared contract suite covers the rest.

No MongoDB server runs here: mongomock-motor stands in, wrapped where a test needs the server
to be down or to fail at one chosen call.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import socket
import time
from typing import Any

import dns.exception
import dns.resolver
import motor.motor_asyncio
import pymongo
import pymongo.asynchronous.srv_resolver
import pymongo.synchronous.srv_resolver
import pytest
from mongomock_motor import AsyncMongoMockClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from storage import make_store
from storage.base import (
    DuplicateNotification,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    Target,
)
from storage.mongo import MongoStore
from storage.mongo.driver import database_name
from storage.mongo.migrations import MIGRATIONS
from storage.mongo.notifications import ID_BLOCK
from tests.storage.helpers import make_channel

REAL_MONGODB = os.environ.get("MRM_PUSH_TEST_MONGODB_URI")


class Faults:
    """What the wrapped client does wrong: everything while `down`, or one named call once."""

    def __init__(self) -> None:
        self.down = False
        self.once: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.rng = random.Random(7)

    def check(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise ServerSelectionTimeoutError(
                "127.0.0.1:27017: [Errno 111] Connection refused, Timeout: 0.2s, Topology ..."
            )
        if name in self.once:
            raise self.once.pop(name)


async def _yielding(result: Any, turns: int) -> Any:
    # mongomock-motor never yields; a real server does, after varying delays: let other tasks
    # run in between, a few turns of the loop (seeded, so a failure repeats).
    for _ in range(turns):
        await asyncio.sleep(0)
    return await result


class FlakyCollection:
    def __init__(self, target: Any, name: str, faults: Faults) -> None:
        self._target, self._name, self._faults = target, name, faults

    def __getattr__(self, method: str) -> Any:
        attr = getattr(self._target, method)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._faults.check(f"{self._name}.{method}")
            result = attr(*args, **kwargs)
            if inspect.isawaitable(result):
                return _yielding(result, self._faults.rng.randint(1, 4))
            return result

        return call


class FlakyDatabase:
    def __init__(self, target: Any, faults: Faults) -> None:
        self._target, self._faults = target, faults
        self.name = target.name

    def __getitem__(self, name: str) -> FlakyCollection:
        return FlakyCollection(self._target[name], name, self._faults)

    def __getattr__(self, name: str) -> FlakyCollection:
        return self[name]

    async def command(self, *args: Any, **kwargs: Any) -> Any:
        self._faults.check("command")
        return await self._target.command(*args, **kwargs)


class FlakyClient:
    """A thin wrapper of AsyncMongoMockClient standing in for a server that goes down."""

    def __init__(self, faults: Faults) -> None:
        self.mock = AsyncMongoMockClient()
        self.faults = faults

    def __getitem__(self, name: str) -> FlakyDatabase:
        return FlakyDatabase(self.mock[name], self.faults)

    def close(self) -> None:
        self.mock.close()


async def index_names(client: Any, database: str, collection: str) -> set[str]:
    return set(await client[database][collection].index_information())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- driver choice and configuration -----------------------------------------------------------
@pytest.mark.gen_test(timeout=10)
async def test_driver_choice_builds_the_named_client_without_connecting():
    url = f"mongodb://127.0.0.1:{closed_port()}/site"
    store = MongoStore(url, driver="pymongo")
    assert isinstance(store.client, pymongo.AsyncMongoClient)
    await store.close()
    store = MongoStore(url)  # motor is the default
    assert isinstance(store.client, motor.motor_asyncio.AsyncIOMotorClient)
    await store.close()
    assert isinstance(make_store(url, "pymongo"), MongoStore)


def test_unknown_driver_and_bad_urls_are_config_errors():
    with pytest.raises(StoreConfigError, match="mongo_driver"):
        MongoStore("mongodb://127.0.0.1/x", driver="pymongo-sync")
    # pymongo only warns about the last two and would go on without TLS.
    bad = [
        "mongodb://",
        "http://h/x",
        "mongodb://h:99999/x",
        "mongodb://h/?tls=maybe",
        "mongodb://h/?tsl=1",
    ]
    for driver in ("motor", "pymongo"):
        for url in bad:
            with pytest.raises(StoreConfigError, match=r"storage\.url"):
                MongoStore(url, driver=driver)
        # pymongo's notice about DocumentDB is no error.
        with pytest.warns(UserWarning, match="DocumentDB"):
            MongoStore("mongodb://x.docdb.amazonaws.com/site", driver=driver)


def test_database_comes_from_the_url_else_mrm_push():
    assert database_name("mongodb://u:p@h1:1,h2:2/site_db?replicaSet=rs") == "site_db"
    assert database_name("mongodb+srv://cluster.example.com/x%2Dy") == "x-y"
    assert database_name("mongodb://h/?w=1") is None
    assert database_name("mongodb://h") is None
    client = AsyncMongoMockClient()
    assert MongoStore("mongodb://h/site", client=client).database.name == "site"
    assert MongoStore("mongodb://h", client=client).database.name == "mrm_push"
    assert MongoStore("mongodb://h/site", client=client, database="other").database.name == "other"


# -- indexes and invariants (mongomock-motor) --------------------------------------------------
@pytest.mark.gen_test(timeout=10)
async def test_indexes_exist_after_open():
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    assert store.migrated
    info = await client["site"]["notifications"].index_information()
    assert info["channel_message_unique"]["unique"] is True
    assert "partialFilterExpression" in info["channel_message_unique"]
    assert info["seq_unique"]["unique"] is True
    assert {"state_due", "state_kind"} <= await index_names(client, "site", "deliveries")
    await store.close()


# -- the schema version ---------------------------------------------------------------------------
async def schema_doc(client: Any, database: str = "site") -> Any:
    return await client[database]["meta"].find_one({"_id": "schema"})


@pytest.mark.gen_test(timeout=10)
async def test_a_new_database_is_at_the_current_schema_version():
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    assert store.migrated
    assert (await schema_doc(client))["version"] == len(MIGRATIONS)
    await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_database_from_before_versions_is_migrated_and_keeps_its_data():
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    await store.rooms.put("cal-1", "Kampala", ["t1"], 1.0)
    epoch = await store.meta.store_epoch()
    await client["site"]["meta"].delete_one({"_id": "schema"})  # as the last release left it
    again = MongoStore("mongodb://h/site", client=client)
    await again.open()
    assert (await schema_doc(client))["version"] == len(MIGRATIONS)
    assert (await again.rooms.get("cal-1")).firebase_tokens == ("t1",)
    assert await again.meta.store_epoch() == epoch
    assert "channel_message_unique" in await index_names(client, "site", "notifications")


@pytest.mark.gen_test(timeout=10)
async def test_a_newer_schema_is_refused_as_a_config_error():
    client = AsyncMongoMockClient()
    await client["site"]["meta"].insert_one({"_id": "schema", "version": len(MIGRATIONS) + 1})
    store = MongoStore("mongodb://h/site", client=client)
    with pytest.raises(StoreConfigError, match="newer than this mrm-push knows") as raised:
        await store.open()
    assert str(raised.value) == (
        f"storage: mongodb database 'site' has schema version {len(MIGRATIONS) + 1},"
        f" newer than this mrm-push knows ({len(MIGRATIONS)})"
    )
    assert not store.migrated
    assert await index_names(client, "site", "notifications") == set()  # nothing touched
    with pytest.raises(StoreConfigError):
        await store.rooms.get("cal-1")  # every call says so, not only the start


@pytest.mark.gen_test(timeout=10)
async def test_a_newer_schema_found_once_the_server_is_back_keeps_the_store_unready():
    faults = Faults()
    faults.down = True
    client = FlakyClient(faults)
    await client.mock["site"]["meta"].insert_one({"_id": "schema", "version": 99})
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()  # down: the start goes on
    faults.down = False
    with pytest.raises(StoreConfigError, match="schema version 99"):
        await store.ping()


@pytest.mark.gen_test(timeout=10)
async def test_duplicate_notification_raises_and_polls_never_collide():
    store = MongoStore("mongodb://h/site", client=AsyncMongoMockClient())
    await store.open()
    first = await store.notifications.add("c", "webhook", "exists", 1.0, "ch", 7)
    with pytest.raises(DuplicateNotification):
        await store.notifications.add("c", "webhook", "exists", 2.0, "ch", 7)
    other = await store.notifications.add("c", "webhook", "exists", 2.0, "ch2", 7)
    polls = [await store.notifications.add("c", "poll", "exists", 3.0) for _ in range(2)]
    assert [n.id for n in (first, other, *polls)] == [1, 2, 3, 4]
    assert polls[0].channel_id is None and polls[0].message_number is None


# -- down at start, recovering later -----------------------------------------------------------
@pytest.mark.parametrize("driver", ["motor", "pymongo"])
@pytest.mark.gen_test(timeout=20)
async def test_open_succeeds_and_ping_fails_fast_while_the_server_is_down(driver):
    url = f"mongodb://127.0.0.1:{closed_port()}/x?serverSelectionTimeoutMS=200"
    store = MongoStore(url, driver=driver)
    await store.open()
    assert not store.migrated
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable") as caught:
        await store.ping()
    assert time.monotonic() - started < 5
    assert "127.0.0.1" in str(caught.value)
    assert "Topology" not in str(caught.value)  # the reason is one short line
    with pytest.raises(StoreUnavailable):
        await store.rooms.get("c")
    await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_indexes_are_made_on_the_first_successful_ping():
    faults = Faults()
    faults.down = True
    client = FlakyClient(faults)
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    assert not store.migrated
    with pytest.raises(StoreUnavailable, match="Connection refused"):
        await store.ping()
    assert not store.migrated
    assert await index_names(client.mock, "site", "notifications") == set()

    faults.down = False
    await store.ping()
    assert store.migrated
    assert "channel_message_unique" in await index_names(client.mock, "site", "notifications")
    made = faults.calls.count("notifications.create_index")
    await store.ping()
    assert faults.calls.count("notifications.create_index") == made  # made once only


@pytest.mark.gen_test(timeout=10)
async def test_indexes_are_made_by_the_first_successful_operation_too():
    faults = Faults()
    faults.down = True
    client = FlakyClient(faults)
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    with pytest.raises(StoreUnavailable):
        await store.notifications.add("c", "webhook", "exists", 1.0, "ch", 1)
    faults.down = False
    await store.notifications.add("c", "webhook", "exists", 1.0, "ch", 1)
    assert store.migrated
    with pytest.raises(DuplicateNotification):
        await store.notifications.add("c", "webhook", "exists", 1.0, "ch", 1)


@pytest.mark.gen_test(timeout=10)
async def test_other_driver_errors_are_store_errors_not_unavailable():
    faults = Faults()
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    await store.open()
    faults.once["rooms.find_one"] = OperationFailure("not authorized on site", code=13)
    with pytest.raises(StoreError, match="not authorized") as caught:
        await store.rooms.get("c")
    assert not isinstance(caught.value, StoreUnavailable)


# -- publication in several writes ---------------------------------------------------------------
async def received(store: MongoStore, n: int = 1) -> list[int]:
    return [(await store.notifications.add("c", "poll", "exists", 1.0)).id for _ in range(n)]


TARGETS = [Target("fcm", "tok-a"), Target("backend")]


@pytest.mark.gen_test(timeout=10)
async def test_a_publication_cut_before_the_seq_is_visible_leaves_nothing_to_send():
    faults = Faults()
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    await store.open()
    (nid,) = await received(store)
    faults.once["notifications.find_one_and_update"] = ServerSelectionTimeoutError("down")
    with pytest.raises(StoreUnavailable):
        await store.notifications.publish(nid, [{"event_id": "e"}], False, TARGETS, 5.0)
    half = await store.notifications.get(nid, with_deliveries=True)
    assert half is not None and half.state == "received" and half.deliveries == ()
    [waiting] = await store.notifications.received()  # its held deliveries stay unseen
    assert waiting.id == nid and waiting.deliveries == ()
    assert await store.outbox.claim(10.0, 40.0) == []
    assert await store.outbox.next_due() is None
    assert await store.notifications.last_seq() == 0

    again = await store.notifications.publish(nid, [{"event_id": "e"}], False, TARGETS, 6.0)
    assert again.state == "published" and again.seq == 2  # seq 1 is a gap never seen
    assert [d.target for d in again.deliveries] == TARGETS
    assert await store.outbox.count() == 2  # the half-made ones are gone
    claimed = await store.outbox.claim(10.0, 40.0)
    assert sorted(d.id for d in claimed) == sorted(d.id for d in again.deliveries)


@pytest.mark.gen_test(timeout=10)
async def test_a_publication_cut_after_the_seq_is_visible_is_finished_by_release_claims():
    faults = Faults()
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    await store.open()
    (nid,) = await received(store)
    faults.once["deliveries.update_many"] = ServerSelectionTimeoutError("down")
    with pytest.raises(StoreUnavailable):
        await store.notifications.publish(nid, [], True, TARGETS, 5.0)
    shown = await store.notifications.get(nid, with_deliveries=True)
    assert shown is not None and shown.seq == 1 and len(shown.deliveries) == 2
    assert await store.outbox.claim(10.0, 40.0) == []  # still held

    assert await store.notifications.publish(nid, [], True, TARGETS, 6.0) == shown
    assert await store.outbox.release_claims() == 0  # nothing was in flight; the hold is lifted
    assert await store.outbox.next_due() == 5.0
    assert len(await store.outbox.claim(10.0, 40.0)) == 2


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_publications_become_visible_in_seq_order():
    # Every call yields to the loop, as with a real server: publishers and a reader interleave.
    store = MongoStore("mongodb://h/site", client=FlakyClient(Faults()))
    await store.open()
    ids = await received(store, 12)
    snapshots: list[list[int]] = []
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            await asyncio.sleep(0)  # find() cursors of mongomock-motor never yield
            page = await store.notifications.list(after=0, limit=500, with_deliveries=True)
            snapshots.append([n.seq or 0 for n in page])
            assert all(n.deliveries for n in page)  # never published without deliveries

    async def publish(nid: int) -> None:
        await store.notifications.publish(nid, [{"event_id": str(nid)}], False, TARGETS, 5.0)

    reading = asyncio.ensure_future(reader())
    await asyncio.gather(*(publish(nid) for nid in ids))
    done.set()
    await reading
    assert len(snapshots) > 1
    for seqs in snapshots:
        assert seqs == list(range(1, len(seqs) + 1))  # a prefix: no seq visible before a lower one
    assert await store.notifications.last_seq() == 12


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_claimers_never_share_a_delivery_when_calls_interleave():
    store = MongoStore("mongodb://h/site", client=FlakyClient(Faults()))
    await store.open()
    every: set[int] = set()
    for nid in await received(store, 10):
        published = await store.notifications.publish(nid, [], True, TARGETS * 2, 5.0)
        every.update(d.id for d in published.deliveries)
    handed: list[int] = []

    async def claimer() -> None:
        while batch := await store.outbox.claim(10.0, 70.0, limit=3):
            handed.extend(d.id for d in batch)

    await asyncio.gather(*(claimer() for _ in range(5)))
    assert sorted(handed) == sorted(every)  # each one exactly once


@pytest.mark.skipif(not REAL_MONGODB, reason="MRM_PUSH_TEST_MONGODB_URI is not set")
@pytest.mark.parametrize("driver", ["motor", "pymongo"])
@pytest.mark.gen_test(timeout=30)
async def test_real_server_ping_and_indexes(driver):
    assert REAL_MONGODB is not None
    store = MongoStore(REAL_MONGODB, driver=driver, database=f"mrm_push_test_{driver}")
    await store.open()
    await store.ping()
    assert store.migrated
    await store.client.drop_database(f"mrm_push_test_{driver}")
    await store.close()


@pytest.mark.parametrize("driver", ["motor", "pymongo"])
@pytest.mark.parametrize(
    ("dns_error", "expected"),
    [
        (dns.resolver.NXDOMAIN(), StoreConfigError),  # the name does not exist: fix the URL
        (dns.exception.Timeout(), StoreUnavailable),  # DNS is down: try again later
        (dns.resolver.NoNameservers(), StoreUnavailable),
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_an_srv_name_that_does_not_exist_is_a_config_error_a_dns_outage_is_not(
    monkeypatch, driver, dns_error, expected
):
    # No DNS here: the resolver pymongo calls for mongodb+srv:// answers with the error.
    def sync_resolve(*args, **kwargs):
        raise dns_error

    async def async_resolve(*args, **kwargs):
        raise dns_error

    monkeypatch.setattr(pymongo.synchronous.srv_resolver, "_resolve", sync_resolve)
    monkeypatch.setattr(pymongo.asynchronous.srv_resolver, "_resolve", async_resolve)
    store = MongoStore("mongodb+srv://cluster.example.com/site", driver=driver)
    try:
        with pytest.raises(expected) as raised:
            await store.ping()
        assert type(raised.value) is expected
        if expected is StoreConfigError:
            assert str(raised.value).startswith("storage.url: ")
            with pytest.raises(StoreConfigError):
                await store.open()  # the start stops (exit 2)
        else:
            await store.open()  # the start goes on, unready
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=10)
async def test_held_deliveries_of_a_cut_publication_are_not_listed_counted_or_retried():
    faults = Faults()
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    await store.open()
    (nid,) = await received(store)
    faults.once["notifications.find_one_and_update"] = ServerSelectionTimeoutError("down")
    with pytest.raises(StoreUnavailable):
        await store.notifications.publish(nid, [{"event_id": "e"}], False, TARGETS, 5.0)
    assert await store.outbox.list() == []
    assert await store.outbox.counts() == {}
    outcome = await store.outbox.retry(6.0, state="failed")
    assert outcome.retried == () and outcome.skipped == ()


@pytest.mark.gen_test(timeout=10)
async def test_a_token_that_leaves_while_a_retry_runs_is_cancelled_not_brought_back(monkeypatch):
    # No transaction joins the retry's rooms read to its update: the token leaves in between.
    from storage.mongo import outbox as mongo_outbox

    store = MongoStore("mongodb://h/site", client=AsyncMongoMockClient())
    await store.open()
    await store.rooms.put("c", "", ["tok-a", "tok-b"], 1.0)
    (nid,) = await received(store)
    published = await store.notifications.publish(
        nid, [], True, [Target("fcm", "tok-a"), Target("fcm", "tok-b")], 2.0
    )
    d_a, d_b = (d.id for d in published.deliveries)
    for delivery_id in (d_a, d_b):
        await store.outbox.finish(delivery_id, "failed", 3.0, attempts=8, last_error="e")
    real_rooms = mongo_outbox._room_tokens
    looks = 0

    async def rooms_then_token_leaves(*args):
        nonlocal looks
        found = await real_rooms(*args)
        looks += 1
        if looks == 1:
            await store.rooms.remove_token("c", "tok-a", 4.0)  # cancels only pending ones: none yet
        return found

    monkeypatch.setattr(mongo_outbox, "_room_tokens", rooms_then_token_leaves)
    outcome = await store.outbox.retry(5.0, ids=[d_a, d_b])
    assert outcome.retried == (d_b,)
    assert [(s.id, s.reason, s.state) for s in outcome.skipped] == [
        (d_a, "token_dropped", "cancelled")
    ]
    states = {d.id: d.state for d in await store.outbox.list()}
    assert states == {d_a: "cancelled", d_b: "pending"}
    assert [d.id for d in await store.outbox.claim(6.0, 60.0)] == [d_b]


# -- round trips --------------------------------------------------------------------------------
def round_trips(faults: Faults) -> int:
    """Calls that reach the server (collection methods and commands) since the last clear."""
    return len(faults.calls)


@pytest.mark.gen_test(timeout=10)
async def test_a_webhook_notification_costs_three_round_trips():
    """The handler's channels.get, then the insert and the channel's number: the unique index
    decides duplicates (no look first), and ids come from a block reserved in memory."""
    faults = Faults()
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    await store.open()
    await store.channels.insert(make_channel("ch-1", "cal-1"))
    faults.calls.clear()
    count = 200
    for number in range(1, count + 1):
        assert await store.channels.get("ch-1") is not None
        await store.notifications.add("cal-1", "webhook", "exists", 1.0, "ch-1", number)
    reserved = faults.calls.count("counters.find_one_and_update")
    assert reserved == -(-count // ID_BLOCK)  # one per block of ids
    assert round_trips(faults) == 3 * count + reserved
    assert (await store.channels.get("ch-1")).last_message_number == count


@pytest.mark.gen_test(timeout=10)
async def test_block_ids_increase_are_never_reused_and_a_duplicate_spends_none():
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    first = await store.notifications.add("c", "webhook", "exists", 1.0, "ch", 1)
    with pytest.raises(DuplicateNotification):
        await store.notifications.add("c", "webhook", "exists", 1.0, "ch", 1)
    second = await store.notifications.add("c", "poll", "exists", 1.0)
    assert (first.id, second.id) == (1, 2)  # the refused one took no id
    # A restart (another handle) starts a new block: the rest of the old one is never used.
    again = MongoStore("mongodb://h/site", client=client)
    await again.open()
    third = await again.notifications.add("c", "poll", "exists", 1.0)
    assert third.id == ID_BLOCK + 1
    fourth = await store.notifications.add("c", "poll", "exists", 1.0)  # the old handle's block
    assert fourth.id == 3 and len({first.id, second.id, third.id, fourth.id}) == 4


@pytest.mark.gen_test(timeout=10)
async def test_an_id_the_counter_gave_twice_is_a_store_error_not_a_duplicate():
    """A counter behind the data (say, restored from an older backup) must not pass a new
    notification off as Google's resend (the webhook would answer 200 and drop it)."""
    client = AsyncMongoMockClient()
    store = MongoStore("mongodb://h/site", client=client)
    await store.open()
    await store.notifications.add("c", "poll", "exists", 1.0)
    await client["site"]["counters"].delete_one({"_id": "notification_id"})
    again = MongoStore("mongodb://h/site", client=client)
    await again.open()
    with pytest.raises(StoreError, match="counter") as raised:
        await again.notifications.add("c", "webhook", "exists", 1.0, "ch", 1)
    assert not isinstance(raised.value, DuplicateNotification)


@pytest.mark.gen_test(timeout=10)
async def test_a_claim_costs_the_same_round_trips_whatever_its_size():
    faults = Faults()
    store = MongoStore("mongodb://h/site", client=FlakyClient(faults))
    await store.open()
    (nid,) = await received(store)
    targets = [Target("fcm", f"tok-{i}") for i in range(50)]
    published = await store.notifications.publish(nid, [], True, targets, 5.0)
    faults.calls.clear()
    assert await store.outbox.claim(4.0, 60.0, limit=64) == []  # nothing due yet
    assert round_trips(faults) == 1
    faults.calls.clear()
    claimed = await store.outbox.claim(10.0, 60.0, limit=64)
    assert [d.id for d in claimed] == [d.id for d in published.deliveries]  # oldest due first
    assert {(d.state, d.lease_until) for d in claimed} == {("in_flight", 60.0)}
    assert round_trips(faults) == 3  # find the due ids, take them, read back what we took
    faults.calls.clear()
    assert await store.outbox.claim(10.0, 60.0, limit=64) == []
    assert round_trips(faults) == 1


class LookThenWait:
    """A deliveries collection whose look for due deliveries (a find without `claim`) waits,
    once it has read, until as many claimers have looked as the barrier has parties."""

    def __init__(self, target: Any, barrier: asyncio.Barrier, waited: list[int]) -> None:
        self._target, self._barrier, self._waited = target, barrier, waited

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def find(self, filt: Any, *args: Any, **kwargs: Any) -> Any:
        cursor = self._target.find(filt, *args, **kwargs)
        if "claim" in filt:
            return cursor  # the read back
        real_to_list, waited, barrier = cursor.to_list, self._waited, self._barrier

        async def to_list(*a: Any) -> Any:
            found = await real_to_list(*a)
            waited.append(len(found))
            await barrier.wait()
            return found

        cursor.to_list = to_list
        return cursor


class GatedDatabase:
    def __init__(self, target: Any, deliveries: LookThenWait) -> None:
        self._target, self._deliveries = target, deliveries
        self.name = target.name

    def __getitem__(self, name: str) -> Any:
        return self._deliveries if name == "deliveries" else self._target[name]

    def __getattr__(self, name: str) -> Any:
        return self._deliveries if name == "deliveries" else getattr(self._target, name)


@pytest.mark.gen_test(timeout=10)
async def test_claimers_that_found_the_same_deliveries_never_both_take_one():
    """Both look before either takes: the take re-checks that each is still due, so what the
    first took, the second does not get."""
    mock = AsyncMongoMockClient()["site"]
    looked, waited = asyncio.Barrier(2), []
    gated = {"site": GatedDatabase(mock, LookThenWait(mock.deliveries, looked, waited))}
    plain = MongoStore("mongodb://h/site", client={"site": mock})
    await plain.open()
    (nid,) = await received(plain)
    published = await plain.notifications.publish(nid, [], True, TARGETS * 3, 5.0)
    store = MongoStore("mongodb://h/site", client=gated)
    await store.open()
    first, second = await asyncio.gather(
        store.outbox.claim(10.0, 60.0, limit=10), store.outbox.claim(10.0, 60.0, limit=10)
    )
    assert waited == [6, 6]  # both found all six before either took one
    assert sorted(d.id for d in first + second) == sorted(d.id for d in published.deliveries)
    assert {d.id for d in first}.isdisjoint(d.id for d in second)
