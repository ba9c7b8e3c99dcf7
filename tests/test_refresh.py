"""Refresh against mrm_api's GraphQL endpoint (tests/mrm_api.py, on 127.0.0.1) and the Google
emulator."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from tornado.testing import bind_unused_port

from daemon.config import DEFAULT_ROOMS_QUERY
from tests.fixtures import (  # noqa: F401
    API_KEY,
    backend,
    call,
    clock,
    emulator,
    make_service,
    settle,
)
from tests.mrm_api import MrmApi

ROOM_A = "room-a@resource.calendar.google.com"
ROOM_B = "room-b@resource.calendar.google.com"
ROOM_C = "room-c@resource.calendar.google.com"
TOKEN_A = "tablet-token-aaaaaaaa-" + "A" * 20
TOKEN_B = "tablet-token-bbbbbbbb-" + "B" * 20
TOKEN_C = "tablet-token-cccccccc-" + "C" * 20
BACKEND_TOKEN = "backend-secret-token"
SUMMARY_KEYS = {"added", "updated", "removed", "unchanged", "failed"}


def summary(added=0, updated=0, removed=0, unchanged=0, failed=()) -> dict[str, Any]:
    return {
        "added": added,
        "updated": updated,
        "removed": removed,
        "unchanged": unchanged,
        "failed": list(failed),
    }


def backend_config(backend: MrmApi, **more: Any) -> dict[str, Any]:
    return {"backend": {"url": backend.url, "token": BACKEND_TOKEN, **more}}


async def snapshot(service, emulator) -> tuple[Any, ...]:
    """Everything a refresh could change: rooms, tokens, tombstones, channels, stops, and the
    calls made to Google."""
    store = service.store
    rooms = await store.rooms.list()
    now = service.clock.now()
    return (
        rooms,
        [await store.rooms.tombstoned_tokens(r.calendar_id, now) for r in rooms],
        await store.channels.list(),
        await store.channels.list_stops(),
        list(emulator.google.calls),
    )


async def tokens_of(service, calendar_id: str) -> list[str]:
    room = await service.store.rooms.get(calendar_id)
    assert room is not None
    return list(room.firebase_tokens)


async def put_room(service, calendar_id: str, tokens: list[str]) -> None:
    status, room = await call(
        service, "PUT", "/v1/rooms/" + quote(calendar_id), {"firebase_tokens": tokens}
    )
    assert status == 201, room


# -- asking the backend ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_refresh_asks_with_the_token_and_query_then_adds_the_room(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((ROOM_A, TOKEN_A))
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200, answer
    assert answer == summary(added=1)
    [request] = backend.calls
    assert request.authorization == f"Bearer {BACKEND_TOKEN}"
    assert request.content_type.startswith("application/json")
    assert request.body == {"query": DEFAULT_ROOMS_QUERY}
    assert await tokens_of(service, ROOM_A) == [TOKEN_A]
    [channel] = await service.store.channels.list(ROOM_A)
    assert channel.state == "active"
    await emulator.google.drain()
    [google_side] = emulator.google.channels(ROOM_A)
    assert google_side["id"] == channel.id and google_side["state"] == "live"
    assert (await service.store.channels.get(channel.id)).confirmed


@pytest.mark.gen_test(timeout=20)
async def test_a_second_refresh_changes_nothing_and_keeps_the_channel(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((ROOM_A, TOKEN_A), (ROOM_B, None))
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(added=2)
    await emulator.google.drain()
    before = await service.store.channels.list()
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert answer == summary(unchanged=2)
    assert await service.store.channels.list() == before
    assert [m for m, _, _ in emulator.google.calls].count("watch") == 2


@pytest.mark.gen_test(timeout=20)
async def test_the_configured_query_is_sent_and_any_answer_shape_is_read(
    make_service, emulator, clock, backend
):
    query = "query { site(id: 3) { floors { rooms { calendarId firebaseToken } } } }"
    service = await make_service(
        backend_config(backend, rooms_query=query), clock=clock, emulator=emulator
    )
    rows = [{"calendarId": ROOM_A, "firebaseToken": TOKEN_A, "name": "A"}]
    backend.answer_always({"data": {"site": {"floors": [{"rooms": []}, {"rooms": rows}]}}})
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200, answer
    assert answer == summary(added=1)
    assert backend.calls[0].body == {"query": query}
    assert await tokens_of(service, ROOM_A) == [TOKEN_A]


@pytest.mark.gen_test(timeout=20)
async def test_the_summary_has_its_shape(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((None, TOKEN_A), (ROOM_A, None))
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert set(answer) == SUMMARY_KEYS
    assert all(isinstance(answer[k], int) for k in SUMMARY_KEYS - {"failed"})
    assert all(set(item) == {"calendar_id", "reason"} for item in answer["failed"])


# -- what the backend lists ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_several_rows_for_one_calendar_make_one_room_with_every_tablet(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((ROOM_A, TOKEN_A), (ROOM_A, TOKEN_B), (ROOM_A, None), (ROOM_A, TOKEN_A))
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert answer == summary(added=1)
    assert await tokens_of(service, ROOM_A) == [TOKEN_A, TOKEN_B]
    assert len(await service.store.channels.list(ROOM_A)) == 1


@pytest.mark.gen_test(timeout=20)
async def test_a_room_without_tablets_is_added_with_no_token(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((ROOM_A, None))
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(added=1)
    assert await tokens_of(service, ROOM_A) == []
    assert (await service.channels.current_channel(ROOM_A)).state == "active"


@pytest.mark.gen_test(timeout=20)
async def test_a_null_calendar_id_goes_to_failed(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((None, TOKEN_A), (ROOM_A, TOKEN_B))
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert answer == summary(
        added=1, failed=[{"calendar_id": None, "reason": "calendarId is null"}]
    )
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_A]
    assert await tokens_of(service, ROOM_A) == [TOKEN_B]


@pytest.mark.gen_test(timeout=20)
async def test_invalid_calendar_ids_and_tokens_go_to_failed_and_are_not_stored(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    bad_id = "room\n@resource.calendar.google.com"
    backend.serve_rooms(
        ("", TOKEN_A), (bad_id, TOKEN_A), ("x" * 1025, None), (ROOM_A, "bad token!")
    )
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert answer["added"] == 1
    failed = {item["calendar_id"]: item["reason"] for item in answer["failed"]}
    assert set(failed) == {"", bad_id, "x" * 1025, ROOM_A}
    assert failed[bad_id] == "invalid calendarId"
    assert "firebaseToken" in failed[ROOM_A]
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_A]
    assert await tokens_of(service, ROOM_A) == []


@pytest.mark.gen_test(timeout=20)
async def test_refresh_adds_tokens_and_never_removes_them(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    await put_room(service, ROOM_A, [TOKEN_A])
    backend.serve_rooms((ROOM_A, TOKEN_B))
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(updated=1)
    assert await tokens_of(service, ROOM_A) == [TOKEN_A, TOKEN_B]
    backend.serve_rooms((ROOM_A, None))
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(unchanged=1)
    assert await tokens_of(service, ROOM_A) == [TOKEN_A, TOKEN_B]


@pytest.mark.gen_test(timeout=20)
async def test_a_tombstoned_token_is_not_brought_back(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    await put_room(service, ROOM_A, [TOKEN_A, TOKEN_B])
    now = clock.now()
    assert await service.store.rooms.tombstone_token(ROOM_A, TOKEN_B, now + 30 * 86400, now)
    backend.serve_rooms((ROOM_A, TOKEN_A), (ROOM_A, TOKEN_B), (ROOM_A, TOKEN_C))
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert answer == summary(updated=1)
    assert await tokens_of(service, ROOM_A) == [TOKEN_A, TOKEN_C]
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(unchanged=1)
    assert await tokens_of(service, ROOM_A) == [TOKEN_A, TOKEN_C]


# -- dry run and pruning ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_dry_run_reports_and_changes_nothing(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    await put_room(service, ROOM_A, [TOKEN_A])
    await put_room(service, ROOM_B, [])
    await emulator.google.drain()
    backend.serve_rooms((ROOM_A, TOKEN_A), (ROOM_A, TOKEN_B), (ROOM_C, TOKEN_C))
    before = await snapshot(service, emulator)
    status, answer = await call(service, "POST", "/v1/refresh?dry_run=1&allow_prune=1")
    assert status == 200, answer
    assert answer == summary(added=1, updated=1, removed=1)
    await settle(service, emulator)
    assert await snapshot(service, emulator) == before
    # The real run does what the dry run said.
    status, answer = await call(service, "POST", "/v1/refresh?allow_prune=1")
    assert answer == summary(added=1, updated=1, removed=1)
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_A, ROOM_C]
    assert await tokens_of(service, ROOM_A) == [TOKEN_A, TOKEN_B]


@pytest.mark.gen_test(timeout=20)
async def test_rooms_the_backend_dropped_are_kept_unless_prune_is_asked(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    await put_room(service, ROOM_A, [TOKEN_A])
    await put_room(service, ROOM_B, [TOKEN_B])
    [old_b] = await service.store.channels.list(ROOM_B)
    backend.serve_rooms((ROOM_A, TOKEN_A))
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(unchanged=1)
    assert await service.store.rooms.get(ROOM_B) is not None
    status, answer = await call(service, "POST", "/v1/refresh?allow_prune=1")
    assert status == 200
    assert answer == summary(unchanged=1, removed=1)
    assert await service.store.rooms.get(ROOM_B) is None
    assert await service.store.channels.list(ROOM_B) == []
    await settle(service, emulator)
    [google_side] = emulator.google.channels(ROOM_B)
    assert google_side["id"] == old_b.id and google_side["state"] == "stopped"
    assert await service.store.channels.list_stops() == []


@pytest.mark.gen_test(timeout=20)
async def test_backend_prune_true_prunes_every_refresh(make_service, emulator, clock, backend):
    service = await make_service(
        backend_config(backend, prune=True), clock=clock, emulator=emulator
    )
    await put_room(service, ROOM_A, [])
    await put_room(service, ROOM_B, [])
    backend.serve_rooms((ROOM_A, None))
    assert (await call(service, "POST", "/v1/refresh"))[1] == summary(unchanged=1, removed=1)
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_A]
    # The periodic path (no arguments) follows the config too.
    await put_room(service, ROOM_C, [])
    result = await service.refresher.refresh()
    assert result.as_json() == summary(unchanged=1, removed=1)
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_A]
    await settle(service, emulator)


@pytest.mark.gen_test(timeout=20)
async def test_no_prune_when_the_backend_answers_an_http_error(
    make_service, emulator, clock, backend
):
    service = await make_service(
        backend_config(backend, prune=True), clock=clock, emulator=emulator
    )
    await put_room(service, ROOM_A, [TOKEN_A])
    backend.answer_always({"data": {"allRooms": {"rooms": []}}}, status=500)
    before = await snapshot(service, emulator)
    status, answer = await call(service, "POST", "/v1/refresh?allow_prune=1")
    assert status == 502
    assert answer["error"]["code"] == "backend_error"
    assert "500" in answer["error"]["message"]
    assert await snapshot(service, emulator) == before


@pytest.mark.gen_test(timeout=20)
async def test_errors_beside_data_add_but_never_prune(make_service, emulator, clock, backend):
    service = await make_service(
        backend_config(backend, prune=True), clock=clock, emulator=emulator
    )
    await put_room(service, ROOM_A, [])
    await put_room(service, ROOM_B, [])
    backend.serve_rooms((ROOM_A, TOKEN_A), (ROOM_C, None), errors=["floor 2 failed to load"])
    status, answer = await call(service, "POST", "/v1/refresh?allow_prune=1")
    assert status == 200, answer
    failed = [{"calendar_id": None, "reason": "backend GraphQL error: floor 2 failed to load"}]
    assert answer == summary(added=1, updated=1, failed=failed)
    assert [r.calendar_id for r in await service.store.rooms.list()] == [ROOM_A, ROOM_B, ROOM_C]
    assert await tokens_of(service, ROOM_A) == [TOKEN_A]


@pytest.mark.gen_test(timeout=20)
async def test_errors_without_data_are_a_backend_error(make_service, emulator, clock, backend):
    service = await make_service(
        backend_config(backend, prune=True), clock=clock, emulator=emulator
    )
    await put_room(service, ROOM_A, [])
    backend.answer_always({"data": None, "errors": [{"message": "not authorised"}]})
    before = await snapshot(service, emulator)
    status, answer = await call(service, "POST", "/v1/refresh?allow_prune=1")
    assert status == 502
    assert answer["error"]["code"] == "backend_error"
    assert "not authorised" in answer["error"]["message"]
    assert await snapshot(service, emulator) == before


@pytest.mark.parametrize(
    "rows", [[], [(None, TOKEN_A)]], ids=["no rooms", "only null calendar ids"]
)
@pytest.mark.gen_test(timeout=20)
async def test_an_empty_list_never_prunes_the_rooms_here(
    make_service, emulator, clock, backend, rows
):
    service = await make_service(
        backend_config(backend, prune=True), clock=clock, emulator=emulator
    )
    await put_room(service, ROOM_A, [TOKEN_A])
    await put_room(service, ROOM_B, [])
    backend.serve_rooms(*rows)
    before = await snapshot(service, emulator)
    status, answer = await call(service, "POST", "/v1/refresh?allow_prune=1")
    assert status == 200
    assert answer["removed"] == 0 and answer["added"] == 0
    assert await snapshot(service, emulator) == before


@pytest.mark.gen_test(timeout=20)
async def test_an_empty_list_with_no_rooms_here_is_all_zeros(
    make_service, emulator, clock, backend
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms()
    assert (await call(service, "POST", "/v1/refresh?allow_prune=1"))[1] == summary()


# -- channels --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_failed_channel_is_retried_by_refresh(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    emulator.google.inject("watch", status=404, reason="notFound", calendar_id=ROOM_A, count=2)
    backend.serve_rooms((ROOM_A, TOKEN_A), (ROOM_B, TOKEN_B))
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 200
    assert answer["added"] == 2
    [failed] = answer["failed"]
    assert failed["calendar_id"] == ROOM_A and failed["reason"].startswith("channel failed")
    assert (await service.channels.current_channel(ROOM_A)).state == "failed"
    # Still failing: reported again, and failed channels do not pile up.
    _, answer = await call(service, "POST", "/v1/refresh")
    assert answer["unchanged"] == 2 and [f["calendar_id"] for f in answer["failed"]] == [ROOM_A]
    [channel] = await service.store.channels.list(ROOM_A)
    assert channel.state == "failed"
    # Google accepts the watch now: the next refresh makes a working channel.
    _, answer = await call(service, "POST", "/v1/refresh")
    assert answer == summary(unchanged=2)
    [channel] = await service.store.channels.list(ROOM_A)
    assert channel.state == "active" and channel.last_error is None
    await emulator.google.drain()
    live = [c for c in emulator.google.channels(ROOM_A) if c["state"] == "live"]
    assert [c["id"] for c in live] == [channel.id]
    assert (await service.store.channels.get(channel.id)).confirmed


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_refresh_without_backend_url_is_503_backend_not_configured(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 503
    assert answer["error"]["code"] == "backend_not_configured"
    assert "backend.url" in answer["error"]["message"]
    assert "refresh" not in service.periodic


@pytest.mark.parametrize(
    "answer",
    [b"<html>oops</html>", [1, 2], {"rooms": []}],
    ids=["not JSON", "not an object", "not GraphQL"],
)
@pytest.mark.gen_test(timeout=20)
async def test_an_answer_that_is_not_graphql_is_a_backend_error(
    make_service, emulator, clock, backend, answer
):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.answer_always(answer)
    status, body = await call(service, "POST", "/v1/refresh")
    assert status == 502
    assert body["error"]["code"] == "backend_error"


@pytest.mark.gen_test(timeout=20)
async def test_an_unreachable_backend_is_a_backend_error(make_service, emulator, clock):
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there now
    service = await make_service(
        {"backend": {"url": f"http://127.0.0.1:{port}/graphql"}}, clock=clock, emulator=emulator
    )
    status, answer = await call(service, "POST", "/v1/refresh")
    assert status == 502
    assert answer["error"]["code"] == "backend_error"


@pytest.mark.gen_test(timeout=20)
async def test_refresh_needs_the_api_key(make_service, emulator, clock, backend):
    service = await make_service(backend_config(backend), clock=clock, emulator=emulator)
    backend.serve_rooms((ROOM_A, TOKEN_A))
    for key in (None, "wrong-key"):
        status, answer = await call(service, "POST", "/v1/refresh", key=key)
        assert status == 401
        assert answer["error"]["code"] == "unauthorized"
    assert backend.calls == []
    assert await service.store.rooms.list() == []
    status, _ = await call(service, "POST", "/v1/refresh", key=None, headers={"X-Api-Key": API_KEY})
    assert status == 200


# -- periodic refresh ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("with_url", "interval", "registered"),
    [(True, 3600, True), (False, 3600, False), (True, 0, False)],
    ids=["url and interval", "no url", "interval 0"],
)
@pytest.mark.gen_test(timeout=20)
async def test_periodic_refresh_runs_only_with_an_interval_and_a_url(
    make_service, emulator, clock, backend, with_url, interval, registered
):
    config: dict[str, Any] = {"refresh_interval": interval}
    if with_url:
        config.update(url=backend.url, token=BACKEND_TOKEN)
    service = await make_service({"backend": config}, clock=clock, emulator=emulator)
    assert ("refresh" in service.periodic) is registered
    if not registered:
        return
    assert service.periodic["refresh"].callback_time == interval * 1000
    assert service.periodic["refresh"].is_running()
    # What the periodic callback runs, called directly rather than waited for.
    backend.serve_rooms((ROOM_A, TOKEN_A))
    result = await service.refresher.refresh()
    assert result.as_json() == summary(added=1)
    assert await tokens_of(service, ROOM_A) == [TOKEN_A]
    assert backend.calls[0].authorization == f"Bearer {BACKEND_TOKEN}"
