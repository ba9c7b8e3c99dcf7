"""Rooms through the management API, with real channels made at the Google emulator."""

from __future__ import annotations

from urllib.parse import quote, urlencode

import pytest

from storage.base import Target
from tests.fixtures import call, clock, emulator, make_service  # noqa: F401

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
TOKEN_A = "tablet-token-aaaaaaaa-" + "A" * 20
TOKEN_B = "tablet-token-bbbbbbbb-" + "B" * 20


@pytest.mark.gen_test(timeout=20)
async def test_put_makes_an_active_confirmed_channel(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    status, room = await call(service, "PUT", PATH, {"firebase_tokens": [TOKEN_A], "name": "One"})
    assert status == 201, room
    assert room["calendar_id"] == ROOM and room["name"] == "One"
    assert room["firebase_tokens"] == [TOKEN_A[-8:]]
    channel = room["channel"]
    assert channel["state"] == "active" and channel["resource_id"]
    await emulator.google.drain()
    status, listing = await call(service, "GET", "/v1/channels")
    assert status == 200
    [shown] = listing["channels"]
    assert shown["id"] == channel["id"] and shown["confirmed"] is True
    assert "token" not in shown
    [google_side] = emulator.google.channels(ROOM)
    assert google_side["id"] == channel["id"]
    assert await service.store.channels.get_sync_token(ROOM) is not None


async def nothing_stored(service) -> bool:
    return await service.store.rooms.list() == [] and await service.store.channels.list() == []


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/rooms/", "invalid_calendar_id"),
        ("/v1/rooms/" + "a" * 1025, "invalid_calendar_id"),
        ("/v1/rooms/bad%01id", "invalid_calendar_id"),
        ("/v1/rooms/bad%0Aid", "invalid_calendar_id"),
    ],
)
async def test_bad_calendar_ids_are_400_and_store_nothing(
    make_service, emulator, clock, path, code
):
    service = await make_service(clock=clock, emulator=emulator)
    status, body = await call(service, "PUT", path, {"firebase_tokens": [TOKEN_A]})
    assert status == 400 and body["error"]["code"] == code
    assert body["error"]["status"] == 400 and body["error"]["message"]
    assert await nothing_stored(service)
    assert emulator.google.calls == []


@pytest.mark.gen_test(timeout=20)
async def test_a_1024_character_calendar_id_is_fine(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", "/v1/rooms/" + "a" * 1024, {})
    assert status == 201


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"firebase_tokens": "one"}', "invalid_token"),
        (b'{"firebase_tokens": ["has space"]}', "invalid_token"),
        (b'{"firebase_tokens": [""]}', "invalid_token"),
        (b'{"firebase_tokens": [42]}', "invalid_token"),
        (b'{"firebase_token": "bad/token"}', "invalid_token"),
        (b'{"firebase_token": "a", "firebase_tokens": ["b"]}', "invalid_body"),
        (b'{"name": 5}', "invalid_name"),
        (b'{"colour": "blue"}', "unknown_field"),
    ],
)
async def test_bad_bodies_are_400_and_store_nothing(make_service, emulator, clock, raw, code):
    service = await make_service(clock=clock, emulator=emulator)
    status, body = await call(service, "PUT", PATH, raw=raw)
    assert status == 400 and body["error"]["code"] == code
    assert await nothing_stored(service)


@pytest.mark.gen_test(timeout=20)
async def test_a_body_over_max_body_size_is_413_and_stores_nothing(make_service, emulator, clock):
    service = await make_service(
        {"server": {"max_body_size": 1024}}, clock=clock, emulator=emulator
    )
    big = {"firebase_tokens": ["t" * 100] * 20}
    status, body = await call(service, "PUT", PATH, big)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert await nothing_stored(service)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": "Basic abc"},
        {"X-Api-Key": "wrong-key-0123456789"},
    ],
)
async def test_without_the_api_key_it_is_401_and_changes_nothing(
    make_service, emulator, clock, headers
):
    service = await make_service(clock=clock, emulator=emulator)
    for method, path in [
        ("PUT", PATH),
        ("GET", "/v1/rooms"),
        ("GET", "/v1/channels"),
        ("POST", "/v1/channels/renew"),
        ("DELETE", PATH),
        ("POST", PATH + "/tokens/" + TOKEN_A),
        ("POST", "/v1/refresh"),
    ]:
        status, body = await call(service, method, path, key=None, headers=headers)
        assert status == 401 and body["error"]["code"] == "unauthorized", (method, path)
    assert await nothing_stored(service)


@pytest.mark.gen_test(timeout=20)
async def test_x_api_key_header_is_accepted(make_service, emulator, clock):
    from tests.fixtures import API_KEY

    service = await make_service(clock=clock, emulator=emulator)
    status, _ = await call(service, "GET", "/v1/rooms", key=None, headers={"X-Api-Key": API_KEY})
    assert status == 200


