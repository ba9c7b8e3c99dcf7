"""The old mrm_push routes: who may call them, their parameters, and their answer shapes."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from daemon.logs import JsonFormatter
from tests.fixtures import API_KEY, backend, call, clock, emulator, make_service, settle  # noqa: F401
from tests.test_refresh import BACKEND_TOKEN

ROOM = "room-1@resource.calendar.google.com"
ROOM_2 = "room-2@resource.calendar.google.com"
TOKEN_A = "tablet-token-aaaaaaaa-" + "A" * 20
TOKEN_B = "tablet-token-bbbbbbbb-" + "B" * 20
TOKEN_C = "tablet-token-cccccccc-" + "C" * 20
LOOPBACK = {"auth": {"legacy_allow_from": ["127.0.0.0/8"]}}
ROOM_KEYS = {"calendar_id", "name", "firebase_tokens", "created_at", "updated_at", "channel"}
ADDED = "Room added successfully."
DELETED = "Room stopped from listening for notifications"
NOT_FOUND = "Room not found under notifications list"


def query(**params: str) -> str:
    return "?" + urlencode(params)


async def legacy(service, method: str, path: str, body=None, **kwargs):
    """A call the way mrm_api's tasks make it: no credentials unless given."""
    kwargs.setdefault("key", None)
    return await call(service, method, path, body, **kwargs)


async def tokens_of(service, calendar_id: str) -> list[str]:
    room = await service.store.rooms.get(calendar_id)
    assert room is not None
    return list(room.firebase_tokens)


def refused_lines(caplog) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(r))
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage() == "legacy_call_refused"
    ]


# -- who may call ----------------------------------------------------------------------------

EVERY_ROUTE = [
    ("GET", "/add_room" + query(calendar_id=ROOM, firebase_token=TOKEN_A), None),
    ("POST", "/add_room", {"calendar_id": ROOM, "firebase_token": TOKEN_A}),
    ("DELETE", "/delete_room" + query(calendar_id=ROOM), None),
    ("GET", "/token" + query(calendar_id=ROOM, firebase_token=TOKEN_A), None),
    ("POST", "/token", {"calendar_id": ROOM, "firebase_token": TOKEN_A}),
    ("GET", "/refresh", None),
    ("POST", "/refresh", {"allow_prune": True}),
    ("GET", "/channels", None),
    ("POST", "/channels", None),
]


@pytest.mark.gen_test(timeout=20)
async def test_every_legacy_route_refuses_an_unknown_caller_and_logs_it(
    make_service, emulator, clock, backend, caplog
):
    caplog.set_level(logging.WARNING, logger="handlers.legacy")
    service = await make_service({"backend": {"url": backend.url}}, clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", "/v1/rooms/" + quote(ROOM), {"firebase_tokens": []})
    assert status == 201
    await emulator.google.drain()
    before = (await service.store.rooms.list(), await service.store.channels.list())
    google_calls = len(emulator.google.calls)
    for method, path, body in EVERY_ROUTE:
        for key in (None, "not-the-key"):
            caplog.clear()
            status, answer = await legacy(service, method, path, body, key=key)
            assert status == 401, (method, path, answer)
            assert answer["error"]["code"] == "unauthorized"
            [line] = refused_lines(caplog)
            assert line["level"] == "warning"
            assert line["route"] == path.partition("?")[0]
            assert line["remote"] == "127.0.0.1"
            assert TOKEN_A not in json.dumps(line)  # the path only, never the query string
    assert (await service.store.rooms.list(), await service.store.channels.list()) == before
    assert len(emulator.google.calls) == google_calls
    assert backend.calls == []


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {API_KEY}"}, {"X-Api-Key": API_KEY}],
    ids=["bearer", "x-api-key"],
)
@pytest.mark.gen_test(timeout=20)
async def test_the_api_key_opens_the_legacy_routes(make_service, emulator, clock, caplog, headers):
    caplog.set_level(logging.WARNING, logger="handlers.legacy")
    service = await make_service(clock=clock, emulator=emulator)
    status, answer = await legacy(
        service, "GET", "/add_room" + query(calendar_id=ROOM), headers=headers
    )
    assert status == 200, answer
    assert answer["message"] == ADDED
    assert refused_lines(caplog) == []
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=20)
async def test_an_allowed_address_needs_no_key(make_service, emulator, clock, caplog):
    caplog.set_level(logging.WARNING, logger="handlers.legacy")
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    status, answer = await legacy(service, "GET", "/add_room" + query(calendar_id=ROOM))
    assert status == 200, answer
    assert refused_lines(caplog) == []
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=20)
async def test_an_address_outside_the_allowed_cidrs_is_refused(
    make_service, emulator, clock, caplog
):
    caplog.set_level(logging.WARNING, logger="handlers.legacy")
    service = await make_service(
        {"auth": {"legacy_allow_from": ["10.0.0.0/8", "::1/128"]}}, clock=clock, emulator=emulator
    )
    status, _ = await legacy(service, "GET", "/add_room" + query(calendar_id=ROOM))
    assert status == 401
    assert len(refused_lines(caplog)) == 1
    assert await service.store.rooms.list() == []


