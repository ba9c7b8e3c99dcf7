"""The syncer against a real SQLite store and the real Calendar gateway on the Google emulator.

The environment is made of the shared fixtures (tests/fixtures.py). Time is a ManualClock shared
with the emulator: backoffs end when a test moves it. A `list` held at the emulator
(inject(..., hold=)) keeps a sync under way for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon import sync as sync_module
from daemon.clock import ManualClock
from daemon.config import Config
from daemon.emulator.app import Emulator
from daemon.google_calendar import GoogleCalendar
from daemon.sync import Syncer
from storage.base import Notification, Target
from storage.sqlite import SqliteStore
from tests.fixtures import STORE_FILE, clock, emulator, key_file, list_pages, store  # noqa: F401

CAL = "room-1@resource.calendar.google.com"
OTHER = "room-2@resource.calendar.google.com"
TOKENS = ["fcm-token-aaaaaaaaaaaaaaaa-1111", "fcm-token-bbbbbbbbbbbbbbbb-2222"]


@dataclass
class Env:
    clock: ManualClock
    emu: Emulator
    store: SqliteStore
    db_path: str
    key_file: str
    published: list[Notification] = field(default_factory=list)
    syncers: list[Syncer] = field(default_factory=list)
    gateways: list[GoogleCalendar] = field(default_factory=list)
    stores: list[SqliteStore] = field(default_factory=list)
    numbers: int = 0
    releases: list[asyncio.Event] = field(default_factory=list)

    @property
    def google(self):
        return self.emu.google

    def gateway(self) -> GoogleCalendar:
        gateway = GoogleCalendar(self.key_file, None, self.emu.calendar_endpoint, 5.0, 2)
        self.gateways.append(gateway)
        return gateway

    def syncer(
        self,
        config: dict[str, Any] | None = None,
        *,
        credentials: bool = True,
        on_published: Callable[[Notification], None] | None = None,
        **options: Any,
    ) -> Syncer:
        syncer = Syncer(
            self.store.notifications,
            self.store.rooms,
            self.store.channels,
            self.gateway() if credentials else None,
            self.clock,
            Config.model_validate(config or {}),
            on_published or self.published.append,
            **options,
        )
        self.syncers.append(syncer)
        return syncer

    async def prime(self, calendar_id: str = CAL) -> None:
        """The first sync token, from a full list, as the channel lifecycle takes it."""
        listing = await self.gateway().list_events(calendar_id, None)
        await self.store.channels.set_sync_token(calendar_id, listing.next_sync_token)
        self.google.calls.clear()

    async def webhook(self, calendar_id: str = CAL) -> Notification:
        """What the webhook handler stores for an `exists` message."""
        self.numbers += 1
        return await self.store.notifications.add(
            calendar_id,
            "webhook",
            "exists",
            self.clock.now(),
            channel_id="chan-1",
            message_number=self.numbers,
        )

    async def restart(self) -> SqliteStore:
        await self.store.close()
        self.store = SqliteStore(self.db_path)
        self.stores.append(self.store)
        await self.store.open()
        return self.store

    def hold_list(self, calendar_id: str = CAL) -> tuple[asyncio.Event, asyncio.Event]:
        """Hold the calendar's next `list` at the emulator: returns (taken, release); `taken` is
        set when the call arrives, so a test acts while a sync is surely inside its list."""
        release = asyncio.Event()
        self.releases.append(release)
        failure = self.google.inject("list", calendar_id=calendar_id, hold=release)
        return failure.taken, release

    def list_calls(self, calendar_id: str = CAL) -> int:
        return sum(1 for m, c, _ in self.google.calls if m == "list" and c == calendar_id)

    async def all_notifications(self) -> list[Notification]:
        return await self.store.notifications.list(
            include_unpublished=True, limit=500, with_deliveries=True
        )

    async def published_in_order(self) -> list[Notification]:
        return await self.store.notifications.list(limit=500, with_deliveries=True)


@pytest.fixture
def env(io_loop, tmp_path, clock, emulator, key_file, store):
    io_loop.run_sync(lambda: store.rooms.put(CAL, "Room 1", TOKENS, clock.now()))
    env = Env(clock, emulator, store, str(tmp_path / STORE_FILE), key_file)
    yield env
    for release in env.releases:
        release.set()  # a test that failed half-way leaves no call held
    for syncer in env.syncers:
        syncer.close()
    for gateway in env.gateways:
        gateway.close()
    io_loop.run_sync(env.google.drain)
    for opened in env.stores:  # those a restart opened (the fixture closes the first)
        io_loop.run_sync(opened.close)


def expected(resource: dict[str, Any]) -> dict[str, Any]:
    """The change the contract asks for, from the emulator's own view of the event."""
    return {
        "event_id": resource["id"],
        "status": resource["status"],
        "updated": resource.get("updated"),
        "start": resource.get("start"),
        "end": resource.get("end"),
        "summary": resource.get("summary"),
    }