@pytest.mark.gen_test(timeout=20)
async def test_room_reads_tokens_and_delete(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    assert await call(service, "GET", PATH) == (
        404,
        {
            "error": {
                "status": 404,
                "code": "room_not_found",
                "message": f"no room for calendar {ROOM!r}",
            }
        },
    )
    status, _ = await call(service, "PUT", PATH, {"firebase_token": TOKEN_A, "name": "Blue"})
    assert status == 201
    status, room = await call(service, "GET", PATH + "?full=1")
    assert status == 200 and room["firebase_tokens"] == [TOKEN_A]
    assert room["created_at"].endswith("Z") and room["channel"]["expiration"].endswith("Z")
    # Add a token, then the same again (idempotent), then remove one.
    status, room = await call(service, "POST", f"{PATH}/tokens/{TOKEN_B}?full=1")
    assert status == 200 and room["firebase_tokens"] == [TOKEN_A, TOKEN_B]
    status, room = await call(service, "POST", f"{PATH}/tokens/{TOKEN_B}?full=1")
    assert room["firebase_tokens"] == [TOKEN_A, TOKEN_B]
    assert (await call(service, "DELETE", f"{PATH}/tokens/{TOKEN_A}"))[0] == 204
    _, room = await call(service, "GET", PATH + "?full=1")
    assert room["firebase_tokens"] == [TOKEN_B]
    assert (await call(service, "POST", f"{PATH}/tokens/bad%20token"))[0] == 400
    # Unknown rooms.
    other = "/v1/rooms/nobody%40x"
    assert (await call(service, "POST", f"{other}/tokens/{TOKEN_A}"))[0] == 404
    assert (await call(service, "DELETE", f"{other}/tokens/{TOKEN_A}"))[0] == 404
    assert (await call(service, "DELETE", other))[0] == 404
    # The list shows every room, tokens shortened.
    status, listing = await call(service, "GET", "/v1/rooms")
    assert status == 200 and [r["firebase_tokens"] for r in listing["rooms"]] == [[TOKEN_B[-8:]]]
    assert listing["rooms"][0]["channel"]["state"] == "active"
    # PUT with a list replaces the set.
    _, room = await call(service, "PUT", PATH + "?full=1", {"firebase_tokens": [TOKEN_A]})
    assert room["firebase_tokens"] == [TOKEN_A] and room["name"] == "Blue"
    assert (await call(service, "DELETE", PATH))[0] == 204
    assert (await call(service, "GET", PATH))[0] == 404
    assert await call(service, "GET", "/v1/rooms") == (200, {"rooms": []})


@pytest.mark.gen_test(timeout=20)
async def test_an_explicit_add_clears_a_tombstone(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TOKEN_A, TOKEN_B]})
    now = clock.now()
    assert await service.store.rooms.tombstone_token(ROOM, TOKEN_A, now + 30 * 86400, now)
    assert await service.store.rooms.tombstoned_tokens(ROOM, now) == {TOKEN_A}
    _, room = await call(service, "POST", f"{PATH}/tokens/{TOKEN_A}?full=1")
    assert TOKEN_A in room["firebase_tokens"]
    assert await service.store.rooms.tombstoned_tokens(ROOM, now) == set()
    await service.store.rooms.tombstone_token(ROOM, TOKEN_B, now + 30 * 86400, now)
    await call(service, "PUT", PATH, {"firebase_tokens": [TOKEN_B]})
    assert await service.store.rooms.tombstoned_tokens(ROOM, now) == set()


async def publish_for_room(service, clock) -> int:
    """A change published for ROOM the way the syncer does it (one delivery per token); the
    worker is woken. Returns the notification id."""
    room = await service.store.rooms.get(ROOM)
    received = await service.store.notifications.add(ROOM, "poll", "exists", clock.now())
    targets = [Target("fcm", token) for token in room.firebase_tokens]
    await service.store.notifications.publish(
        received.id, [{"event_id": "ev1"}], False, targets, clock.now()
    )
    service.delivery.wake()
    return received.id


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("leaves_by", ["DELETE token", "PUT firebase_tokens", "legacy /token"])
async def test_a_token_that_leaves_the_room_takes_its_pending_deliveries(
    make_service, emulator, clock, leaves_by
):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {"firebase_tokens": [TOKEN_A, TOKEN_B]})
    await emulator.google.drain()
    emulator.fcm.fail(TOKEN_A, 503)  # A's delivery waits for its retry; B's is sent
    notification_id = await publish_for_room(service, clock)
    await emulator.fcm.wait_for(TOKEN_B, 1)
    await emulator.fcm.wait_for_attempts(TOKEN_A, 1)
    await service.delivery.drain(5)
    by_token = {
        d.target.token: d
        for d in (
            await service.store.notifications.get(notification_id, with_deliveries=True)
        ).deliveries
    }
    assert (by_token[TOKEN_A].state, by_token[TOKEN_A].attempts) == ("pending", 1)
    assert by_token[TOKEN_B].state == "sent"

    if leaves_by == "DELETE token":
        assert (await call(service, "DELETE", f"{PATH}/tokens/{TOKEN_A}"))[0] == 204
    elif leaves_by == "PUT firebase_tokens":
        assert (await call(service, "PUT", PATH, {"firebase_tokens": [TOKEN_B]}))[0] == 200
    else:
        query = "?" + urlencode({"calendar_id": ROOM, "firebase_token": TOKEN_B})
        assert (await call(service, "GET", "/token" + query))[0] == 200

    by_token = {
        d.target.token: d
        for d in (
            await service.store.notifications.get(notification_id, with_deliveries=True)
        ).deliveries
    }
    assert by_token[TOKEN_A].state == "cancelled"
    assert by_token[TOKEN_B].state == "sent"
    _, page = await call(service, "GET", "/v1/notifications?calendar_id=" + quote(ROOM))
    assert sorted(d["state"] for d in page["notifications"][0]["deliveries"]) == [
        "cancelled",
        "sent",
    ]
    # Its retry time comes and goes: nothing more is sent to the token that left.
    clock.set(by_token[TOKEN_A].next_attempt_at + 1)
    assert await service.delivery.run_once() == 0
    assert emulator.fcm.attempts(TOKEN_A) == 1
