"""Rooms through the management API, with real channels made at the Google emulator."""

from __future__ import annotations

from urllib.parse import quote

import pytest

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
    assert await service.store.get_sync_token(ROOM) is not None
