"""The whole notification path over real HTTP: Google's webhook in, FCM out, the API's view."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from daemon.fcm_hold import PROBE_INTERVAL
from storage.base import Target
from tests.fixtures import call, clock, emulator, make_service  # noqa: F401

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
TABLET = "tablet-token-" + "a" * 40
OTHER_TABLET = "tablet-token-" + "b" * 40


@pytest.mark.gen_test(timeout=30)
async def test_an_event_change_reaches_every_tablet_once(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", PATH, {"firebase_tokens": [TABLET, OTHER_TABLET]})
    assert status == 201
    await emulator.google.drain()
    event = emulator.google.insert_event(ROOM, summary="Standup")
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await emulator.fcm.wait_for(OTHER_TABLET, 1, 10)
    [message] = emulator.fcm.messages(TABLET)
    data = message["message"]["data"]
    assert data["type"] == "calendar_changed" and data["calendar_id"] == ROOM
    assert json.loads(data["event_ids"]) == [event["id"]]
    assert data["full_resync"] == "0" and data["resource_state"] == "exists"
    assert data["seq"] == "1"
    android = message["message"]["android"]
    assert android["priority"] == "high" and android["collapse_key"] == ROOM
    await service.delivery.drain(5)
    status, page = await call(service, "GET", "/v1/notifications?calendar_id=" + quote(ROOM))
    assert status == 200
    [notification] = page["notifications"]
    assert notification["seq"] == 1 and notification["source"] == "webhook"
    assert notification["changes"][0]["event_id"] == event["id"]
    assert notification["changes"][0]["summary"] == "Standup"
    assert {d["state"] for d in notification["deliveries"]} == {"sent"}
    assert page["next_after"] == 1 and page["store_epoch"]
    _, text = await call(service, "GET", "/metrics")
    assert 'mrm_push_notifications_published_total{source="webhook"} 1.0' in text
    assert 'mrm_push_deliveries_total{outcome="sent"} 2.0' in text
    assert "mrm_push_fcm_mismatch_breaker_open 0.0" in text
    # A second change: seq 2, and each tablet has exactly two messages.
    emulator.google.cancel_event(ROOM, event["id"])
    await emulator.fcm.wait_for(TABLET, 2, 10)
    await emulator.fcm.wait_for(OTHER_TABLET, 2, 10)
    await emulator.google.drain()
    await service.syncer.drain(5)
    await service.delivery.drain(5)
    assert len(emulator.fcm.messages(TABLET)) == 2
    _, page = await call(service, "GET", "/v1/notifications?after=1")
    [second] = page["notifications"]
    assert second["seq"] == 2 and second["changes"][0]["status"] == "cancelled"


@pytest.mark.gen_test(timeout=30)
async def test_an_unregistered_tablet_leaves_the_room(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET, OTHER_TABLET]})
    await emulator.google.drain()
    emulator.fcm.set_state(OTHER_TABLET, "unregistered")
    emulator.google.insert_event(ROOM, summary="Review")
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await emulator.fcm.wait_for_attempts(OTHER_TABLET, 1, 10)
    await service.delivery.drain(5)
    _, room = await call(service, "GET", PATH + "?full=1")
    assert room["firebase_tokens"] == [TABLET]
    assert await service.store.rooms.tombstoned_tokens(ROOM, clock.now()) == {OTHER_TABLET}
    _, page = await call(service, "GET", "/v1/notifications")
    states = {d["token"]: d["state"] for d in page["notifications"][0]["deliveries"]}
    assert states == {TABLET[-8:]: "sent", OTHER_TABLET[-8:]: "failed"} or states == {
        OTHER_TABLET[-8:]: "failed",
        TABLET[-8:]: "sent",
    }


@pytest.mark.gen_test(timeout=30)
async def test_notifications_page_limits_and_unpublished(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET]})
    await emulator.google.drain()
    for number in range(3):
        emulator.google.insert_event(ROOM, summary=f"meeting {number}")
        await emulator.fcm.wait_for(TABLET, number + 1, 10)
    await service.syncer.drain(5)
    _, page = await call(service, "GET", "/v1/notifications?limit=2")
    assert [n["seq"] for n in page["notifications"]] == [1, 2] and page["next_after"] == 2
    _, page = await call(service, "GET", "/v1/notifications?after=2&limit=2")
    assert [n["seq"] for n in page["notifications"]] == [3] and page["next_after"] == 3
    _, page = await call(service, "GET", "/v1/notifications?after=3")
    assert page["notifications"] == [] and page["next_after"] == 3
    for bad in ("limit=0", "limit=501", "after=-1", "after=x", "calendar_id="):
        status, body = await call(service, "GET", "/v1/notifications?" + bad)
        assert status == 400 and body["error"]["status"] == 400, bad
    # A webhook whose sync finds nothing new is kept, unpublished, for operators only.
    [channel] = await service.store.channels.list(ROOM)
    headers = {
        "X-Goog-Channel-ID": channel.id,
        "X-Goog-Message-Number": str(channel.last_message_number + 1000),
        "X-Goog-Resource-ID": channel.resource_id,
        "X-Goog-Resource-State": "exists",
        "X-Goog-Channel-Token": channel.token,
    }
    assert (await call(service, "POST", "/notifications", key=None, headers=headers))[0] == 200
    await service.syncer.drain(5)
    _, page = await call(service, "GET", "/v1/notifications")
    assert len(page["notifications"]) == 3
    _, page = await call(service, "GET", "/v1/notifications?include_unpublished=1")
    assert [n["state"] for n in page["notifications"]][-1] == "skipped"
    assert page["notifications"][-1]["seq"] is None
    assert len(emulator.fcm.messages(TABLET)) == 3


@pytest.mark.gen_test(timeout=30)
async def test_readyz_with_the_emulator_is_ready(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    status, body = await call(service, "GET", "/readyz", key=None)
    assert (status, body["checks"]) == (200, {"storage": "ok", "google": "ok", "fcm": "ok"})


@pytest.mark.gen_test(timeout=30)
async def test_the_pyfcm_backend_delivers_too(make_service, emulator, clock):
    service = await make_service({"fcm": {"backend": "pyfcm"}}, clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET]})
    await emulator.google.drain()
    event = emulator.google.insert_event(ROOM, summary="Retro")
    await emulator.fcm.wait_for(TABLET, 1, 10)
    [message] = emulator.fcm.messages(TABLET)
    assert json.loads(message["message"]["data"]["event_ids"]) == [event["id"]]
    assert message["message"]["android"]["priority"] == "high"


@pytest.mark.gen_test(timeout=30)
async def test_retention_purges_old_notifications(make_service, emulator, clock):
    service = await make_service({"storage": {"retention_days": 2}}, clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET]})
    await emulator.google.drain()
    emulator.google.insert_event(ROOM, summary="old")
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await service.delivery.drain(5)
    assert "purge" in service.periodic
    assert await service.purge() == 0  # not old yet
    clock.advance(3 * 86400)
    assert await service.purge() == 1
    assert await service.store.notifications.purged_through_seq() == 1
    _, page = await call(service, "GET", "/v1/notifications")
    assert page["notifications"] == []


# -- FCM refusing the project, FCM not configured, retention ---------------------------------


def deliveries_of(page: dict) -> list[dict]:
    return [d for n in page["notifications"] for d in n["deliveries"]]


@pytest.mark.gen_test(timeout=30)
async def test_fcm_refusing_the_project_holds_deliveries_until_a_probe_gets_through(
    make_service, emulator, clock, caplog
):
    """403 without an FCM errorCode (the API disabled), through the real firebase-admin: held,
    not failed; /readyz says why; one probe after 120 s releases them all."""
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET, OTHER_TABLET]})
    await emulator.google.drain()
    emulator.fcm.fail(None, 403, count=2)  # both first attempts; FCM is fixed after that
    emulator.google.insert_event(ROOM, summary="Planning")
    await emulator.fcm.wait_for_attempts(TABLET, 1, 10)
    await emulator.fcm.wait_for_attempts(OTHER_TABLET, 1, 10)
    await service.syncer.drain(5)
    await service.delivery.drain(5)

    _, page = await call(service, "GET", "/v1/notifications")
    held = deliveries_of(page)
    assert [(d["state"], d["attempts"]) for d in held] == [("pending", 0), ("pending", 0)]
    assert all(d["last_error"].startswith("held: FCM refused the project") for d in held)
    assert await service.store.rooms.get(ROOM) is not None
    assert len((await service.store.rooms.get(ROOM)).firebase_tokens) == 2  # none dropped
    status, ready = await call(service, "GET", "/readyz", key=None)
    assert status == 503 and ready["checks"]["storage"] == "ok"
    fcm = ready["checks"]["fcm"]
    assert "FCM refused the project" in fcm and "next probe at" in fcm
    assert "Firebase Cloud Messaging API has not been used in project" in fcm
    _, metrics = await call(service, "GET", "/metrics")
    assert "mrm_push_fcm_mismatch_breaker_open 1.0" in metrics
    opened = [r for r in caplog.records if r.getMessage() == "fcm_project_refused_hold_open"]
    assert len(opened) == 1 and opened[0].levelname == "ERROR"
    assert await service.delivery.run_once() == 0  # nothing is tried before the probe

    clock.advance(PROBE_INTERVAL)
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await emulator.fcm.wait_for(OTHER_TABLET, 1, 10)
    await service.delivery.drain(5)
    _, page = await call(service, "GET", "/v1/notifications")
    assert [(d["state"], d["attempts"]) for d in deliveries_of(page)] == [("sent", 1), ("sent", 1)]
    assert emulator.fcm.attempts(TABLET) + emulator.fcm.attempts(OTHER_TABLET) == 4
    status, ready = await call(service, "GET", "/readyz", key=None)
    assert (status, ready["checks"]["fcm"]) == (200, "ok")


NO_FCM = {"fcm": {"service_account_file": None}}


@pytest.mark.gen_test(timeout=30)
async def test_without_fcm_configured_no_fcm_delivery_is_made(
    make_service, emulator, clock, caplog
):
    service = await make_service(NO_FCM, clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET, OTHER_TABLET]})
    await emulator.google.drain()
    emulator.google.insert_event(ROOM, summary="Standup")
    await emulator.google.drain()
    await service.syncer.drain(5)
    _, page = await call(service, "GET", "/v1/notifications")
    [notification] = page["notifications"]
    assert notification["seq"] == 1 and notification["deliveries"] == []
    assert await service.store.outbox.count() == 0
    said = [r for r in caplog.records if r.getMessage() == "fcm_not_configured"]
    assert len(said) == 1 and "no FCM deliveries are made" in said[0].reason


@pytest.mark.gen_test(timeout=30)
async def test_fcm_deliveries_left_by_an_older_version_expire_by_retention(
    make_service, emulator, clock
):
    """A database from before: FCM deliveries made while FCM was not configured. They are not
    touched, expire after storage.retention_days, stay visible one more period, then go."""
    service = await make_service(
        {**NO_FCM, "storage": {"retention_days": 2}}, clock=clock, emulator=emulator
    )
    received = await service.store.notifications.add(ROOM, "poll", "exists", clock.now())
    await service.store.notifications.publish(
        received.id, [{"event_id": "ev1"}], False, [Target("fcm", TABLET)], clock.now()
    )
    service.delivery.wake()
    assert await service.delivery.run_once() == 0
    clock.advance(2 * 86400 + 1)
    assert await service.purge() == 0
    _, page = await call(service, "GET", "/v1/notifications")
    [expired] = deliveries_of(page)
    assert (expired["state"], expired["attempts"]) == ("expired", 0)
    _, metrics = await call(service, "GET", "/metrics")
    assert 'mrm_push_deliveries_total{outcome="expired"} 1.0' in metrics
    clock.advance(2 * 86400)
    assert await service.purge() == 0  # expired exactly one period ago: still kept
    clock.advance(1)
    assert await service.purge() == 1
    assert (await call(service, "GET", "/v1/notifications"))[1]["notifications"] == []
    assert await service.store.outbox.count() == 0


@pytest.mark.gen_test(timeout=30)
async def test_notification_body_reaches_the_tablet_beside_the_data(make_service, emulator, clock):
    # fcm.notification_body: what the old mrm_push sent (a notification message whose body was
    # "success"), for tablet builds that still read getNotification().
    service = await make_service(
        {"fcm": {"notification_body": "success"}}, clock=clock, emulator=emulator
    )
    await call(service, "PUT", PATH, {"firebase_tokens": [TABLET]})
    await emulator.google.drain()
    emulator.google.insert_event(ROOM, summary="Standup")
    [message] = await emulator.fcm.wait_for(TABLET, 1, 10)
    assert message["message"]["notification"] == {"body": "success"}
    assert message["message"]["data"]["type"] == "calendar_changed"