def targets_of(notification: Notification) -> list[Target]:
    return sorted(
        (d.target for d in notification.deliveries), key=lambda t: (t.kind, t.token or "")
    )


# -- coalescing -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_a_burst_of_ten_is_at_most_two_syncs_and_one_publication(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="standup")
    listing, release = env.hold_list()  # the burst lands during the first sync
    syncer = env.syncer()
    stored = [await env.webhook()]
    syncer.kick(CAL)
    await listing.wait()
    for _ in range(9):
        stored.append(await env.webhook())
        syncer.kick(CAL)
    release.set()
    await syncer.drain(5)

    assert env.list_calls() <= 2
    notifications = await env.all_notifications()
    assert sorted(n.id for n in notifications) == sorted(n.id for n in stored)
    published = [n for n in notifications if n.state == "published"]
    skipped = [n for n in notifications if n.state == "skipped"]
    assert len(published) == 1 and len(skipped) == 9
    assert published[0].changes == (expected(event),)
    assert published[0].id == stored[0].id  # the only one stored when the first sync began
    assert all(n.seq is None and n.deliveries == () for n in skipped)
    assert env.published == [
        await env.store.notifications.get(published[0].id, with_deliveries=True)
    ]


@pytest.mark.gen_test(timeout=15)
async def test_the_next_sync_of_a_burst_starts_sync_spacing_after_the_first(env, monkeypatch):
    monkeypatch.setattr(sync_module, "SYNC_SPACING", 0.05)
    await env.prime()
    env.google.insert_event(CAL, summary="standup")
    syncer = env.syncer()
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    locked_sync = syncer._locked_sync

    async def timed(calendar_id: str, *, poll: bool) -> Notification | None:
        starts.append(loop.time())
        return await locked_sync(calendar_id, poll=poll)

    monkeypatch.setattr(syncer, "_locked_sync", timed)
    await env.webhook()
    syncer.kick(CAL)
    await env.webhook()
    syncer.kick(CAL)  # the first sync is under way: this one waits for the spacing
    await syncer.drain(5)
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.05


@pytest.mark.gen_test(timeout=15)
async def test_a_lone_notification_is_synced_at_once_whatever_the_spacing(env, monkeypatch):
    monkeypatch.setattr(sync_module, "SYNC_SPACING", 3600.0)  # a wait would outlast the test
    await env.prime()
    syncer = env.syncer()
    for summary in ("standup", "retro"):
        env.google.insert_event(CAL, summary=summary)
        await env.webhook()
        syncer.kick(CAL)
        await syncer.drain(5)
    assert [n.changes[0]["summary"] for n in await env.published_in_order()] == [
        "standup",
        "retro",
    ]


@pytest.mark.gen_test(timeout=15)
async def test_the_newest_of_a_batch_is_published_and_the_others_skipped(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="standup")
    first, second, third = [await env.webhook() for _ in range(3)]
    syncer = env.syncer()
    published = await syncer.sync_calendar(CAL)
    assert published is not None
    assert published.id == third.id
    assert published.seq == 1
    assert (published.changes, published.full_resync) == ((expected(event),), False)
    for older in (first, second):
        assert (await env.store.notifications.get(older.id)).state == "skipped"
    assert env.list_calls() == 1


