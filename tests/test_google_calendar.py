"""The Google Calendar gateway over real HTTP: the real Google client libraries, the emulator."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import googleapiclient.discovery
import pytest
import tornado.testing
import tornado.web

from daemon.clock import ManualClock
from daemon.emulator.app import Emulator
from daemon.emulator.keys import write_service_account
from daemon.google_calendar import (
    EventList,
    GoogleCalendar,
    GoogleTimeout,
    PermanentGoogleError,
    SyncTokenExpired,
    TransientGoogleError,
    WatchResult,
)
from tests.fixtures import CalendarCallsHeld, list_pages, service_account  # noqa: F401

CAL = "room-1@resource.calendar.google.com"
SCOPE = "https://www.googleapis.com/auth/calendar.readonly"


class Hook(tornado.web.RequestHandler):
    def initialize(self, seen: list[dict[str, str]]) -> None:
        self.seen = seen

    def post(self) -> None:
        self.seen.append(dict(self.request.headers))


@dataclass
class Env:
    emu: Emulator
    clock: ManualClock
    key_file: str
    address: str
    hooks: list[dict[str, str]]
    gateways: list[GoogleCalendar]

    def gateway(
        self,
        request_timeout: float = 5.0,
        max_concurrency: int = 2,
        subject: str | None = None,
        key_file: str | None = None,
        page_size: int = 250,
    ) -> GoogleCalendar:
        gateway = GoogleCalendar(
            key_file or self.key_file,
            subject,
            self.emu.calendar_endpoint,
            request_timeout,
            max_concurrency,
            page_size=page_size,
        )
        self.gateways.append(gateway)
        return gateway


@pytest.fixture
def env(io_loop, tmp_path):
    clock = ManualClock()
    emu = Emulator(clock)
    emu.start()
    key_file = str(tmp_path / "key.json")
    info = dict(service_account(), token_uri=emu.token_url)
    (tmp_path / "key.json").write_text(json.dumps(info))
    emu.oauth.register(info)
    hooks: list[dict[str, str]] = []
    receiver = tornado.web.Application([(r"/notifications", Hook, {"seen": hooks})])
    server = receiver.listen(0, "127.0.0.1")
    port = next(iter(server._sockets.values())).getsockname()[1]
    env = Env(emu, clock, key_file, f"http://127.0.0.1:{port}/notifications", hooks, [])
    yield env
    for gateway in env.gateways:
        gateway.close()
    server.stop()
    emu.stop()


@pytest.mark.gen_test(timeout=10)
async def test_check_obtains_one_token_with_the_calendar_scope(env):
    gateway = env.gateway()
    await gateway.check()
    await gateway.check()
    assert env.emu.oauth.tokens_issued == 1
    await gateway.list_events(CAL, None)
    assert env.emu.oauth.tokens_issued == 1  # the token is reused, not fetched per call
    (grant,) = env.emu.oauth._tokens.values()
    assert grant.scopes == {SCOPE}
    assert grant.subject is None


@pytest.mark.gen_test(timeout=10)
async def test_subject_is_sent_and_delegation_can_be_refused(env, tmp_path):
    await env.gateway(subject="admin@example.com").check()
    (grant,) = env.emu.oauth._tokens.values()
    assert grant.subject == "admin@example.com"

    other = str(tmp_path / "undelegated.json")
    info = write_service_account(
        other,
        token_uri=env.emu.token_url,
        client_email="nodwd@p.iam.gserviceaccount.com",
        project_id="p",
    )
    env.emu.oauth.register(info, allow_subject=False)
    with pytest.raises(PermanentGoogleError) as caught:
        await env.gateway(subject="admin@example.com", key_file=other).check()
    assert caught.value.reason == "unauthorized_client"


@pytest.mark.gen_test(timeout=10)
async def test_unregistered_key_is_invalid_grant(env, tmp_path):
    stranger = str(tmp_path / "stranger.json")
    write_service_account(
        stranger,
        token_uri=env.emu.token_url,
        client_email="x@p.iam.gserviceaccount.com",
        project_id="p",
    )
    with pytest.raises(PermanentGoogleError) as caught:
        await env.gateway(key_file=stranger).check()
    assert caught.value.reason == "invalid_grant"
    assert env.emu.oauth.tokens_issued == 0


@pytest.mark.gen_test(timeout=10)
async def test_expired_token_is_refreshed_on_401(env):
    gateway = env.gateway()
    await gateway.list_events(CAL, None)
    env.emu.oauth.expire_tokens()
    await gateway.list_events(CAL, None)
    assert env.emu.oauth.tokens_issued == 2


@pytest.mark.gen_test(timeout=10)
async def test_watch_sync_stop_round_trip(env):
    gateway = env.gateway()
    result = await gateway.watch(CAL, "chan-1", "secret-token", env.address, 3600)
    calendar = env.emu.google.calendar(CAL)
    assert result == WatchResult(
        resource_id=calendar.resource_id, expiration=env.clock.now() + 3600
    )
    # The sync message came before the watch answered (the emulator's default).
    assert [h["X-Goog-Resource-State"] for h in env.hooks] == ["sync"]
    assert env.hooks[0]["X-Goog-Channel-Token"] == "secret-token"

    await gateway.stop("chan-1", result.resource_id)
    assert env.emu.google.channels()[0]["state"] == "stopped"
    with pytest.raises(PermanentGoogleError) as caught:
        await gateway.stop("chan-1", "wrong-resource")
    assert (caught.value.status, caught.value.reason) == (404, "notFound")


@pytest.mark.gen_test(timeout=10)
async def test_ttl_is_capped_and_channel_ids_must_be_unique(env):
    gateway = env.gateway()
    result = await gateway.watch(CAL, "chan-1", None, env.address, 10**8)
    assert result.expiration == env.clock.now() + 604800
    assert "X-Goog-Channel-Token" not in env.hooks[0]
    with pytest.raises(PermanentGoogleError) as caught:
        await gateway.watch(CAL, "chan-1", None, env.address, 3600)
    assert (caught.value.status, caught.value.reason) == (400, "channelIdNotUnique")


@pytest.mark.gen_test(timeout=10)
async def test_unknown_calendar_is_permanent_404(env):
    env.emu.google.auto_create = False
    with pytest.raises(PermanentGoogleError) as caught:
        await env.gateway().watch("nobody@example.com", "chan-1", None, env.address, 3600)
    assert (caught.value.status, caught.value.reason) == (404, "notFound")


@pytest.mark.gen_test(timeout=10)
async def test_list_follows_every_page(env):
    for n in range(7):
        env.emu.google.insert_event(CAL, summary=f"meeting {n}")
    gateway = env.gateway(page_size=3)
    listed = await gateway.list_events(CAL, None)
    assert [e["summary"] for e in listed.items] == [f"meeting {n}" for n in range(7)]
    assert listed.next_sync_token
    assert [c[0] for c in env.emu.google.calls] == ["list"] * 3
    await env.emu.google.drain()


@pytest.mark.gen_test(timeout=10)
async def test_full_sync_token_reads_every_page_without_the_events(env, list_pages):
    google = env.emu.google
    for n in range(7):
        google.insert_event(CAL, summary=f"meeting {n}")
    gateway = env.gateway(page_size=3)
    token = await gateway.full_sync_token(CAL)
    assert [c[0] for c in google.calls] == ["list"] * 3
    assert all("fields=nextPageToken%2CnextSyncToken" in uri for uri, _ in list_pages)
    assert [list(page) for _, page in list_pages] == [["nextPageToken"]] * 2 + [["nextSyncToken"]]
    assert list_pages[-1][1]["nextSyncToken"] == token
    # The token is a full list's: the next sync brings only what changed after it.
    env.clock.advance(60)
    added = google.insert_event(CAL, summary="added")
    changes = await gateway.list_events(CAL, token)
    assert [e["id"] for e in changes.items] == [added["id"]]


@pytest.mark.gen_test(timeout=10)
async def test_collections_are_built_once_per_thread(env, monkeypatch):
    # service.events() builds a Resource and every method of it: a tenth of the CPU under load.
    built = []
    init = googleapiclient.discovery.Resource.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(googleapiclient.discovery.Resource, "__init__", counting)
    gateway = env.gateway(max_concurrency=1)
    await gateway.list_events(CAL, None)
    once = len(built)
    for n in range(3):
        await gateway.list_events(CAL, None)
        watched = await gateway.watch(CAL, f"chan-{n}", None, env.address, 3600)
        await gateway.stop(f"chan-{n}", watched.resource_id)
    assert len(built) == once
    await env.emu.google.drain()


@pytest.mark.gen_test(timeout=10)
async def test_incremental_sync_returns_only_changes_with_cancellations(env):
    google = env.emu.google
    kept = google.insert_event(CAL, summary="kept")
    moved = google.insert_event(CAL, summary="moved")
    gone = google.insert_event(CAL, summary="gone")
    gateway = env.gateway(page_size=2)
    full = await gateway.list_events(CAL, None)
    assert len(full.items) == 3

    env.clock.advance(60)
    google.update_event(CAL, moved["id"], summary="moved later")
    google.cancel_event(CAL, gone["id"])
    added = google.insert_event(CAL, summary="added")
    changes = await gateway.list_events(CAL, full.next_sync_token)
    by_id = {e["id"]: e for e in changes.items}
    assert set(by_id) == {moved["id"], gone["id"], added["id"]}
    assert kept["id"] not in by_id
    assert by_id[gone["id"]] == {
        "kind": "calendar#event",
        "etag": by_id[gone["id"]]["etag"],
        "id": gone["id"],
        "status": "cancelled",
    }
    assert by_id[moved["id"]]["summary"] == "moved later"
    assert by_id[moved["id"]]["updated"] == "2027-01-15T08:01:00.000Z"

    nothing = await gateway.list_events(CAL, changes.next_sync_token)
    assert nothing == EventList(items=[], next_sync_token=nothing.next_sync_token)
    again = await gateway.list_events(CAL, None)
    assert gone["id"] not in {e["id"] for e in again.items}  # a full list hides cancelled ones


@pytest.mark.gen_test(timeout=10)
async def test_expired_sync_token_is_410(env):
    gateway = env.gateway()
    listed = await gateway.list_events(CAL, None)
    env.emu.google.expire_sync_tokens(CAL)
    with pytest.raises(SyncTokenExpired) as caught:
        await gateway.list_events(CAL, listed.next_sync_token)
    assert (caught.value.status, caught.value.reason) == (410, "fullSyncRequired")
    with pytest.raises(SyncTokenExpired):
        await gateway.list_events(CAL, "never-issued")


@pytest.mark.parametrize(
    ("status", "reason", "kind"),
    [
        (500, "backendError", TransientGoogleError),
        (503, None, TransientGoogleError),
        (429, "rateLimitExceeded", TransientGoogleError),
        (403, "rateLimitExceeded", TransientGoogleError),
        (403, "userRateLimitExceeded", TransientGoogleError),
        (403, "forbidden", PermanentGoogleError),
        (404, "notFound", PermanentGoogleError),
        (400, "invalid", PermanentGoogleError),
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_errors_are_typed_and_not_retried_by_the_library(env, status, reason, kind):
    gateway = env.gateway()
    env.emu.google.inject("list", status=status, reason=reason, calendar_id=CAL)
    with pytest.raises(kind) as caught:
        await gateway.list_events(CAL, None)
    assert caught.value.status == status
    assert caught.value.reason == (reason or "backendError")
    assert type(caught.value) is kind
    assert env.emu.google.calls == [("list", CAL, status)]  # num_retries=0: one attempt


@pytest.mark.gen_test(timeout=10)
async def test_watch_errors_are_typed_too(env):
    gateway = env.gateway()
    env.emu.google.inject("watch", status=403, reason="forbidden")
    with pytest.raises(PermanentGoogleError):
        await gateway.watch(CAL, "chan-1", None, env.address, 3600)
    env.emu.google.inject("stop", status=500)
    with pytest.raises(TransientGoogleError):
        await gateway.stop("chan-1", "whatever")
    assert env.hooks == []  # a refused watch makes no channel


# Real timeouts are the point of the next two tests: the gateway's own request_timeout. What
# keeps a call running or queued past it is held by the test (CalendarCallsHeld), not timed.


@pytest.mark.gen_test(timeout=10)
async def test_late_watch_is_exposed_through_the_timeout(env):
    gateway = env.gateway(request_timeout=0.4, max_concurrency=1)
    await gateway.check()  # the one thread has its service and token ready
    google = env.emu.google
    # The watch runs in the only thread but waits there, before its request, past the
    # caller's 0.4 s deadline; let go, it reaches Google and answers late.
    with CalendarCallsHeld(gateway) as held:
        watching = asyncio.ensure_future(gateway.watch(CAL, "chan-late", "tok", env.address, 3600))
        with pytest.raises(GoogleTimeout) as caught:
            await watching
        assert caught.value.late is not None
        held.release()
        late = await caught.value.late
    assert late == WatchResult(
        resource_id=google.calendar(CAL).resource_id, expiration=env.clock.now() + 3600
    )
    assert google.channels()[0]["id"] == "chan-late"


@pytest.mark.gen_test(timeout=10)
async def test_queued_call_that_times_out_never_runs(env):
    gateway = env.gateway(request_timeout=0.2, max_concurrency=1)
    await gateway.check()
    unanswered = asyncio.Event()  # Google takes the list and never answers it
    env.emu.google.inject("list", hold=unanswered)
    try:
        with CalendarCallsHeld(gateway) as held:  # the list keeps the only thread meanwhile
            slow = asyncio.ensure_future(gateway.list_events(CAL, None))
            queued_watch = asyncio.ensure_future(
                gateway.watch(CAL, "chan-never", None, env.address, 3600)
            )
            with pytest.raises(GoogleTimeout) as queued:
                await queued_watch
            with pytest.raises(GoogleTimeout) as running:
                await slow
            with pytest.raises(GoogleTimeout, match="before the call started"):
                await queued.value.late
            held.release()  # the list reaches Google, which holds it
            with pytest.raises(GoogleTimeout):  # its own socket timed out too: no answer at all
                await running.value.late
    finally:
        unanswered.set()
    assert env.emu.google.channels() == []


@pytest.mark.gen_test(timeout=10)
async def test_concurrency_is_bounded(env):
    gateway = env.gateway(max_concurrency=2)
    await gateway.check()
    release = asyncio.Event()
    held = [env.emu.google.inject("list", hold=release) for _ in range(6)]
    listing = asyncio.gather(*(gateway.list_events(f"cal-{n}", None) for n in range(6)))
    try:
        await held[0].taken.wait()
        await held[1].taken.wait()  # two lists at Google at once, held there
    finally:
        release.set()
    await listing
    assert env.emu.google.max_in_flight == 2


@pytest.mark.gen_test(timeout=10)
async def test_connection_refused_is_transient(env):
    sock, port = tornado.testing.bind_unused_port()
    sock.close()  # nothing listens there now
    gateway = GoogleCalendar(env.key_file, None, f"http://127.0.0.1:{port}/calendar/v3/", 2.0, 1)
    env.gateways.append(gateway)
    await gateway.check()  # the token comes from the emulator; the Calendar API is unreachable
    with pytest.raises(TransientGoogleError) as caught:
        await gateway.list_events(CAL, None)
    assert (caught.value.status, caught.value.reason) == (0, "connectionError")
