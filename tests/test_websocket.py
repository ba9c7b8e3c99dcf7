"""/ws with real WebSocket clients against the running service: the protocol of contract 5,
replay and its seam, limits, slow consumers, pings and shutdown."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import gc
import json
import logging
import os
import socket
import struct
import sys
import termios
from typing import Any
from urllib.parse import quote

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from daemon import fanout, seqorder
from daemon.ids import CALENDAR_ID_MAX
from storage.base import Notification, StoreError
from tests.fixtures import API_KEY, call, clock, emulator, make_service  # noqa: F401

TOKEN = "subscriber-token-sees-all-0123456789"
LIMITED = "subscriber-token-room-a-only-0123456"
ROOM_A = "room-a@resource.calendar.google.com"
ROOM_B = "room-b@resource.calendar.google.com"
ROOM_C = "room-c@resource.calendar.google.com"


def overrides(**websocket: Any) -> dict[str, Any]:
    return {
        "auth": {
            "subscribers": [
                {"token": TOKEN, "calendars": ["*"]},
                {"token": LIMITED, "calendars": [ROOM_A]},
            ]
        },
        "websocket": websocket,
    }


async def connect(
    service, token: str | None = TOKEN, *, query: bool = False, headers=None
) -> WebSocketClientConnection:
    url = f"ws://127.0.0.1:{service.port}/ws"
    all_headers = dict(headers or {})
    if token is not None and query:
        url += "?access_token=" + quote(token)
    elif token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return await websocket_connect(HTTPRequest(url, headers=all_headers))


async def refused(service, token: str | None = TOKEN, **kwargs: Any) -> tuple[int, Any]:
    with pytest.raises(HTTPClientError) as caught:
        await connect(service, token, **kwargs)
    response = caught.value.response
    assert response is not None
    return caught.value.code, json.loads(response.body)


async def send(ws: WebSocketClientConnection, message: Any) -> None:
    await ws.write_message(message if isinstance(message, str) else json.dumps(message))


async def receive(ws: WebSocketClientConnection) -> dict[str, Any]:
    text = await ws.read_message()
    assert text is not None, f"closed: {ws.close_code} {ws.close_reason}"
    return json.loads(text)


async def subscribe(ws, calendar_ids: list[str], **extra: Any) -> dict[str, Any]:
    await send(ws, {"type": "subscribe", "calendar_ids": calendar_ids, **extra})
    answer = await receive(ws)
    assert answer["type"] == "subscribed", answer
    return answer


async def until_pong(ws) -> list[dict[str, Any]]:
    """Everything the socket got before the answer to a ping (a barrier: frames keep order)."""
    await send(ws, {"type": "ping"})
    seen = []
    while (message := await receive(ws))["type"] != "pong":
        seen.append(message)
    return seen


def announce(service, notification: Notification) -> None:
    for listener in service.publication_listeners:
        listener(notification)


async def store_one(service, calendar_id: str, size: int = 0) -> Notification:
    """A notification published in the store (the syncer's step), not announced yet."""
    store, now = service.store, service.clock.now()
    received = await store.notifications.add(calendar_id, "poll", "exists", received_at=now)
    change = {
        "event_id": f"event-{received.id}",
        "status": "confirmed",
        "updated": "2024-05-01T09:00:00Z",
        "start": "2024-05-02T09:00:00Z",
        "end": "2024-05-02T10:00:00Z",
        "summary": "meeting " + "x" * size,
    }
    return await store.notifications.publish(received.id, [change], False, [], now)


async def publish(service, calendar_id: str, size: int = 0) -> Notification:
    published = await store_one(service, calendar_id, size)
    announce(service, published)
    return published


# -- before the upgrade ------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=20)
async def test_tokens_are_checked_before_the_upgrade(make_service):
    service = await make_service(overrides())
    for token in (None, "wrong-token", API_KEY):
        status, body = await refused(service, token)
        assert status == 401 and body["error"]["code"] == "unauthorized", token
    status, _ = await refused(service, "wrong-token", query=True)
    assert status == 401
    for ws in (await connect(service), await connect(service, LIMITED, query=True)):
        assert (await until_pong(ws)) == []
        ws.close()
    # A plain GET with a good token is told this route speaks WebSocket only.
    status, body = await call(service, "GET", "/ws", key=TOKEN)
    assert status == 400 and body["error"]["code"] == "websocket_required"


@pytest.mark.gen_test(timeout=20)
async def test_origins(make_service):
    service = await make_service(overrides(allowed_origins=["https://app.example.com"]))
    status, body = await refused(service, headers={"Origin": "https://evil.example.com"})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    cross = {"Origin": "https://evil.example.com", "Sec-Fetch-Site": "cross-site"}
    assert (await refused(service, headers=cross))[0] == 403
    for origin in ("https://app.example.com", f"http://127.0.0.1:{service.port}"):
        ws = await connect(service, headers={"Origin": origin})
        assert (await until_pong(ws)) == []
        ws.close()
    # A bad token is told so first, whatever its origin.
    assert (await refused(service, "nope", headers={"Origin": "https://evil.example"}))[0] == 401


@pytest.mark.gen_test(timeout=20)
async def test_a_star_allows_any_origin_but_still_wants_the_token(make_service):
    service = await make_service(overrides(allowed_origins=["*"]))
    for origin in ("https://anywhere.example", "null", "capacitor://localhost"):
        ws = await connect(service, headers={"Origin": origin, "Sec-Fetch-Site": "cross-site"})
        assert (await until_pong(ws)) == [], origin
        ws.close()
    assert (await refused(service, "nope", headers={"Origin": "https://a.example"}))[0] == 401
    # One that is no URL at all is refused (urlsplit raises on it), never a 500.
    for headers in ({"Origin": "http://[::1"}, {"Origin": "http://[zz]", "Sec-Fetch-Site": "none"}):
        status, body = await refused(service, headers=headers)
        assert (status, body["error"]["code"]) == (403, "origin_not_allowed"), headers


@pytest.mark.gen_test(timeout=20)
async def test_origins_match_whatever_their_case_and_default_port(make_service):
    allowed = ["https://App.Example.com:443", "http://b.example", "https://c.example:8443"]
    service = await make_service(overrides(allowed_origins=allowed))
    for origin in (
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM:443",
        "http://b.example:80",
        "https://c.example:8443",
    ):
        ws = await connect(service, headers={"Origin": origin, "Sec-Fetch-Site": "cross-site"})
        assert (await until_pong(ws)) == [], origin
        ws.close()
    for origin in (
        "http://app.example.com",  # another scheme
        "https://app.example.com:8443",  # another port
        "https://c.example",
        "https://app.example.com.evil.example",
        "not an origin",
    ):
        status, body = await refused(service, headers={"Origin": origin})
        assert (status, body["error"]["code"]) == (403, "origin_not_allowed"), origin


@pytest.mark.gen_test(timeout=20)
async def test_a_refused_origin_is_logged_with_the_origin_it_presented(make_service, caplog):
    service = await make_service(overrides(allowed_origins=["https://app.example.com"]))
    caplog.set_level(logging.DEBUG, logger="handlers")
    await refused(
        service, headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    )
    await refused(service, headers={"Sec-Fetch-Site": "cross-site"})
    records = [r for r in caplog.records if r.getMessage() == "websocket_origin_refused"]
    assert [(r.levelno, r.origin) for r in records] == [  # type: ignore[attr-defined]
        (logging.WARNING, "https://evil.example"),
        (logging.WARNING, None),
    ]


@pytest.mark.gen_test(timeout=20)
async def test_max_connections_is_503_before_the_upgrade(make_service):
    service = await make_service(overrides(max_connections=1))
    first = await connect(service)
    status, body = await refused(service)
    assert status == 503 and body["error"]["code"] == "too_many_connections"
    first.close()
    assert await first.read_message() is None  # the server answered the close: slot free
    second = await connect(service)
    assert (await until_pong(second)) == []


# -- the protocol ------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=20)
async def test_subscribe_notification_unsubscribe_ping(make_service):
    service = await make_service(overrides())
    ws = await connect(service)
    answer = await subscribe(ws, [ROOM_A])
    assert answer == {
        "type": "subscribed",
        "calendar_ids": [ROOM_A],
        "store_epoch": await service.store.meta.store_epoch(),
    }
    await publish(service, ROOM_B)  # not subscribed: never sent
    published = await publish(service, ROOM_A)
    message = await receive(ws)
    assert message == {
        "type": "notification",
        "id": published.id,
        "seq": published.seq,
        "calendar_id": ROOM_A,
        "source": "poll",
        "resource_state": "exists",
        "changes": list(published.changes),
        "full_resync": False,
        "received_at": message["received_at"],
    }
    assert message["received_at"].endswith("Z")
    assert await until_pong(ws) == []
    await send(ws, {"type": "unsubscribe", "calendar_ids": [ROOM_A]})
    assert await receive(ws) == {"type": "unsubscribed", "calendar_ids": [ROOM_A]}
    await publish(service, ROOM_A)
    assert await until_pong(ws) == []
    # "*" with an all-seeing token: every calendar, each notification once.
    assert (await subscribe(ws, ["*", ROOM_B]))["calendar_ids"] == ["*", ROOM_B]
    for room in (ROOM_B, ROOM_C):
        await publish(service, room)
    assert [m["calendar_id"] for m in await until_pong(ws)] == [ROOM_B, ROOM_C]
    await send(ws, {"type": "unsubscribe", "calendar_ids": ["*"]})
    assert (await receive(ws))["type"] == "unsubscribed"
    assert service.fanout.subscriptions == 0


@pytest.mark.gen_test(timeout=20)
async def test_forbidden_calendars_are_left_out(make_service):
    service = await make_service(overrides())
    ws = await connect(service, LIMITED)
    assert (await subscribe(ws, [ROOM_A, ROOM_B]))["calendar_ids"] == [ROOM_A]
    error = await receive(ws)
    assert error["type"] == "error" and error["code"] == "forbidden_calendar"
    assert error["calendar_id"] == ROOM_B
    # "*" means every calendar this token may see.
    assert (await subscribe(ws, ["*"]))["calendar_ids"] == [ROOM_A]
    await publish(service, ROOM_B)
    await publish(service, ROOM_A)
    assert [m["calendar_id"] for m in await until_pong(ws)] == [ROOM_A]


@pytest.mark.gen_test(timeout=20)
async def test_max_subscriptions(make_service):
    service = await make_service(overrides(max_subscriptions=2))
    ws = await connect(service)
    assert (await subscribe(ws, [ROOM_A, ROOM_B, ROOM_C]))["calendar_ids"] == [ROOM_A, ROOM_B]
    error = await receive(ws)
    assert error["code"] == "too_many_subscriptions" and error["calendar_ids"] == [ROOM_C]
    assert (await subscribe(ws, [ROOM_A]))["calendar_ids"] == [ROOM_A]  # held already: fine
    assert await until_pong(ws) == []


def long_ids(prefix: str, count: int, length: int = CALENDAR_ID_MAX) -> list[str]:
    return [f"{prefix}{n:04d}".ljust(length, "x") for n in range(count)]


@pytest.mark.gen_test(timeout=20)
async def test_a_socket_s_calendar_ids_are_bounded_in_bytes(make_service):
    service = await make_service(overrides(max_subscriptions=500))
    ws = await connect(service)
    # Each id is as long as PUT /v1/rooms takes; 60 of them fit in a frame.
    ids = long_ids("room-", 180)
    accepted, refused = [], []
    for start in range(0, len(ids), 60):
        accepted += (await subscribe(ws, ids[start : start + 60]))["calendar_ids"]
        if start + 60 > 128:
            error = await receive(ws)
            assert error["code"] == "too_many_subscriptions", error
            refused += error["calendar_ids"]
    bound = 131072  # bytes of calendar ids per socket (at least; more with max_subscriptions)
    assert len(accepted) == bound // CALENDAR_ID_MAX and refused == ids[len(accepted) :]
    assert service.fanout.subscriptions == len(accepted)
    # Room again once some are given back.
    await send(ws, {"type": "unsubscribe", "calendar_ids": accepted[:2]})
    assert (await receive(ws))["type"] == "unsubscribed"
    assert (await subscribe(ws, refused[:3]))["calendar_ids"] == refused[:2]
    assert (await receive(ws))["calendar_ids"] == refused[2:3]
    # Non-ASCII ids count in UTF-8 bytes (what a str of them may cost, give or take).
    other = await connect(service)
    wide = ["\u00e9" * 1000 + f"{n:03d}" for n in range(70)]  # 2003 bytes each
    took = []
    for start in (0, 30, 60):
        frame = {"type": "subscribe", "calendar_ids": wide[start : start + 30]}
        await send(other, json.dumps(frame, ensure_ascii=False))  # 2 bytes an id's é too
        answer = await receive(other)
        took += answer["calendar_ids"]
    assert took == wide[: bound // 2003]
    assert (await receive(other))["calendar_ids"] == wide[bound // 2003 :]


@pytest.mark.gen_test(timeout=20)
async def test_sockets_share_one_copy_of_each_calendar_id(make_service):
    service = await make_service(overrides())
    first, second = await connect(service), await connect(service)
    for ws in (first, second):
        await subscribe(ws, [ROOM_A, ROOM_B])
    held = [sorted(c.calendars) for c in service.fanout.clients]
    assert held[0] == held[1] == [ROOM_A, ROOM_B]
    assert all(a is b for a, b in zip(*held, strict=True))  # the same str objects


@pytest.mark.gen_test(timeout=20)
async def test_the_calendar_index_gives_its_table_back_when_subscriptions_go(make_service):
    service = await make_service(overrides(max_subscriptions=5000))
    ws = await connect(service)
    ids = [f"room-{n:04d}@x" for n in range(3000)]
    await subscribe(ws, ids)
    index = service.fanout.index
    full = sys.getsizeof(index.by_calendar)
    await send(ws, {"type": "unsubscribe", "calendar_ids": ids[10:]})
    assert (await receive(ws))["type"] == "unsubscribed"
    assert len(index.by_calendar) == 10
    assert sys.getsizeof(index.by_calendar) < full / 10  # a dict keeps its table on its own


@pytest.mark.gen_test(timeout=20)
async def test_a_closed_socket_is_freed_without_waiting_for_the_cyclic_gc(make_service):
    service = await make_service(overrides())
    hub = service.fanout
    stays = await connect(service)
    goes = await connect(service)
    await subscribe(goes, long_ids("room-", 50))
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    disconnect = hub.disconnect

    def disconnected(client: Any) -> None:
        disconnect(client)
        gone.set_result(None)

    hub.disconnect = disconnected  # type: ignore[method-assign]
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        goes.close()
        await gone  # resumed after the handler's on_close has returned
        alive = [o for o in gc.get_objects() if type(o) is fanout.Client]
        assert len(alive) == 1, "a closed socket's Client waits for the cyclic GC"
    finally:
        gc.enable()
    assert await until_pong(stays) == []


@pytest.mark.gen_test(timeout=20)
async def test_bad_frames_get_errors_and_the_third_closes_1008(make_service):
    service = await make_service(overrides())
    ws = await connect(service)
    await send(ws, "not json")
    assert (await receive(ws))["code"] == "invalid_json"
    await send(ws, {"type": "subscribe", "calendar_ids": "room"})
    assert (await receive(ws))["code"] == "invalid_message"
    assert await until_pong(ws) == []  # good frames do not reset the count
    await send(ws, {"type": "dance"})
    assert await ws.read_message() is None
    assert ws.close_code == 1008


@pytest.mark.gen_test(timeout=20)
async def test_each_kind_of_bad_frame(make_service):
    service = await make_service(overrides())
    for frame, code in (
        ({"type": "dance"}, "unknown_type"),
        ([1, 2], "invalid_message"),
        ({"type": "subscribe", "calendar_ids": []}, "invalid_message"),
        ({"type": "subscribe", "calendar_ids": [ROOM_A], "after": -1}, "invalid_message"),
        ({"type": "subscribe", "calendar_ids": [ROOM_A], "after": True}, "invalid_message"),
        ({"type": "unsubscribe", "calendar_ids": [""]}, "invalid_message"),
    ):
        ws = await connect(service)
        await send(ws, frame)
        error = await receive(ws)
        assert (error["type"], error["code"]) == ("error", code), frame
        ws.close()
    ws = await connect(service)
    await ws.write_message(b"\x00\x01", binary=True)
    assert (await receive(ws))["code"] == "invalid_message"


@pytest.mark.gen_test(timeout=20)
async def test_an_oversized_frame_closes_1009(make_service):
    service = await make_service(overrides(max_message_size=256))
    ws = await connect(service)
    await send(ws, {"type": "ping", "padding": "x" * 200})  # under the limit
    assert (await receive(ws))["type"] == "pong"
    await send(ws, {"type": "ping", "padding": "x" * 1000})
    assert await ws.read_message() is None
    assert ws.close_code == 1009


@pytest.mark.gen_test(timeout=20)
async def test_large_notifications_use_16_and_64_bit_lengths(make_service):
    service = await make_service(overrides())
    ws = await connect(service)
    await subscribe(ws, [ROOM_A])
    for size in (100, 1000, 70_000):
        published = await publish(service, ROOM_A, size)
        message = await receive(ws)
        assert message["seq"] == published.seq
        assert len(message["changes"][0]["summary"]) == len("meeting ") + size


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_an_event_change_reaches_the_companion_app(make_service, emulator, clock):
    service = await make_service(overrides(), clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", "/v1/rooms/" + quote(ROOM_A), {"firebase_tokens": []})
    assert status == 201
    await emulator.google.drain()
    ws = await connect(service, LIMITED)
    await subscribe(ws, [ROOM_A])
    event = emulator.google.insert_event(ROOM_A, summary="Standup")
    message = await receive(ws)
    assert message["type"] == "notification" and message["calendar_id"] == ROOM_A
    assert message["source"] == "webhook" and message["seq"] == 1
    [change] = message["changes"]
    assert change["event_id"] == event["id"] and change["summary"] == "Standup"
    emulator.google.cancel_event(ROOM_A, event["id"])
    message = await receive(ws)
    assert message["seq"] == 2 and message["changes"][0]["status"] == "cancelled"


# -- replay ------------------------------------------------------------------------------------
async def replay_of(ws) -> tuple[list[int], dict[str, Any]]:
    seqs = []
    while (message := await receive(ws))["type"] == "notification":
        seqs.append(message["seq"])
    assert message["type"] == "replayed", message
    return seqs, message


@pytest.mark.gen_test(timeout=20)
async def test_replay_then_live(make_service):
    service = await make_service(overrides())
    rooms = [ROOM_A, ROOM_B, ROOM_A, ROOM_A, ROOM_B, ROOM_A]
    published = [await publish(service, room) for room in rooms]
    ws = await connect(service)
    await subscribe(ws, [ROOM_A], after=2)
    seqs, replayed = await replay_of(ws)
    assert seqs == [n.seq for n in published if n.calendar_id == ROOM_A and n.seq > 2]
    assert replayed == {"type": "replayed", "count": len(seqs), "complete": True}
    live = await publish(service, ROOM_A)
    assert (await receive(ws))["seq"] == live.seq
    # Nothing newer than `after`: an empty, complete replay.
    other = await connect(service)
    await subscribe(other, ["*"], after=live.seq)
    assert await replay_of(other) == ([], {"type": "replayed", "count": 0, "complete": True})
    assert service.fanout.replays == 2


@pytest.mark.gen_test(timeout=30)
async def test_the_seam_when_publication_happens_between_replay_pages(make_service):
    service = await make_service(overrides())
    before = [await publish(service, room) for room in [ROOM_A, ROOM_B] * 6]
    service.fanout.replay_page = 2
    store = service.store
    read_page = store.notifications.list
    during: list[Notification] = []

    async def read_then_publish(*args: Any, **kwargs: Any) -> list[Notification]:
        page = await read_page(*args, **kwargs)
        if len(during) < 10:  # committed and announced while the replay is under way
            during.append(await publish(service, ROOM_A if len(during) % 2 else ROOM_B))
        return page

    store.notifications.list = read_then_publish  # type: ignore[method-assign]
    ws = await connect(service)
    await subscribe(ws, [ROOM_A, ROOM_B], after=3)
    seqs, replayed = await replay_of(ws)
    store.notifications.list = read_page  # type: ignore[method-assign]
    assert len(during) == 5  # 9 to replay, 2 a page: publication between every two reads
    assert seqs == [n.seq for n in before if n.seq > 3]
    assert replayed["count"] == len(seqs) and replayed["complete"] is True
    after = [await publish(service, ROOM_A) for _ in range(2)]
    live = [m["seq"] for m in await until_pong(ws)]
    assert live == [n.seq for n in during + after]  # each once, in its place, in order


@pytest.mark.gen_test(timeout=30)
async def test_the_seam_under_concurrent_publishers(make_service):
    service = await make_service(overrides())
    for _ in range(30):
        await publish(service, ROOM_A)
    service.fanout.replay_page = 3
    ws = await connect(service)

    async def publishers() -> list[Notification]:
        return list(await asyncio.gather(*(publish(service, ROOM_A) for _ in range(40))))

    racing = asyncio.ensure_future(publishers())
    await subscribe(ws, [ROOM_A], after=5)
    seqs, replayed = await replay_of(ws)
    assert replayed["complete"] is True
    last = max(n.seq for n in await racing)
    seqs += [m["seq"] for m in await until_pong(ws)]
    assert seqs == list(range(6, last + 1))


@pytest.mark.gen_test(timeout=20)
async def test_announcements_out_of_order_still_go_out_in_seq_order(make_service):
    service = await make_service(overrides())
    ws = await connect(service)
    await subscribe(ws, ["*"])
    first, second, third = [await store_one(service, ROOM_A) for _ in range(3)]
    announce(service, second)  # the first one's announcement is late: read from the store
    announce(service, first)
    announce(service, third)
    assert [m["seq"] for m in await until_pong(ws)][:3] == [first.seq, second.seq, third.seq]
    lost = await store_one(service, ROOM_A)  # announced never (its announcer failed)
    later = await store_one(service, ROOM_B)
    announce(service, later)
    assert [(await receive(ws))["seq"] for _ in range(2)] == [lost.seq, later.seq]
    assert await until_pong(ws) == []


class Reads:
    """The store's list_notifications, made to fail (StoreError, as a failing disk or a lost
    database would) from a given call on: nothing else can make the real store fail on cue."""

    def __init__(self, service) -> None:
        self.store = service.store
        self.read = service.store.notifications.list
        self.calls = 0
        self.fail_from: int | None = None
        self.store.notifications.list = self._list  # type: ignore[method-assign]

    def fail(self, after_calls: int = 0) -> None:
        self.fail_from = self.calls + after_calls

    def heal(self) -> None:
        self.fail_from = None

    async def _list(self, *args: Any, **kwargs: Any) -> list[Notification]:
        self.calls += 1
        if self.fail_from is not None and self.calls > self.fail_from:
            raise StoreError("disk I/O error")
        return await self.read(*args, **kwargs)


async def closed_with(ws) -> tuple[list[int], int | None]:
    """The seqs a socket gets before its close, and the close code."""
    seqs = []
    while (text := await ws.read_message()) is not None:
        message = json.loads(text)
        assert message["type"] == "notification", message
        seqs.append(message["seq"])
    return seqs, ws.close_code


@pytest.mark.gen_test(timeout=20)
async def test_a_gap_that_cannot_be_filled_closes_every_subscribed_socket_1011(
    make_service, caplog
):
    service = await make_service(overrides())
    reads = Reads(service)
    star, room_a, room_b, idle = [await connect(service) for _ in range(4)]
    await subscribe(star, ["*"])
    await subscribe(room_a, [ROOM_A])
    await subscribe(room_b, [ROOM_B])  # the missing seq is ROOM_A's, but nobody can know that
    assert await until_pong(idle) == []
    first, second = [await store_one(service, ROOM_A) for _ in range(2)]
    reads.fail()
    announce(service, second)  # seq N+1 before N: N is read from the store, which fails
    for ws in (star, room_a, room_b):
        assert await closed_with(ws) == ([], 1011)
    assert star.close_reason == "notification stream interrupted"
    assert any(r.getMessage() == "fanout_gap_unfilled" for r in caplog.records)
    # A socket with no subscription could miss nothing: it stays, and publication goes on in
    # order from past the gap (the late announcement of N is not sent: it is behind).
    assert await until_pong(idle) == []
    reads.heal()
    await subscribe(idle, ["*"])
    announce(service, first)
    third = await publish(service, ROOM_B)
    assert [m["seq"] for m in await until_pong(idle)] == [third.seq]
    assert service.fanout.connected == 1


@pytest.mark.gen_test(timeout=20)
async def test_what_was_read_before_the_store_failed_goes_out_then_1011(make_service, monkeypatch):
    monkeypatch.setattr(seqorder, "FILL_PAGE", 1)
    service = await make_service(overrides())
    reads = Reads(service)
    ws = await connect(service)
    await subscribe(ws, [ROOM_A])
    stored = [await store_one(service, ROOM_A) for _ in range(4)]
    reads.fail(after_calls=1)  # the first page of the fill is read, the second fails
    announce(service, stored[3])
    assert await closed_with(ws) == ([stored[0].seq], 1011)
    # Read in part, but nothing missing: the stream is whole, nobody is closed.
    ws = await connect(service)
    await subscribe(ws, [ROOM_A])
    stored = [await store_one(service, ROOM_A) for _ in range(2)]
    reads.fail(after_calls=1)
    announce(service, stored[1])
    assert [(await receive(ws))["seq"] for _ in stored] == [n.seq for n in stored]
    assert await until_pong(ws) == []


@pytest.mark.gen_test(timeout=20)
async def test_a_replay_the_store_fails_closes_1011_rather_than_skip(make_service):
    service = await make_service(overrides())
    reads = Reads(service)
    published = [await publish(service, ROOM_A) for _ in range(3)]
    ws = await connect(service)
    await subscribe(ws, [ROOM_A, ROOM_B])
    reads.fail()
    await send(ws, {"type": "subscribe", "calendar_ids": [ROOM_C], "after": 0})
    assert (await receive(ws))["type"] == "subscribed"
    error = await receive(ws)
    assert (error["type"], error["code"]) == ("error", "replay_failed")
    assert await closed_with(ws) == ([], 1011)
    # The client resumes with `after` once the store is back.
    reads.heal()
    ws = await connect(service)
    await subscribe(ws, [ROOM_A], after=published[0].seq)
    assert (await replay_of(ws))[0] == [n.seq for n in published[1:]]


@pytest.mark.gen_test(timeout=20)
async def test_replay_is_incomplete_when_history_does_not_reach_back(make_service):
    service = await make_service(overrides())
    for _ in range(3):
        await publish(service, ROOM_A)
    now = service.clock.now()
    assert await service.store.notifications.purge(now + 10, now + 10) == 3
    kept = await publish(service, ROOM_A)
    epoch = await service.store.meta.store_epoch()
    cases = [
        ({"after": 1}, [kept.seq], False),  # purged: retention no longer reaches back
        ({"after": 3}, [kept.seq], True),
        ({"after": 3, "store_epoch": epoch}, [kept.seq], True),
        ({"after": 3, "store_epoch": "another-store"}, [], False),
        ({"after": 1000}, [], False),  # a seq this store never gave
    ]
    for extra, expected, complete in cases:
        ws = await connect(service)
        await subscribe(ws, [ROOM_A], **extra)
        seqs, replayed = await replay_of(ws)
        assert (seqs, replayed["complete"]) == (expected, complete), extra
        ws.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_later_subscribe_with_after_keeps_the_socket_in_order(make_service):
    service = await make_service(overrides())
    early_b = await publish(service, ROOM_B)
    ws = await connect(service)
    await subscribe(ws, [ROOM_A])
    live = await publish(service, ROOM_A)
    assert (await receive(ws))["seq"] == live.seq
    late_b = await publish(service, ROOM_B)
    # ROOM_B from the start: early_b is older than what the socket has sent, so it is not sent
    # (order holds) and the replay says it is incomplete; late_b comes in its place.
    await subscribe(ws, [ROOM_B], after=0)
    seqs, replayed = await replay_of(ws)
    assert early_b.seq < live.seq < late_b.seq
    assert (seqs, replayed["complete"]) == ([late_b.seq], False)


# -- slow consumers, pings, shutdown, metrics ---------------------------------------------------
async def raw_connect(service, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket client by hand, reading only when told to."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", service.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)  # byte by byte: read nothing past the headers
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def raw_send(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = bytes((0x81, 0x80 | len(payload))) + mask + masked
    await asyncio.get_running_loop().sock_sendall(sock, frame)


class RawReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    async def _fill(self, size: int) -> bool:
        while len(self.data) < size:
            try:
                chunk = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self.data += chunk
        return True

    async def frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame, None at the end of the stream."""
        if not await self._fill(2):
            return None
        opcode, size = self.data[0] & 0x0F, self.data[1] & 0x7F
        assert self.data[0] & 0xF0 == 0x80 and not self.data[1] & 0x80  # FIN, unmasked
        start = 2
        if size == 126:
            if not await self._fill(4):
                return None
            (size,) = struct.unpack("!H", self.data[2:4])
            start = 4
        elif size == 127:
            if not await self._fill(10):
                return None
            (size,) = struct.unpack("!Q", self.data[2:10])
            start = 10
        if not await self._fill(start + size):
            return None
        payload, self.data = self.data[start : start + size], self.data[start + size :]
        return opcode, payload


@pytest.mark.gen_test(timeout=60)
async def test_a_slow_consumer_is_closed_and_nobody_waits_for_it(make_service):
    service = await make_service(overrides(max_queue=4))
    slow = await raw_connect(service, rcvbuf=4096)
    reader = RawReader(slow)
    await raw_send(slow, {"type": "subscribe", "calendar_ids": ["*"]})
    opcode, payload = await reader.frame() or (0, b"")
    assert opcode == 1 and json.loads(payload)["type"] == "subscribed"
    # From here the slow client reads nothing.
    good = await connect(service)
    await subscribe(good, ["*"])
    sent: list[int] = []
    for _ in range(400):  # ~60 KB each: the kernel's buffers fill long before the end
        sent.append((await publish(service, ROOM_A, size=60_000)).seq)
        assert (await receive(good))["seq"] == sent[-1]
        if service.fanout.slow_consumer_closes:
            break
    assert service.fanout.slow_consumer_closes == 1
    for _ in range(5):  # the good client keeps getting every message at once
        sent.append((await publish(service, ROOM_B, size=60_000)).seq)
        assert (await receive(good))["seq"] == sent[-1]
    # ...while the slow one, which takes no close frame, waits out its second before the abort.
    assert service.fanout.connected == 2
    # The slow client's stream ends: a 4008 close frame if it came through, else an abort.
    last = None
    while (frame := await reader.frame()) is not None:
        last = frame
    assert last is not None
    if last[0] == 0x8:
        assert struct.unpack("!H", last[1][:2])[0] == 4008
    else:
        assert last[0] == 0x1  # cut off after some notification: what a 1006 looks like
    slow.close()
    assert await until_pong(good) == []
    assert service.fanout.connected == 1


def queued_bytes(sock: socket.socket) -> int:
    """Bytes the kernel holds in a socket's send queue, not yet acknowledged (Linux)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ and SO_SNDBUF doubling: Linux")
@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_never_reads_holds_a_bounded_kernel_send_buffer(make_service):
    service = await make_service(overrides())
    send_buffer = service.config.websocket.send_buffer
    assert send_buffer == 131072
    silent = await raw_connect(service, rcvbuf=4096)
    reader = RawReader(silent)
    await raw_send(silent, {"type": "subscribe", "calendar_ids": ["*"]})
    assert json.loads((await reader.frame() or (0, b""))[1])["type"] == "subscribed"
    [client] = [c for c in service.fanout.clients if c.subscription_count]
    stream = client.outbox.stream
    server_side = stream.socket
    # Linux doubles what it is given (the rest is for its own bookkeeping).
    assert server_side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * send_buffer
    good = await connect(service)
    await subscribe(good, ["*"])
    for _ in range(200):  # 60 KB each: without the cap the kernel takes some 3 MB first
        published = await publish(service, ROOM_A, size=60_000)
        assert (await receive(good))["seq"] == published.seq  # both outboxes were flushed
        if stream._total_write_done_index < stream._total_write_index:
            break  # the kernel takes no more: the rest waits in the stream (max_queue counts it)
    else:
        raise AssertionError("the kernel took everything")
    # One write may pass the bound before the kernel refuses the next.
    assert queued_bytes(server_side) <= 2 * send_buffer + 65536
    assert service.fanout.slow_consumer_closes == 0
    silent.close()


@pytest.mark.gen_test(timeout=20)
async def test_server_pings_and_drops_silent_clients(make_service):
    service = await make_service(overrides())
    silent = await raw_connect(service)
    reader = RawReader(silent)
    alive = await connect(service)
    assert await until_pong(alive) == []
    service.fanout.ping_all()
    assert await reader.frame() == (0x9, b"")  # a ping, not answered
    assert await until_pong(alive) == []  # tornado's client answered its ping; it talks too
    service.fanout.ping_all()
    opcode, payload = await reader.frame() or (0, b"")
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1000
    assert payload[2:] == b"ping timed out"
    silent.close()
    assert await until_pong(alive) == []


@pytest.mark.gen_test(timeout=20)
async def test_shutdown_closes_every_socket_with_1001(make_service):
    service = await make_service(overrides())
    sockets = [await connect(service) for _ in range(3)]
    await subscribe(sockets[0], ["*"])
    await service.stop()
    for ws in sockets:
        assert await ws.read_message() is None
        assert ws.close_code == 1001


@pytest.mark.gen_test(timeout=20)
async def test_metrics(make_service):
    service = await make_service(overrides())
    ws = await connect(service)
    await subscribe(ws, [ROOM_A, ROOM_B], after=0)
    await replay_of(ws)
    await publish(service, ROOM_A)
    await receive(ws)
    _, text = await call(service, "GET", "/metrics")
    assert "mrm_push_websocket_clients 1.0" in text
    assert "mrm_push_websocket_subscriptions 2.0" in text
    assert "mrm_push_websocket_frames_sent_total 3.0" in text  # subscribed, replayed, one
    assert "mrm_push_websocket_replays_total 1.0" in text
    assert "mrm_push_websocket_slow_consumer_closes_total 0.0" in text
