"""Bad input of every kind over every route: a 4xx with the error shape, never a 500, and
nothing changed (contract 2, bad input)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import pytest

from daemon.app import Service
from tests.fixtures import API_KEY, call, clock, emulator, make_service  # noqa: F401
from tests.test_websocket import TOKEN, connect, overrides, receive, send

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
TABLET = "tablet-token-" + "a" * 40

DEEP = "[" * 5000 + "]" * 5000
JUST_TOO_DEEP = "[" * 32 + "]" * 32  # 33 levels inside an object: the contract allows 32
HUGE_LENGTH = "9" * 5000

# (method, path, raw body or None, whether the API key is sent)
JSON_BODIES: list[tuple[str, str, bytes]] = [
    ("PUT", PATH, rb'{"name": "\ud800"}'),
    ("PUT", PATH, rb'{"name": "ok \udfff"}'),
    ("PUT", PATH, rb'{"\ud800": 1}'),
    ("PUT", PATH, rb'{"firebase_tokens": ["\ud800"]}'),
    ("PUT", PATH, b'{"name": "\xed\xa0\x80"}'),  # a surrogate encoded as UTF-8 bytes
    ("PUT", PATH, b'{"name": "caf\xe9"}'),  # Latin-1, not UTF-8
    ("PUT", PATH, rb'{"name": "a\u0000b"}'),
    ("PUT", PATH, rb'{"name": "bell \u0007"}'),
    ("PUT", PATH, rb'{"name": "del \u007f"}'),
    ("PUT", PATH, rb'{"name": "c1 \u0085"}'),
    ("PUT", PATH, ('{"name": ' + DEEP + "}").encode()),
    ("PUT", PATH, DEEP.encode()),
    ("PUT", PATH, ('{"name": "x", "firebase_tokens": ' + JUST_TOO_DEEP + "}").encode()),
    ("PUT", PATH, ("{" * 2000).encode()),
    ("PUT", PATH, b'{"name": 1' + b"0" * 5000 + b"}"),
    ("PUT", PATH, b'{"name": NaN}'),
    ("POST", "/add_room", rb'{"calendar_id": "\ud800"}'),
    ("POST", "/add_room", rb'{"calendar_id": "x\u0000y@resource.calendar.google.com"}'),
    ("POST", "/add_room", rb'{"calendar_id": "room-9@x", "firebase_token": "\ud800"}'),
    ("POST", "/add_room", ('{"calendar_id": ' + DEEP + "}").encode()),
    ("POST", "/token", ('{"calendar_id": "' + ROOM + '", "firebase_token": "\\udc00"}').encode()),
    ("POST", "/token", DEEP.encode()),
    ("POST", "/refresh", ('{"dry_run": ' + DEEP + "}").encode()),
]

QUERIES: list[tuple[str, str]] = [
    ("GET", "/v1/notifications?after=--1"),
    ("GET", "/v1/notifications?after=-"),
    ("GET", "/v1/notifications?after=%D9%A3"),  # ARABIC-INDIC DIGIT THREE
    ("GET", "/v1/notifications?after=%EF%BC%91"),  # FULLWIDTH DIGIT ONE
    ("GET", "/v1/notifications?after=%C2%B2"),  # SUPERSCRIPT TWO: isdigit() but not int()
    ("GET", "/v1/notifications?limit=%D9%A3"),
    ("GET", "/v1/notifications?after=+1"),
    ("GET", "/v1/notifications?after=%201"),
    ("GET", "/v1/notifications?after=1_0"),
    ("GET", "/v1/notifications?after=0x1"),
    ("GET", "/v1/notifications?after=" + HUGE_LENGTH),
    ("GET", "/v1/notifications?limit=" + "1" * 25),
    ("GET", "/v1/notifications?after=%ED%A0%80"),
    ("GET", "/v1/notifications?calendar_id=a%00b"),
    ("GET", "/v1/notifications?calendar_id=%ED%A0%80"),
    ("GET", "/v1/notifications?calendar_id=.."),
    ("POST", "/v1/channels/renew?calendar_id=a%00b"),
    ("POST", "/v1/channels/renew?calendar_id=%0A"),
    ("POST", "/v1/channels/renew?calendar_id=.."),
    ("PUT", "/v1/rooms/%2E%2E"),
    ("PUT", "/v1/rooms/%2E"),
    ("PUT", "/v1/rooms/.."),
    ("GET", "/v1/rooms/%2E%2E"),
    ("DELETE", "/v1/rooms/%2E"),
    ("PUT", "/v1/rooms/a%C2%85b"),  # a C1 control character
    ("PUT", "/v1/rooms/%ED%A0%80"),
    ("POST", "/v1/rooms/%2E%2E/tokens/" + TABLET),
    ("POST", PATH + "/tokens/%ED%A0%80"),
    ("POST", PATH + "/tokens/a%00b"),
    ("GET", "/add_room?calendar_id=.."),
    ("GET", "/add_room?calendar_id=."),
    ("GET", "/add_room?calendar_id=%ED%A0%80"),
    ("GET", "/add_room?calendar_id=a%00b"),
    ("GET", "/add_room?calendar_id=a%C2%9Fb"),
    ("GET", "/add_room?calendar_id=" + quote(ROOM) + "&firebase_token=%ED%A0%80"),
    ("GET", "/add_room?calendar_id=" + quote(ROOM) + "&firebase_token=t%00t"),
    ("GET", "/token?calendar_id=" + quote(ROOM) + "&firebase_token=%ED%A0%80"),
    ("GET", "/token?calendar_id=%7F&firebase_token=" + TABLET),
    ("DELETE", "/delete_room?calendar_id=%ED%A0%80"),
    ("DELETE", "/delete_room?calendar_id=.."),
    ("GET", "/refresh?dry_run=%ED%A0%80"),
    # A flag read only after the store was changed must still refuse first.
    ("GET", "/add_room?calendar_id=" + quote(ROOM) + "&full=%FF"),
    ("PUT", PATH + "?full=%FF"),
    ("GET", "/add_room?calendar_id=" + quote(ROOM) + "&other=%FF"),
]

# Content-Length values Tornado or our own prepare() cannot take, on every kind of route.
LENGTH_ROUTES = [
    ("PUT", PATH, True),
    ("PUT", PATH, False),
    ("GET", "/healthz", False),
    ("GET", "/metrics", False),
    ("GET", "/ws", False),
    ("POST", "/notifications", False),
    ("GET", "/add_room", False),
    ("GET", "/no/such/route", False),
]
BAD_LENGTHS = [HUGE_LENGTH, "99999999999999999999999", "-1", "+5", "0x10", "1, 2", "\u0663"]
# Framing Tornado refuses with a bare 400 (request smuggling): answered in our shape instead.
BAD_FRAMING = [
    "Transfer-Encoding: gzip\r\n",
    "Transfer-Encoding: chunked, gzip\r\n",
    "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
]


async def state(service: Service, emulator: Any) -> Any:
    """Everything a request could change: the store's contents and the calls made to Google."""
    store = service.store
    return (
        await store.rooms.list(),
        await store.channels.list(),
        await store.notifications.list(include_unpublished=True, limit=500, with_deliveries=True),
        await store.channels.list_stops(),
        await store.rooms.tombstoned_tokens(ROOM, service.clock.now()),
        len(emulator.google.calls),
    )