@pytest.mark.gen_test(timeout=15)
async def test_syncs_of_different_calendars_do_not_wait_for_each_other(env):
    await env.store.rooms.put(OTHER, "Room 2", [], env.clock.now())
    await env.prime(CAL)
    await env.prime(OTHER)
    one = env.google.insert_event(CAL, summary="one")
    two = env.google.insert_event(OTHER, summary="two")
    listing, release = env.hold_list(CAL)
    other_published = asyncio.Event()

    def published(notification: Notification) -> None:
        env.published.append(notification)
        if notification.calendar_id == OTHER:
            other_published.set()

    syncer = env.syncer(on_published=published)
    await env.webhook(CAL)
    syncer.kick(CAL)
    await listing.wait()
    await env.webhook(OTHER)
    syncer.kick(OTHER)
    await asyncio.wait_for(other_published.wait(), 5)  # CAL's list is still held meanwhile
    assert env.google.max_in_flight == 2  # OTHER's list ran while CAL's was held up
    release.set()
    await syncer.drain(5)
    by_calendar = {n.calendar_id: n.changes for n in await env.published_in_order()}
    assert by_calendar == {CAL: (expected(one),), OTHER: (expected(two),)}


@pytest.mark.gen_test(timeout=15)
async def test_a_second_sync_of_a_calendar_waits_for_the_one_under_way(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="once")
    listing, release = env.hold_list()
    syncer = env.syncer()
    first = await env.webhook()
    running = asyncio.ensure_future(syncer.sync_calendar(CAL))
    await listing.wait()
    second = await env.webhook()
    # Run alongside, it would take both notifications, list from the same token and publish
    # the change a second time. Started while the first is held, it waits for it (it runs
    # before the release lets the first go on: tasks run in the order they were scheduled).
    again = asyncio.ensure_future(syncer.sync_calendar(CAL))
    release.set()
    assert await again is None
    published = await running
    assert published is not None and published.id == first.id
    assert published.changes == (expected(event),)
    assert (await env.store.notifications.get(second.id)).state == "skipped"
    assert [n.id for n in await env.published_in_order()] == [first.id]


# -- what a sync finds ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_an_expired_sync_token_publishes_a_full_resync_without_changes(env):
    await env.prime()
    env.google.insert_event(CAL, summary="lost in the gap")
    env.google.expire_sync_tokens(CAL)
    old_token = await env.store.channels.get_sync_token(CAL)
    notification = await env.webhook()
    published = await env.syncer().sync_calendar(CAL)
    assert published is not None and published.id == notification.id
    assert (published.full_resync, published.changes) == (True, ())
    assert [m for m, c, _ in env.google.calls] == ["list", "list"]  # 410, then the full list
    assert [s for _, _, s in env.google.calls] == [410, 200]
    new_token = await env.store.channels.get_sync_token(CAL)
    assert new_token and new_token != old_token

    # The new token works incrementally again.
    later = env.google.insert_event(CAL, summary="after the resync")
    await env.webhook()
    again = await env.syncers[0].sync_calendar(CAL)
    assert again is not None
    assert (again.full_resync, again.changes) == (False, (expected(later),))


@pytest.mark.gen_test(timeout=15)
async def test_a_full_resync_asks_google_for_its_tokens_only(env, list_pages):
    # Its events would be dropped anyway: a full resync publishes no changes.
    await env.prime()
    env.google.insert_event(CAL, summary="lost in the gap")
    env.google.expire_sync_tokens(CAL)
    list_pages.clear()
    await env.webhook()
    published = await env.syncer().sync_calendar(CAL)
    assert published is not None and published.full_resync
    (_, expired), (uri, full) = list_pages
    assert "error" in expired
    assert "fields=nextPageToken%2CnextSyncToken" in uri
    assert list(full) == ["nextSyncToken"]
    assert await env.store.channels.get_sync_token(CAL) == full["nextSyncToken"]


