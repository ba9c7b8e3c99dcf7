"""No log line holds a whole secret, whatever the route or the error (contract 2 and 7): runs
the service through many routes and failures with the real JSON formatter, then scans every
line written for every secret used."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from daemon.logs import JsonFormatter
from tests.fixtures import API_KEY, backend, call, clock, emulator, make_service  # noqa: F401
from tests.test_refresh import BACKEND_TOKEN

ROOM_A = "room-a@resource.calendar.google.com"
ROOM_B = "room-b@resource.calendar.google.com"
SUBSCRIBER = "subscriber-token-for-the-companion-app-0123456789"
FILE_SUBSCRIBER = "subscriber-token-read-from-its-file-9876543210"
METRICS_TOKEN = "metrics-token-for-prometheus-0123456789"
WRONG_CHANNEL_TOKEN = base64.urlsafe_b64encode(hashlib.sha384(b"wrong").digest()).decode()


def fcm_token(name: str) -> str:
    """A registration token shaped like FCM's: 22 characters, ':', then APA91b and 134 more."""
    digest = b"".join(hashlib.sha512(f"{name}-{i}".encode()).digest() for i in range(3))
    text = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return f"{text[:11]}{name[:11]:_<11}:APA91b{text[22:156]}"


TABLETS = [fcm_token(f"tablet{i}") for i in range(6)]
LEGACY_TABLET = fcm_token("legacy")
SHORT_TABLET = "tablet-token-short-0123"  # nothing in its shape says "token"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every record, from every logger at every level, through the real JSON formatter."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, member in value.items():
            yield key
            yield from strings_in(member)
    elif isinstance(value, list):
        for member in value:
            yield from strings_in(member)


async def run_everything(service, emulator, backend, tmp_path) -> None:
    """Rooms, tokens, legacy calls, webhooks, /ws, a failing handler, FCM sends and refusals."""
    path_a, path_b = "/v1/rooms/" + quote(ROOM_A), "/v1/rooms/" + quote(ROOM_B)
    assert (await call(service, "PUT", path_a, {"firebase_tokens": TABLETS[:2]}))[0] == 201
    assert (await call(service, "PUT", path_b, {"firebase_token": TABLETS[2]}))[0] == 201
    await emulator.google.drain()
    assert (await call(service, "POST", f"{path_a}/tokens/{TABLETS[3]}"))[0] == 200
    assert (await call(service, "DELETE", f"{path_a}/tokens/{TABLETS[3]}"))[0] == 204
    assert (await call(service, "POST", f"{path_a}/tokens/{TABLETS[4]}", key=None))[0] == 401
    assert (await call(service, "POST", f"/v1/rooms/nowhere/tokens/{TABLETS[4]}"))[0] == 404
    assert (await call(service, "GET", path_a + "?full=1"))[0] == 200
    # Legacy routes, with the token in the query string, allowed and refused.
    query = urlencode({"calendar_id": ROOM_B, "firebase_token": LEGACY_TABLET})
    assert (await call(service, "GET", "/add_room?" + query))[0] == 200
    assert (await call(service, "GET", "/token?" + query))[0] == 200
    assert (await call(service, "GET", "/token?" + query, key=None))[0] == 401
    assert (await call(service, "POST", "/add_room?" + query, key="not-" + API_KEY))[0] == 401
    assert (await call(service, "GET", "/refresh"))[0] == 200  # the backend, with its token
    await emulator.google.drain()
    # Webhooks: the emulator's own (right token), then a wrong token and a wrong resource id.
    [channel] = await service.store.channels.list(ROOM_A)
    emulator.fcm.set_state(TABLETS[1], "unregistered")
    emulator.google.insert_event(ROOM_A, summary="Standup")
    await emulator.fcm.wait_for(TABLETS[0], 1, 10)
    await emulator.fcm.wait_for_attempts(TABLETS[1], 1, 10)
    for token, resource in ((WRONG_CHANNEL_TOKEN, channel.resource_id), (channel.token, "nope")):
        headers = {
            "X-Goog-Channel-ID": channel.id,
            "X-Goog-Message-Number": "999",
            "X-Goog-Resource-ID": resource,
            "X-Goog-Resource-State": "exists",
            "X-Goog-Channel-Token": token,
        }
        assert (await call(service, "POST", "/notifications", key=None, headers=headers))[0] == 403
    # The companion app, with its token in the query string (and a wrong one).
    url = f"ws://127.0.0.1:{service.port}/ws?access_token="
    ws = await websocket_connect(HTTPRequest(url + quote(SUBSCRIBER)))
    await ws.write_message(json.dumps({"type": "subscribe", "calendar_ids": ["*"], "after": 0}))
    while json.loads(await ws.read_message())["type"] != "replayed":
        pass
    ws.close()
    with pytest.raises(HTTPClientError):
        await websocket_connect(HTTPRequest(url + quote(SUBSCRIBER[::-1])))
    # A handler failing with every kind of secret in its exception's message.
    secrets_in_message = f"{TABLETS[5]} {API_KEY} {channel.token} {SUBSCRIBER} {BACKEND_TOKEN}"

    async def failing_add(calendar_id: str, token: str) -> None:
        raise RuntimeError(f"cannot add {token}: {secrets_in_message}")

    service.rooms.add_token = failing_add
    assert (await call(service, "POST", f"{path_a}/tokens/{TABLETS[5]}"))[0] == 500
    assert (await call(service, "POST", f"{path_a}/tokens/{SHORT_TABLET}"))[0] == 500
    # Metrics with its token, and a wrong one.
    assert (await call(service, "GET", "/metrics", key=METRICS_TOKEN))[0] == 200
    assert (await call(service, "GET", "/metrics", key=API_KEY))[0] == 401
    await service.delivery.drain(5)
    await service.syncer.drain(5)
    await emulator.google.drain()


