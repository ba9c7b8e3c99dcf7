"""The channel lifecycle against the Google emulator: make, retry, fail, renew, stop.

Time is the shared ManualClock; the only real timeouts are in the two late-watch tests
(`request_timeout` 1 s, the service's own deadline), where a real timeout is the point: the
watch waits in the gateway's thread until the test lets it go, so nothing hangs on a margin.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.fixtures import (  # noqa: F401
    CalendarCallsHeld,
    call,
    clock,
    emulator,
    list_pages,
    make_service,
    settle,
)

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
DAY = 86400


def google_channels(emulator, state: str | None = None) -> list[dict]:
    return [c for c in emulator.google.channels(ROOM) if state is None or c["state"] == state]


async def channel_state(service) -> dict:
    status, room = await call(service, "GET", PATH)
    assert status == 200
    return room["channel"]


@pytest.mark.gen_test(timeout=20)
async def test_the_first_channel_starts_with_a_full_list_then_watch(make_service, emulator, clock):
    emulator.google.insert_event(ROOM, summary="before the room existed")
    service = await make_service(clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", PATH, {})
    assert status == 201
    methods = [method for method, calendar, _ in emulator.google.calls if calendar == ROOM]
    assert methods[:2] == ["list", "watch"]
    assert await service.store.channels.get_sync_token(ROOM)
    # The first list pushes nothing.
    assert (
        await service.store.notifications.list(include_unpublished=True, with_deliveries=True) == []
    )


@pytest.mark.gen_test(timeout=20)
async def test_the_first_list_asks_google_for_its_tokens_only(
    make_service, emulator, clock, list_pages
):
    for n in range(3):
        emulator.google.insert_event(ROOM, summary=f"meeting {n}")
    service = await make_service(clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", PATH, {})
    assert status == 201
    uri, page = list_pages[0]
    assert "fields=nextPageToken%2CnextSyncToken" in uri
    assert list(page) == ["nextSyncToken"]  # the events stay at Google
    assert await service.store.channels.get_sync_token(ROOM) == page["nextSyncToken"]


@pytest.mark.gen_test(timeout=20)
async def test_a_name_or_token_change_keeps_the_channel(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    _, first = await call(service, "PUT", PATH, {"name": "A", "firebase_tokens": ["tok-1"]})
    status, second = await call(service, "PUT", PATH, {"name": "B", "firebase_tokens": ["tok-2"]})
    assert status == 200
    assert second["channel"]["id"] == first["channel"]["id"]
    assert second["name"] == "B"
    assert len(google_channels(emulator)) == 1


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    ("status", "reason"),
    [(500, "backendError"), (403, "rateLimitExceeded"), (503, None), (429, None)],
)
async def test_a_transient_failure_leaves_it_pending_then_the_retry_makes_it_active(
    make_service, emulator, clock, status, reason
):
    service = await make_service(clock=clock, emulator=emulator)
    emulator.google.inject("watch", status=status, reason=reason)
    code, room = await call(service, "PUT", PATH, {})
    assert code == 201
    channel = room["channel"]
    assert channel["state"] == "pending"
    assert str(status) in channel["last_error"]
    # Not due yet: nothing happens.
    assert await service.channels.retry_pending() == 0
    clock.advance(3600)
    assert await service.channels.retry_pending() == 1
    await settle(service, emulator)
    channel = await channel_state(service)
    assert channel["state"] == "active" and channel["confirmed"] and channel["last_error"] is None


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(("status", "reason"), [(404, "notFound"), (403, "forbidden")])
async def test_a_permanent_failure_makes_it_failed(make_service, emulator, clock, status, reason):
    service = await make_service(clock=clock, emulator=emulator)
    emulator.google.inject("watch", status=status, reason=reason)
    _, room = await call(service, "PUT", PATH, {})
    assert room["channel"]["state"] == "failed"
    assert reason in room["channel"]["last_error"]
    clock.advance(DAY)
    assert await service.channels.retry_pending() == 0
    # A PUT does not retry a failed channel; renew does.
    _, again = await call(service, "PUT", PATH, {})
    assert again["channel"]["id"] == room["channel"]["id"]
    status_code, summary = await call(service, "POST", "/v1/channels/renew")
    assert (status_code, summary) == (200, {"renewed": 1, "failed": []})
    await settle(service, emulator)
    assert (await channel_state(service))["state"] == "active"


@pytest.mark.gen_test(timeout=20)
async def test_retries_end_in_failed_after_max_retries(make_service, emulator, clock):
    service = await make_service({"google": {"max_retries": 2}}, clock=clock, emulator=emulator)
    emulator.google.inject("watch", status=503, count=10)
    await call(service, "PUT", PATH, {})
    for _ in range(2):
        clock.advance(DAY)
        await service.channels.retry_pending()
    channel = await channel_state(service)
    assert channel["state"] == "failed" and "503" in channel["last_error"]


@pytest.mark.gen_test(timeout=20)
async def test_a_failed_first_list_is_retried_before_the_watch(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    emulator.google.inject("list", status=500, reason="backendError")
    _, room = await call(service, "PUT", PATH, {})
    assert room["channel"]["state"] == "pending"
    assert not [m for m, _, _ in emulator.google.calls if m == "watch"]
    clock.advance(3600)
    await service.channels.retry_pending()
    await settle(service, emulator)
    assert (await channel_state(service))["state"] == "active"
    assert await service.store.channels.get_sync_token(ROOM)


async def put_with_a_late_watch(service):
    """PUT a room while its watch is held in the gateway's thread (CalendarCallsHeld): the
    PUT gives up after request_timeout, and so does the watch call itself; the watch then
    reaches Google when the test releases the hold, and its answer comes late."""
    await service.store.rooms.put(ROOM, None, None, service.clock.now())
    await service.store.channels.set_sync_token(ROOM, "first-sync-token")
    status, room = await call(service, "PUT", PATH, {})
    assert status == 200
    # Stored before the watch, answered as it stood when the PUT stopped waiting.
    assert room["channel"]["state"] == "pending"
    async with service.channels.calendar_lock(ROOM):
        pass  # the PUT's channel work is over: its watch call has given up waiting too
    return room


LATE = {"google": {"request_timeout": 1}}


@pytest.mark.gen_test(timeout=20)
async def test_a_late_watch_answer_is_recorded(make_service, emulator, clock):
    service = await make_service(LATE, clock=clock, emulator=emulator)
    with CalendarCallsHeld(service.google) as held:
        await put_with_a_late_watch(service)
        held.release()  # the watch reaches Google now, after every wait for it has ended
        await settle(service, emulator)
    channel = await channel_state(service)
    assert channel["state"] == "active" and channel["resource_id"]
    assert len(google_channels(emulator, "live")) == 1


@pytest.mark.gen_test(timeout=20)
async def test_a_late_watch_for_a_deleted_room_is_stopped(make_service, emulator, clock):
    service = await make_service(LATE, clock=clock, emulator=emulator)
    with CalendarCallsHeld(service.google) as held:
        await put_with_a_late_watch(service)
        status, _ = await call(service, "DELETE", PATH)
        assert status == 204
        held.release()  # the watch reaches Google after the room went
        await settle(service, emulator)
    await service.channels.process_stops()
    assert len(google_channels(emulator)) == 1
    assert google_channels(emulator, "live") == []
    assert await service.store.channels.list() == []
    assert await service.store.channels.list_stops() == []


@pytest.mark.gen_test(timeout=20)
async def test_delete_stops_the_channel_and_retries_while_google_fails(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": ["tok-1"]})
    await settle(service, emulator)
    emulator.google.inject("stop", status=500, reason="backendError")
    status, _ = await call(service, "DELETE", PATH)
    assert status == 204
    await settle(service, emulator)
    [stop] = await service.store.channels.list_stops()
    assert stop.attempts == 1 and "500" in (stop.last_error or "")
    assert len(google_channels(emulator, "live")) == 1
    assert (await call(service, "GET", PATH))[0] == 404
    assert await service.channels.process_stops() == 0  # not due yet
    clock.advance(3600)
    assert await service.channels.process_stops() == 1
    assert google_channels(emulator, "live") == []
    assert (await call(service, "DELETE", PATH))[0] == 404


@pytest.mark.gen_test(timeout=20)
async def test_a_stop_that_google_answers_404_counts_as_stopped(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {})
    await settle(service, emulator)
    emulator.google.inject("stop", status=404, reason="notFound")
    await call(service, "DELETE", PATH)
    await settle(service, emulator)
    assert await service.store.channels.list_stops() == []


@pytest.mark.gen_test(timeout=30)
async def test_renewal_overlaps_the_old_channel_until_the_new_one_is_confirmed(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    _, room = await call(service, "PUT", PATH, {})
    await settle(service, emulator)
    old_id = room["channel"]["id"]
    assert (await service.channels.renew_due()).renewed == 0  # a week left: nothing to do
    clock.advance(7 * DAY - DAY // 2)  # half a day before expiry, within renew_before
    emulator.google.sync_before_answer = False
    summary = await service.channels.renew_due()
    assert summary.renewed == 1
    channel = await channel_state(service)
    assert channel["id"] != old_id and channel["state"] == "active"
    await settle(service, emulator)
    await service.channels.process_stops()
    live = google_channels(emulator, "live")
    assert [c["id"] for c in live] == [channel["id"]]
    assert [c["id"] for c in google_channels(emulator, "stopped")] == [old_id]
    assert (await channel_state(service))["confirmed"] is True
    # The renewed channel is good for another week.
    assert (await service.channels.renew_due()).renewed == 0


@pytest.mark.gen_test(timeout=30)
async def test_renewal_while_google_fails_keeps_the_old_channel_live(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    _, room = await call(service, "PUT", PATH, {})
    await settle(service, emulator)
    old_id = room["channel"]["id"]
    clock.advance(7 * DAY - DAY // 2)
    emulator.google.inject("watch", status=500, reason="backendError")
    await service.channels.renew_due()
    await settle(service, emulator)
    await service.channels.process_stops()
    # The successor is pending; the old channel still listens (no gap).
    assert [c["id"] for c in google_channels(emulator, "live")] == [old_id]
    assert (await channel_state(service))["state"] == "pending"
    clock.advance(3600)
    await service.channels.retry_pending()
    await settle(service, emulator)
    await service.channels.process_stops()
    live = google_channels(emulator, "live")
    assert len(live) == 1 and live[0]["id"] != old_id


@pytest.mark.gen_test(timeout=30)
async def test_renew_now_route_and_one_calendar(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {})
    await call(service, "PUT", "/v1/rooms/other%40x", {})
    status, summary = await call(service, "POST", "/v1/channels/renew?calendar_id=" + quote(ROOM))
    assert (status, summary) == (200, {"renewed": 1, "failed": []})
    status, summary = await call(service, "POST", "/v1/channels/renew")
    assert (status, summary) == (200, {"renewed": 2, "failed": []})
    status, body = await call(service, "POST", "/v1/channels/renew?calendar_id=nobody%40x")
    assert status == 404 and body["error"]["code"] == "room_not_found"
    emulator.google.inject("watch", status=404, reason="notFound", calendar_id="other@x")
    _, summary = await call(service, "POST", "/v1/channels/renew")
    assert summary["renewed"] == 1
    assert summary["failed"][0]["calendar_id"] == "other@x"
    assert "notFound" in summary["failed"][0]["reason"]


@pytest.mark.gen_test(timeout=20)
async def test_without_google_credentials_channels_fail_and_readyz_says_so(make_service, clock):
    service = await make_service(clock=clock)
    _, room = await call(service, "PUT", PATH, {})
    assert room["channel"]["state"] == "failed"
    assert "service_account_file" in room["channel"]["last_error"]
    status, ready = await call(service, "GET", "/readyz", key=None)
    assert status == 503 and "not configured" in ready["checks"]["google"]


@pytest.mark.gen_test(timeout=20)
async def test_readyz_google_check_obtains_a_token(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    checks = await service.readiness()
    assert checks["google"] == "ok"


@pytest.mark.gen_test(timeout=20)
async def test_a_channel_in_flight_at_a_crash_is_retried_after_restart(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {})
    [channel] = await service.store.channels.list()
    # As if the process died while its watch was under way.
    await service.store.channels.update(
        channel.id, clock.now(), state="pending", resource_id="", next_attempt_at=None
    )
    await service.channels.recover_after_restart()
    assert await service.channels.retry_pending() == 1


@pytest.mark.gen_test(timeout=20)
async def test_without_public_url_channels_name_the_port_actually_bound(
    make_service, emulator, clock
):
    # server.port is 0 in the test config: the webhook address must carry the bound port.
    service = await make_service({"server": {"public_url": None}}, clock=clock, emulator=emulator)
    status, room = await call(service, "PUT", PATH, {})
    assert status == 201 and room["channel"]["state"] == "active"
    [channel] = google_channels(emulator)
    assert channel["address"] == f"http://127.0.0.1:{service.port}/notifications"
    await settle(service, emulator)
    assert emulator.google.webhooks[0].status == 200  # the sync reached the service