@pytest.mark.gen_test(timeout=15)
async def test_no_sync_token_at_all_is_a_full_resync(env):
    env.google.insert_event(CAL, summary="existing")
    await env.webhook()
    published = await env.syncer().sync_calendar(CAL)
    assert published is not None
    assert (published.full_resync, published.changes) == (True, ())
    assert await env.store.channels.get_sync_token(CAL)


@pytest.mark.gen_test(timeout=15)
async def test_every_page_goes_into_one_notification(env):
    await env.prime()
    env.google.page_size = 3
    events = [env.google.insert_event(CAL, summary=f"meeting {n}") for n in range(7)]
    await env.webhook()
    published = await env.syncer().sync_calendar(CAL)
    assert published is not None
    assert list(published.changes) == [expected(e) for e in events]
    assert env.list_calls() == 3
    assert len(await env.all_notifications()) == 1


@pytest.mark.gen_test(timeout=15)
async def test_a_sync_that_finds_nothing_skips_and_never_publishes(env):
    await env.prime()
    old_token = await env.store.channels.get_sync_token(CAL)
    notification = await env.webhook()
    syncer = env.syncer()
    assert await syncer.sync_calendar(CAL) is None
    stored = await env.store.notifications.get(notification.id, with_deliveries=True)
    assert (stored.state, stored.seq, stored.deliveries) == ("skipped", None, ())
    assert await env.published_in_order() == []
    assert await env.store.notifications.last_seq() == 0
    assert env.published == []
    assert (
        await env.store.channels.get_sync_token(CAL) != old_token
    )  # Google's newest token is kept


@pytest.mark.gen_test(timeout=15)
async def test_cancelled_events_come_as_cancelled_with_null_fields(env):
    await env.prime()
    doomed = env.google.insert_event(CAL, summary="doomed")
    await env.webhook()
    syncer = env.syncer()
    await syncer.sync_calendar(CAL)
    env.clock.advance(60)
    env.google.cancel_event(CAL, doomed["id"])
    await env.webhook()
    published = await syncer.sync_calendar(CAL)
    assert published is not None
    assert published.changes == (
        {
            "event_id": doomed["id"],
            "status": "cancelled",
            "updated": None,
            "start": None,
            "end": None,
            "summary": None,
        },
    )


@pytest.mark.gen_test(timeout=30)
async def test_every_change_is_published_exactly_once_over_a_sequence_of_edits(env):
    """Each step edits, then notifies the way Google would (one or more messages, or the poll,
    or nothing), then waits. The published changes, in seq order, must be exactly the edits:
    per step, each edited event once, in its last state, in the order of its last edit."""
    await env.prime()
    google, clock = env.google, env.clock
    syncer = env.syncer()
    live: list[str] = []
    want: list[dict[str, Any]] = []
    steps = [
        ("insert", "insert"),
        ("update",),
        ("insert", "update", "cancel"),
        (),
        ("update", "update"),
        ("insert", "insert", "insert", "cancel"),
        ("update", "cancel", "insert"),
    ]
    for number, edits in enumerate(steps):
        step: dict[str, dict[str, Any]] = {}
        for edit in edits:
            clock.advance(30)
            if edit == "insert":
                resource = google.insert_event(CAL, summary=f"step {number} new")
                live.append(resource["id"])
            elif edit == "update":
                resource = google.update_event(CAL, live[0], summary=f"step {number} moved")
            else:
                resource = google.cancel_event(CAL, live.pop())
            step.pop(resource["id"], None)
            step[resource["id"]] = expected(resource)
        want.extend(step.values())
        if number % 3 == 2:
            await syncer.poll_all()  # no webhook for this step: the poll finds it
        else:
            for _ in range(1 + number % 2):  # Google may tell twice
                await env.webhook()
                syncer.kick(CAL)
            await syncer.drain(5)

    published = await env.published_in_order()
    got = [change for n in published for change in n.changes]
    assert got == want
    assert [n.seq for n in published] == list(range(1, len(published) + 1))
    assert [n.id for n in env.published] == [n.id for n in published]
    assert {n.source for n in published} == {"webhook", "poll"}
    assert not [n for n in await env.all_notifications() if n.state == "received"]