@pytest.mark.gen_test(timeout=60)
async def test_no_log_line_holds_a_whole_secret(
    make_service, emulator, clock, backend, tmp_path, json_lines
):
    (tmp_path / "subscriber.token").write_text(FILE_SUBSCRIBER + "\n")
    backend.serve_rooms((ROOM_A, TABLETS[0]), (ROOM_B, TABLETS[2]))
    service = await make_service(
        {
            "auth": {
                "subscribers": [
                    {"token": SUBSCRIBER, "calendars": ["*"]},
                    {"token_file": str(tmp_path / "subscriber.token"), "calendars": ["*"]},
                ],
                "metrics_token": METRICS_TOKEN,
            },
            "backend": {"url": backend.url, "token": BACKEND_TOKEN},
        },
        clock=clock,
        emulator=emulator,
    )
    await run_everything(service, emulator, backend, tmp_path)
    key = json.loads((tmp_path / "service-account.json").read_text())
    pem_lines = [line for line in key["private_key"].splitlines() if "-----" not in line]
    channel_tokens = [c.token for c in await service.store.channels.list()]
    assert channel_tokens
    secrets = {
        "api key": [API_KEY],
        "subscriber token": [SUBSCRIBER, FILE_SUBSCRIBER],
        "metrics token": [METRICS_TOKEN],
        "backend token": [BACKEND_TOKEN],
        "channel token": channel_tokens,
        "fcm token": [*TABLETS, LEGACY_TABLET, SHORT_TABLET],
        "private key": [key["private_key"], *pem_lines],
    }
    lines = json_lines.getvalue().splitlines()
    assert len(lines) > 50
    for line in lines:
        entry = json.loads(line)  # one JSON object per line, always
        texts = [line, *strings_in(entry)]
        for kind, values in secrets.items():
            for secret in values:
                assert not any(secret in text for text in texts), (kind, secret[-8:], line[:300])
    # What operators still see: shortened tokens, the traceback, the refused calls.
    entries = [json.loads(line) for line in lines]
    paths = {e.get("path") for e in entries if e["event"] == "request"}
    assert f"/v1/rooms/{quote(ROOM_A)}/tokens/…{TABLETS[3][-8:]}" in paths
    failures = [e for e in entries if e["event"] == "handler_error"]
    assert len(failures) == 2
    for failure, tablet in zip(failures, (TABLETS[5], SHORT_TABLET), strict=True):
        assert f"RuntimeError: cannot add …{tablet[-8:]}" in failure["traceback"]
    assert any(e["event"] == "legacy_call_refused" for e in entries)
    assert any(e["event"] == "fcm_token_dropped" for e in entries)