def assert_error_shape(status: int, body: Any, what: Any) -> None:
    assert 400 <= status < 500, (status, body, what)
    assert isinstance(body, dict), (status, body, what)
    error = body["error"]
    assert error["status"] == status and error["code"] and error["message"], what


async def raw_request(service: Service, head: bytes) -> tuple[int, Any]:
    """One request written byte for byte (the HTTP client would fix its Content-Length);
    the answer is read by its own Content-Length, not by waiting for the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(head)
        await writer.drain()
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    status = int(status_line.split()[1])
    text = body.decode()
    return status, json.loads(text) if text else None


@pytest.mark.gen_test(timeout=30)
async def test_bad_input_on_every_route_is_a_4xx_and_changes_nothing(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    status, _ = await call(service, "PUT", PATH, {"firebase_tokens": [TABLET], "name": "One"})
    assert status == 201
    await emulator.google.drain()
    before = await state(service, emulator)
    for method, path, raw in JSON_BODIES:
        status, body = await call(service, method, path, raw=raw)
        assert_error_shape(status, body, (method, path, raw[:60]))
    for method, path in QUERIES:
        status, body = await call(service, method, path)
        assert_error_shape(status, body, (method, path[:80]))
    for method, path, with_key in LENGTH_ROUTES:
        for length in BAD_LENGTHS:
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            if with_key:
                head += f"Authorization: Bearer {API_KEY}\r\n"
            head += f"Content-Length: {length}\r\n\r\n"
            status, body = await raw_request(service, head.encode())
            assert_error_shape(status, body, (method, path, length[:30]))
        for framing in BAD_FRAMING:
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            status, body = await raw_request(service, (head + framing + "\r\n").encode())
            assert_error_shape(status, body, (method, path, framing))
    await emulator.google.drain()
    assert await state(service, emulator) == before
    # The service still answers after all that.
    status, room = await call(service, "GET", PATH + "?full=1")
    assert status == 200 and room["name"] == "One" and room["firebase_tokens"] == [TABLET]


@pytest.mark.gen_test(timeout=20)
async def test_good_integers_and_bodies_still_pass(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    nested = "[" * 31 + '"x"' + "]" * 31  # 32 levels with the object around it: allowed
    status, body = await call(service, "PUT", PATH, raw=b'{"name": "Blue", "firebase_tokens": []}')
    assert status == 201, body
    status, body = await call(service, "PUT", PATH, raw=('{"colour": ' + nested + "}").encode())
    assert status == 400 and body["error"]["code"] == "unknown_field"  # parsed, then refused
    status, body = await call(service, "PUT", PATH, {"name": "Caf\u00e9 \U0001f600"})
    assert status == 200 and body["name"] == "Caf\u00e9 \U0001f600"
    status, page = await call(service, "GET", "/v1/notifications?after=0007&limit=500")
    assert status == 200 and page["next_after"] == 7
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=20)
async def test_bad_websocket_frames_get_an_error_and_the_socket_lives(make_service):
    service = await make_service(overrides())
    frames = [
        DEEP,
        '{"type": "subscribe", "calendar_ids": ' + JUST_TOO_DEEP + "}",
        '{"type": "subscribe", "calendar_ids": ["\\ud800"]}',
        '{"type": "subscribe", "calendar_ids": ["a\\u0000b"]}',
        '{"type": "subscribe", "calendar_ids": [".."]}',
        '{"type": "subscribe", "calendar_ids": ["x"], "after": 1' + "0" * 5000 + "}",
        '{"type": "\\ud800"}',
    ]
    for frame in frames:
        ws = await connect(service, TOKEN)
        await send(ws, frame)
        answer = await receive(ws)
        assert answer["type"] == "error" and answer["code"], (frame[:60], answer)
        await send(ws, {"type": "ping"})
        assert await receive(ws) == {"type": "pong"}, frame[:60]
        ws.close()
    assert service.fanout.subscriptions == 0