# -- the safety-net poll ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_the_poll_publishes_what_it_finds_with_source_poll(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="missed by push")
    syncer = env.syncer()
    assert await syncer.poll_all() == 1
    (notification,) = await env.all_notifications()
    assert notification.state == "published"
    assert (notification.source, notification.resource_state) == ("poll", "exists")
    assert (notification.channel_id, notification.message_number) == (None, None)
    assert notification.changes == (expected(event),)
    assert [n.id for n in env.published] == [notification.id]


@pytest.mark.gen_test(timeout=15)
async def test_a_poll_that_finds_nothing_stores_nothing(env):
    await env.prime()
    assert await env.syncer().poll_all() == 0
    assert await env.all_notifications() == []
    assert env.list_calls() == 1


@pytest.mark.gen_test(timeout=15)
async def test_the_poll_and_a_webhook_sync_publish_a_change_once(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="seen by both")
    listing, release = env.hold_list()
    syncer = env.syncer()
    await env.webhook()
    syncer.kick(CAL)
    await listing.wait()  # the webhook's sync is inside its list
    both = asyncio.gather(syncer.poll_all(), syncer.sync_calendar(CAL))
    release.set()
    await both
    await syncer.drain(5)
    published = await env.published_in_order()
    assert [n.changes for n in published] == [(expected(event),)]
    assert not [n for n in await env.all_notifications() if n.state == "received"]


@pytest.mark.gen_test(timeout=15)
async def test_the_poll_leaves_out_a_calendar_that_is_syncing(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="x")
    listing, release = env.hold_list()
    syncer = env.syncer()
    await env.webhook()
    syncer.kick(CAL)
    await listing.wait()
    assert await syncer.poll_all() == 0
    assert env.list_calls() == 0  # the poll made none; the webhook sync's is still running
    release.set()
    await syncer.drain(5)
    assert env.list_calls() == 1
    assert [n.changes for n in await env.published_in_order()] == [(expected(event),)]


@pytest.mark.gen_test(timeout=15)
async def test_the_poll_takes_received_notifications_of_a_calendar_it_syncs(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="webhook not synced yet")
    waiting = await env.webhook()  # stored, never kicked (as after a crash)
    assert await env.syncer().poll_all() == 1
    (notification,) = await env.all_notifications()
    assert (notification.id, notification.source) == (waiting.id, "webhook")
    assert notification.changes == (expected(event),)


# -- Google failing ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_a_transient_failure_keeps_notifications_and_retries_with_backoff(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="during the outage")
    env.google.inject("list", status=503, calendar_id=CAL)
    syncer = env.syncer()
    notification = await env.webhook()
    syncer.kick(CAL)
    await syncer.drain(5)  # returns once the calendar is parked in its backoff
    assert (await env.store.notifications.get(notification.id)).state == "received"
    assert env.clock.sleepers == 1
    assert env.published == []
    token = await env.store.channels.get_sync_token(CAL)

    # A kick during the backoff waits for it rather than hammering Google.
    second = await env.webhook()
    syncer.kick(CAL)
    await syncer.drain(5)
    assert env.list_calls() == 1

    env.clock.advance(sync_module.RETRY_CAP + 1)
    await syncer.drain(5)
    published = await env.published_in_order()
    assert [(n.id, n.changes) for n in published] == [(second.id, (expected(event),))]
    assert (await env.store.notifications.get(notification.id)).state == "skipped"
    assert await env.store.channels.get_sync_token(CAL) != token
    assert env.list_calls() == 2


