"""Long and multi-byte calendar ids get their webhooks (X-Goog-Resource-URI may reach 8 KB and
beyond what the longest id PUT accepts needs); every other X-Goog-* header keeps the 1 KB rule."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from daemon.ids import CALENDAR_ID_MAX
from handlers.webhook import HEADER_MAX, RESOURCE_URI_MAX
from tests.fixtures import call, clock, emulator, make_service  # noqa: F401
from tests.test_webhook import google_headers, hook, notifications, real_channel

CJK_300 = "会議室" * 100  # 300 characters, 900 bytes of UTF-8, 2,700 once percent-encoded
# At the limit, with the widest characters UTF-8 has (4 bytes, 12 once percent-encoded).
WIDEST = ("\U0001f4c5" * CALENDAR_ID_MAX)[: CALENDAR_ID_MAX - 9] + "@x.google"
RESOURCE_URI = "https://www.googleapis.com/calendar/v3/calendars/{}/events?alt=json"


def resource_uri(calendar_id: str) -> str:
    """X-Goog-Resource-URI as Google sends it: the calendar id percent-encoded in the path."""
    return RESOURCE_URI.format(quote(calendar_id, safe=""))


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "calendar_id",
    [CJK_300, "é" * CALENDAR_ID_MAX, "会" * CALENDAR_ID_MAX, WIDEST],
    ids=["300-cjk", "1024-two-byte", "1024-cjk", "1024-four-byte"],
)
async def test_a_long_multibyte_calendar_id_receives_its_webhooks(
    make_service, emulator, clock, calendar_id
):
    assert len(calendar_id) <= CALENDAR_ID_MAX
    assert len(resource_uri(calendar_id).encode()) > HEADER_MAX
    service = await make_service(clock=clock, emulator=emulator)
    # The emulator's own `sync` call must get through for the channel to be confirmed.
    channel = await real_channel(service, emulator, calendar_id)
    [sync] = [w for w in emulator.google.webhooks if w.calendar_id == calendar_id]
    assert sync.status == 200
    emulator.google.insert_event(calendar_id, summary="Booked", start=clock.now() + 3600)
    await emulator.google.drain()
    [attempt] = [w for w in emulator.google.webhooks if w.state == "exists"]
    assert attempt.status == 200 and attempt.channel_id == channel.id
    await service.syncer.drain(5)
    status, page = await call(service, "GET", "/v1/notifications?calendar_id=" + quote(calendar_id))
    assert status == 200
    [published] = page["notifications"]
    assert published["calendar_id"] == calendar_id and published["source"] == "webhook"
    assert published["changes"][0]["summary"] == "Booked"


@pytest.mark.gen_test(timeout=30)
async def test_the_emulator_sends_the_resource_uri_as_google_does(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await real_channel(service, emulator, CJK_300)
    [channel] = emulator.google.channels(CJK_300)
    assert channel["resource_uri"] == resource_uri(CJK_300)


@pytest.mark.gen_test(timeout=30)
async def test_the_resource_uri_bound_and_the_1_kb_rule_for_the_others(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    good = google_headers(channel, 5)
    # The longest id PUT accepts fits, with room for Google's query parameters.
    assert len(resource_uri(WIDEST).encode()) + 256 <= RESOURCE_URI_MAX
    assert RESOURCE_URI_MAX >= 8192
    status, body = await hook(
        service, {**good, "X-Goog-Resource-URI": "u" * (RESOURCE_URI_MAX + 1)}
    )
    assert status == 400 and body["error"]["code"] == "invalid_header"
    assert f"{RESOURCE_URI_MAX} bytes" in body["error"]["message"]
    for name in ("X-Goog-Channel-Token", "X-Goog-Channel-Expiration", "X-Goog-Channel-ID"):
        status, body = await hook(service, {**good, name: "a" * (HEADER_MAX + 1)})
        assert status == 400 and f"{HEADER_MAX} bytes" in body["error"]["message"], name
    assert await notifications(service) == []
    status, _ = await hook(service, {**good, "X-Goog-Resource-URI": "u" * RESOURCE_URI_MAX})
    assert status == 200
    assert len(await notifications(service)) == 1