# -- /add_room -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_add_room_from_the_query_string(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    path = "/add_room" + query(calendar_id=ROOM, firebase_token=TOKEN_A)
    status, answer = await legacy(service, "GET", path)
    assert status == 200, answer
    assert set(answer) == {"message", "room"}
    assert answer["message"] == ADDED
    room = answer["room"]
    assert set(room) == ROOM_KEYS
    assert room["calendar_id"] == ROOM
    assert room["firebase_tokens"] == [TOKEN_A[-8:]]
    assert room["channel"]["state"] == "active"
    await emulator.google.drain()
    [google_side] = emulator.google.channels(ROOM)
    assert google_side["id"] == room["channel"]["id"]
    status, shown = await call(service, "GET", "/v1/rooms/" + quote(ROOM))
    assert shown["channel"]["confirmed"] is True


@pytest.mark.gen_test(timeout=20)
async def test_add_room_adds_the_token_to_the_set(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    status, first = await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    assert status == 200 and first["room"]["firebase_tokens"] == []
    status, second = await legacy(
        service, "POST", "/add_room", {"calendar_id": ROOM, "firebase_token": TOKEN_A}
    )
    assert status == 200 and second["message"] == ADDED
    path = "/add_room" + query(calendar_id=ROOM, firebase_token=TOKEN_B, full="1")
    status, third = await legacy(service, "POST", path)
    assert status == 200
    assert third["room"]["firebase_tokens"] == [TOKEN_A, TOKEN_B]
    assert await tokens_of(service, ROOM) == [TOKEN_A, TOKEN_B]
    # One room, one channel, whatever the number of calls.
    assert third["room"]["channel"]["id"] == first["room"]["channel"]["id"]
    assert len(await service.store.channels.list(ROOM)) == 1
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=20)
async def test_add_room_clears_a_tombstone(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    await legacy(service, "GET", "/add_room" + query(calendar_id=ROOM, firebase_token=TOKEN_A))
    now = clock.now()
    await service.store.rooms.tombstone_token(ROOM, TOKEN_A, now + 86400, now)
    assert await tokens_of(service, ROOM) == []
    await legacy(service, "GET", "/add_room" + query(calendar_id=ROOM, firebase_token=TOKEN_A))
    assert await tokens_of(service, ROOM) == [TOKEN_A]
    assert await service.store.rooms.tombstoned_tokens(ROOM, clock.now()) == set()
    await emulator.google.drain()


BAD_CALENDAR_IDS = [
    ("GET", "/add_room", None),
    ("GET", "/add_room" + query(calendar_id=""), None),
    ("GET", "/add_room" + query(calendar_id="room\x01@x"), None),
    ("GET", "/add_room" + query(calendar_id="r" * 1025), None),
    ("POST", "/add_room", {"calendar_id": 12}),
    ("POST", "/add_room", {"calendar_id": None, "firebase_token": TOKEN_A}),
    ("GET", "/token" + query(firebase_token=TOKEN_A), None),
    ("POST", "/token", {"calendar_id": ["a"], "firebase_token": TOKEN_A}),
    ("DELETE", "/delete_room", None),
    ("DELETE", "/delete_room", {"calendar_id": "bad\x7fid"}),
]


@pytest.mark.gen_test(timeout=20)
async def test_bad_calendar_ids_are_400_and_store_nothing(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    for method, path, body in BAD_CALENDAR_IDS:
        status, answer = await legacy(service, method, path, body)
        assert status == 400, (method, path, body, answer)
        assert answer["error"]["code"] == "invalid_calendar_id"
    assert await service.store.rooms.list() == []
    assert await service.store.channels.list() == []
    assert emulator.google.calls == []


@pytest.mark.gen_test(timeout=20)
async def test_a_bad_token_on_add_room_stores_nothing(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    for params in (
        {"calendar_id": ROOM, "firebase_token": "no spaces allowed"},
        {"calendar_id": ROOM, "firebase_token": 42},
    ):
        status, answer = await legacy(service, "POST", "/add_room", params)
        assert status == 400, answer
        assert answer["error"]["code"] == "invalid_token"
    assert await service.store.rooms.list() == []
    assert emulator.google.calls == []


@pytest.mark.gen_test(timeout=20)
async def test_a_body_that_is_not_json_is_400(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    status, answer = await legacy(service, "POST", "/add_room", raw=b"calendar_id=x")
    assert status == 400
    assert answer["error"]["code"] == "invalid_json"
    assert await service.store.rooms.list() == []


# -- /delete_room ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["query", "body"])
@pytest.mark.gen_test(timeout=20)
async def test_delete_room_forgets_it_and_stops_its_channel(make_service, emulator, clock, style):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    _, added = await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    channel_id = added["room"]["channel"]["id"]
    if style == "query":
        status, answer = await legacy(service, "DELETE", "/delete_room" + query(calendar_id=ROOM))
    else:
        status, answer = await legacy(service, "DELETE", "/delete_room", {"calendar_id": ROOM})
    assert status == 200
    assert answer == {"message": DELETED}
    assert await service.store.rooms.get(ROOM) is None
    assert await service.store.channels.list(ROOM) == []
    await settle(service, emulator)
    [google_side] = emulator.google.channels(ROOM)
    assert google_side["id"] == channel_id and google_side["state"] == "stopped"
    # Once more: the old "not found" answer, still 200.
    status, answer = await legacy(service, "DELETE", "/delete_room" + query(calendar_id=ROOM))
    assert status == 200
    assert answer == {"message": NOT_FOUND}


@pytest.mark.gen_test(timeout=20)
async def test_delete_room_answers_only_delete(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    status, answer = await legacy(service, "GET", "/delete_room" + query(calendar_id=ROOM))
    assert status == 405
    assert answer["error"]["status"] == 405
    assert await service.store.rooms.get(ROOM) is not None
    await emulator.google.drain()


# -- /token ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_token_makes_the_set_exactly_that_token(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    status, _ = await call(
        service, "PUT", "/v1/rooms/" + quote(ROOM), {"firebase_tokens": [TOKEN_A, TOKEN_B]}
    )
    assert status == 201
    [channel] = await service.store.channels.list(ROOM)
    status, answer = await legacy(
        service, "GET", "/token" + query(calendar_id=ROOM, firebase_token=TOKEN_C)
    )
    assert status == 200, answer
    assert set(answer) == {"message", "room"} and answer["message"] == "OK"
    assert set(answer["room"]) == ROOM_KEYS
    assert answer["room"]["firebase_tokens"] == [TOKEN_C[-8:]]
    assert await tokens_of(service, ROOM) == [TOKEN_C]
    status, answer = await legacy(
        service, "POST", "/token", {"calendar_id": ROOM, "firebase_token": TOKEN_A}
    )
    assert status == 200 and answer["message"] == "OK"
    assert await tokens_of(service, ROOM) == [TOKEN_A]
    # The channel is the room's, not the token's: it stays.
    assert await service.store.channels.list(ROOM) == [await service.store.channels.get(channel.id)]
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=20)
async def test_token_for_an_unknown_room_is_404_and_creates_nothing(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    for method, path, body in [
        ("GET", "/token" + query(calendar_id=ROOM, firebase_token=TOKEN_A), None),
        ("POST", "/token", {"calendar_id": ROOM, "firebase_token": TOKEN_A}),
    ]:
        status, answer = await legacy(service, method, path, body)
        assert status == 404
        assert answer["error"]["code"] == "room_not_found"
    assert await service.store.rooms.list() == []
    assert emulator.google.calls == []


@pytest.mark.gen_test(timeout=20)
async def test_token_needs_a_valid_token(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM, "firebase_token": TOKEN_A})
    for body in ({"calendar_id": ROOM}, {"calendar_id": ROOM, "firebase_token": "a b"}):
        status, answer = await legacy(service, "POST", "/token", body)
        assert status == 400
        assert answer["error"]["code"] == "invalid_token"
    assert await tokens_of(service, ROOM) == [TOKEN_A]
    await emulator.google.drain()


# -- /refresh --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_refresh_answers_the_old_message_with_the_summary(
    make_service, emulator, clock, backend
):
    service = await make_service(
        {**LOOPBACK, "backend": {"url": backend.url, "token": BACKEND_TOKEN}},
        clock=clock,
        emulator=emulator,
    )
    backend.serve_rooms((ROOM, TOKEN_A))
    status, answer = await legacy(service, "GET", "/refresh")
    assert status == 200, answer
    assert answer == {
        "message": "Calendars saved successfully",
        "added": 1,
        "updated": 0,
        "removed": 0,
        "unchanged": 0,
        "failed": [],
    }
    assert backend.calls[0].authorization == f"Bearer {BACKEND_TOKEN}"
    assert await tokens_of(service, ROOM) == [TOKEN_A]
    status, answer = await legacy(service, "POST", "/refresh")
    assert status == 200
    assert answer["message"] == "Calendars saved successfully" and answer["unchanged"] == 1
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=20)
async def test_refresh_flags_from_the_query_string_or_a_json_body(
    make_service, emulator, clock, backend
):
    service = await make_service(
        {**LOOPBACK, "backend": {"url": backend.url}}, clock=clock, emulator=emulator
    )
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    backend.serve_rooms((ROOM_2, None))
    for method, path, body in [
        ("GET", "/refresh?dry_run=1&allow_prune=1", None),
        ("POST", "/refresh", {"dry_run": True, "allow_prune": True}),
        ("POST", "/refresh", {"dry_run": "1", "allow_prune": 1}),
    ]:
        status, answer = await legacy(service, method, path, body)
        assert status == 200, answer
        assert (answer["added"], answer["removed"]) == (1, 1)
        assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM]
    status, answer = await legacy(service, "POST", "/refresh", {"allow_prune": True})
    assert (answer["added"], answer["removed"]) == (1, 1)
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_2]
    await settle(service, emulator)