@pytest.mark.gen_test(timeout=15)
async def test_a_direct_sync_that_fails_schedules_the_retry(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="x")
    env.google.inject("list", status=500, reason="backendError", calendar_id=CAL)
    syncer = env.syncer()
    await env.webhook()
    assert await syncer.sync_calendar(CAL) is None
    await syncer.drain(5)
    assert env.clock.sleepers == 1
    env.clock.advance(sync_module.RETRY_CAP + 1)
    await syncer.drain(5)
    assert [n.changes for n in await env.published_in_order()] == [(expected(event),)]


@pytest.mark.gen_test(timeout=15)
async def test_a_permanent_failure_skips_the_batch_with_a_warning(env, caplog):
    await env.prime()
    env.google.insert_event(CAL, summary="x")
    env.google.inject("list", status=404, reason="notFound", calendar_id=CAL)
    token = await env.store.channels.get_sync_token(CAL)
    syncer = env.syncer()
    notification = await env.webhook()
    with caplog.at_level(logging.WARNING, logger="daemon.sync"):
        syncer.kick(CAL)
        await syncer.drain(5)
    assert (await env.store.notifications.get(notification.id)).state == "skipped"
    assert env.clock.sleepers == 0  # no retry
    assert await env.store.channels.get_sync_token(CAL) == token
    (record,) = [r for r in caplog.records if r.getMessage() == "sync_refused"]
    assert (record.levelno, record.calendar_id, record.status) == (logging.WARNING, CAL, 404)


@pytest.mark.gen_test(timeout=15)
async def test_no_google_credentials_leave_notifications_received(env):
    await env.prime()
    notification = await env.webhook()
    assert await env.syncer(credentials=False).sync_calendar(CAL) is None
    assert (await env.store.notifications.get(notification.id)).state == "received"


# -- restarts ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_resume_after_a_restart_publishes_what_was_received(env):
    await env.prime()
    await env.store.rooms.put(OTHER, "Room 2", [], env.clock.now())
    await env.prime(OTHER)
    one = env.google.insert_event(CAL, summary="before the crash")
    two = env.google.insert_event(OTHER, summary="also before")
    # Stored by the webhook, then the process died before syncing.
    await env.webhook(CAL)
    await env.webhook(CAL)
    await env.webhook(OTHER)
    env.syncer().close()

    await env.restart()
    syncer = env.syncer()
    await syncer.resume()
    await syncer.drain(5)
    published = await env.published_in_order()
    assert {n.calendar_id: n.changes for n in published} == {
        CAL: (expected(one),),
        OTHER: (expected(two),),
    }
    assert not [n for n in await env.all_notifications() if n.state == "received"]


@pytest.mark.gen_test(timeout=15)
async def test_a_restart_during_an_outage_loses_nothing(env):
    await env.prime()
    event = env.google.insert_event(CAL, summary="during the outage")
    env.google.inject("list", status=503, calendar_id=CAL)
    first = env.syncer()
    await env.webhook()
    first.kick(CAL)
    await first.drain(5)
    first.close()

    await env.restart()
    second = env.syncer()
    await second.resume()
    await second.drain(5)
    assert [n.changes for n in await env.published_in_order()] == [(expected(event),)]


@pytest.mark.gen_test(timeout=15)
async def test_a_stop_during_a_publication_lets_it_store_its_sync_token(env):
    """A clean stop cancels the syncs under way; one that is publishing must still store its
    sync token, or the next run publishes the same changes again (contract 8: nothing sent
    twice by a clean stop)."""
    await env.prime()
    event = env.google.insert_event(CAL, summary="published while stopping")
    await env.webhook()
    await env.webhook()  # a batch of two: one is published, the other skipped
    store = env.store
    publishing, release = asyncio.Event(), asyncio.Event()
    token_stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    publish, set_sync_token = store.notifications.publish, store.channels.set_sync_token

    async def slow_publish(*args: Any, **kwargs: Any) -> Notification:
        published = await publish(*args, **kwargs)  # committed: the seq and deliveries exist
        publishing.set()
        await release.wait()  # the answer is on its way back when the stop comes
        return published

    async def spy_set_sync_token(calendar_id: str, token: str | None) -> None:
        await set_sync_token(calendar_id, token)
        if not token_stored.done():
            token_stored.set_result(None)

    store.notifications.publish = slow_publish  # type: ignore[method-assign]
    store.channels.set_sync_token = spy_set_sync_token  # type: ignore[method-assign]
    syncer = env.syncer()
    syncer.kick(CAL)
    await asyncio.wait_for(publishing.wait(), 5)
    syncer.close()
    release.set()
    await asyncio.wait_for(token_stored, 5)
    await syncer.committed()

    await env.restart()
    second = env.syncer()
    await second.resume()
    await second.drain(5)
    assert [n.changes for n in await env.published_in_order()] == [(expected(event),)]


# -- rooms, targets, listeners ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_a_notification_of_a_deleted_room_is_skipped_without_listing(env):
    await env.prime()
    env.google.insert_event(CAL, summary="x")
    notification = await env.webhook()
    await env.store.rooms.delete(CAL)
    syncer = env.syncer()
    syncer.kick(CAL)
    await syncer.drain(5)
    assert (await env.store.notifications.get(notification.id)).state == "skipped"
    assert env.list_calls() == 0
    assert env.published == []


@pytest.mark.gen_test(timeout=15)
async def test_the_publication_targets_the_tokens_the_room_has_once_the_list_is_in(env):
    await env.prime()
    env.google.insert_event(CAL, summary="x")
    listing, release = env.hold_list()
    syncer = env.syncer()
    await env.webhook()
    running = asyncio.ensure_future(syncer.sync_calendar(CAL))
    await listing.wait()
    later = "fcm-token-cccccccccccccccc-3333"
    await env.store.rooms.put(CAL, None, [TOKENS[1], later], env.clock.now())
    release.set()
    published = await running
    assert published is not None
    assert targets_of(published) == [Target("fcm", t) for t in sorted([TOKENS[1], later])]


@pytest.mark.parametrize("changed", [True, False])
@pytest.mark.gen_test(timeout=15)
async def test_a_room_deleted_during_the_list_gets_no_publication_and_no_sync_token(env, changed):
    await env.prime()
    if changed:
        env.google.insert_event(CAL, summary="x")
    listing, release = env.hold_list()
    syncer = env.syncer()
    notifications = [await env.webhook() for _ in range(3)]
    running = asyncio.ensure_future(syncer.sync_calendar(CAL))
    await listing.wait()
    await env.store.rooms.delete(CAL)  # forgets the sync token too
    release.set()
    assert await running is None
    assert env.published == [] and await env.published_in_order() == []
    states = [(await env.store.notifications.get(n.id)).state for n in notifications]
    assert states == ["skipped"] * 3
    assert await env.store.channels.get_sync_token(CAL) is None


class Counting:
    """A repository whose coroutine methods count their calls, by name."""

    def __init__(self, inner: Any, calls: dict[str, int], prefix: str) -> None:
        self._inner, self._calls, self._prefix = inner, calls, prefix

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            key = f"{self._prefix}.{name}"
            self._calls[key] = self._calls.get(key, 0) + 1
            return await method(*args, **kwargs)

        return counted