@pytest.mark.gen_test(timeout=20)
async def test_refresh_without_a_backend_is_503(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    status, answer = await legacy(service, "GET", "/refresh")
    assert status == 503
    assert answer["error"]["code"] == "backend_not_configured"


@pytest.mark.gen_test(timeout=20)
async def test_refresh_reports_a_backend_http_error_as_502(make_service, emulator, clock, backend):
    service = await make_service(
        {**LOOPBACK, "backend": {"url": backend.url}}, clock=clock, emulator=emulator
    )
    backend.answer_always({"data": {"allRooms": {"rooms": []}}}, status=500)
    status, answer = await legacy(service, "POST", "/refresh", {"allow_prune": True})
    assert status == 502
    assert answer["error"]["code"] == "backend_error"


# -- /channels -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_get_channels_is_like_v1_channels(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM_2})
    await emulator.google.drain()
    status, old = await legacy(service, "GET", "/channels")
    assert status == 200
    status, new = await call(service, "GET", "/v1/channels")
    assert status == 200
    assert old == new
    assert sorted(c["calendar_id"] for c in old["channels"]) == [ROOM, ROOM_2]
    assert all("token" not in c for c in old["channels"])


@pytest.mark.gen_test(timeout=20)
async def test_post_channels_renews_every_channel(make_service, emulator, clock):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM_2})
    await emulator.google.drain()
    before = {c.calendar_id: c.id for c in await service.store.channels.list()}
    status, answer = await legacy(service, "POST", "/channels")
    assert status == 200, answer
    assert answer == {"renewed": 2, "failed": []}
    await settle(service, emulator)
    for calendar_id, old_id in before.items():
        current = await service.channels.current_channel(calendar_id)
        assert current.id != old_id and current.state == "active"
        live = [c["id"] for c in emulator.google.channels(calendar_id) if c["state"] == "live"]
        assert current.id in live


@pytest.mark.gen_test(timeout=20)
async def test_post_channels_reports_the_calendars_it_could_not_renew(
    make_service, emulator, clock
):
    service = await make_service(LOOPBACK, clock=clock, emulator=emulator)
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM})
    await legacy(service, "POST", "/add_room", {"calendar_id": ROOM_2})
    await emulator.google.drain()
    emulator.google.inject("watch", status=404, reason="notFound", calendar_id=ROOM_2)
    status, answer = await legacy(service, "POST", "/channels")
    assert status == 200
    assert answer["renewed"] == 1
    [failed] = answer["failed"]
    assert set(failed) == {"calendar_id", "reason"} and failed["calendar_id"] == ROOM_2
    await settle(service, emulator)