@pytest.mark.gen_test(timeout=15)
async def test_a_sync_of_fifty_notifications_costs_six_store_calls(env):
    # received, the sync token, the room (once), publish, the new sync token, one skip for
    # the 49 others: the room travels once and the skips do not grow with the batch.
    await env.prime()
    env.google.insert_event(CAL, summary="x")
    batch = [await env.webhook() for _ in range(50)]
    calls: dict[str, int] = {}
    syncer = Syncer(
        Counting(env.store.notifications, calls, "notifications"),
        Counting(env.store.rooms, calls, "rooms"),
        Counting(env.store.channels, calls, "channels"),
        env.gateway(),
        env.clock,
        Config(),
        env.published.append,
    )
    env.syncers.append(syncer)
    published = await syncer.sync_calendar(CAL)
    assert published is not None and published.id == batch[-1].id
    assert calls == {
        "notifications.received": 1,
        "channels.get_sync_token": 1,
        "rooms.get": 1,
        "notifications.publish": 1,
        "channels.set_sync_token": 1,
        "notifications.skip": 1,
    }
    assert sum(calls.values()) == 6
    states = [(await env.store.notifications.get(n.id)).state for n in batch[:-1]]
    assert states == ["skipped"] * 49


@pytest.mark.parametrize(
    ("backend", "with_backend"),
    [
        ({}, False),
        ({"notify": True}, False),  # nowhere to send it
        ({"url": "http://127.0.0.1:1/graphql", "notify": False}, False),  # told not to
        ({"url": "http://127.0.0.1:1/graphql"}, True),  # notify is on by default
        ({"notify": True, "url": "http://127.0.0.1:1/graphql"}, True),
    ],
)
@pytest.mark.gen_test(timeout=15)
async def test_targets_are_the_room_tokens_plus_the_backend_when_notify_and_url(
    env, caplog, backend, with_backend
):
    await env.prime()
    env.google.insert_event(CAL, summary="x")
    await env.webhook()
    with caplog.at_level(logging.DEBUG, logger="daemon.sync"):
        published = await env.syncer({"backend": backend}).sync_calendar(CAL)
    assert published is not None
    want = [Target("fcm", token) for token in sorted(TOKENS)]
    if with_backend:
        want.insert(0, Target("backend"))
    assert targets_of(published) == want
    assert all(d.state == "pending" for d in published.deliveries)
    # Logs name ids, never tokens.
    text = " ".join(str(vars(r)) for r in caplog.records)
    assert "published" in text
    assert not any(token in text for token in TOKENS)


@pytest.mark.gen_test(timeout=15)
async def test_without_fcm_no_fcm_deliveries_are_made(env):
    """A WebSocket-only site: the notification is published, the outbox holds no FCM work."""
    await env.prime()
    env.google.insert_event(CAL, summary="x")
    await env.webhook()
    backend = {"notify": True, "url": "http://127.0.0.1:1/graphql"}
    published = await env.syncer({"backend": backend}, fcm=False).sync_calendar(CAL)
    assert published is not None and published.seq == 1
    assert targets_of(published) == [Target("backend")]
    env.google.insert_event(CAL, summary="y")
    await env.webhook()
    published = await env.syncer(fcm=False).sync_calendar(CAL)
    assert published is not None and published.deliveries == ()
    assert await env.store.outbox.count() == 1


@pytest.mark.gen_test(timeout=15)
async def test_on_published_is_called_once_per_publication_and_cannot_break_a_sync(env):
    await env.prime()
    calls: list[int] = []

    def listener(notification: Notification) -> None:
        calls.append(notification.id)
        raise RuntimeError("listener bug")

    syncer = env.syncer(on_published=listener)
    env.google.insert_event(CAL, summary="a")
    await env.webhook()
    await env.webhook()
    first = await syncer.sync_calendar(CAL)
    await env.webhook()  # nothing new: no call
    assert await syncer.sync_calendar(CAL) is None
    env.google.insert_event(CAL, summary="b")
    await env.webhook()
    second = await syncer.sync_calendar(CAL)
    assert first is not None and second is not None
    assert calls == [first.id, second.id]
    assert not [n for n in await env.all_notifications() if n.state == "received"]


@pytest.mark.gen_test(timeout=15)
async def test_close_stops_new_work(env):
    await env.prime()
    notification = await env.webhook()
    syncer = env.syncer()
    syncer.close()
    syncer.kick(CAL)
    await syncer.drain(1)
    assert env.list_calls() == 0
    assert (await env.store.notifications.get(notification.id)).state == "received"
