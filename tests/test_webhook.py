"""Google's webhook over real HTTP: every row of the contract's table and the bad-input rules."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import re
from typing import Any
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.httputil import HTTPHeaders

from daemon.app import Service
from storage.base import Channel, Notification, StoreUnavailable
from tests.fixtures import call, clock, emulator, make_service  # noqa: F401

ROOM = "room-1@resource.calendar.google.com"
WEBHOOK = "/notifications"
REQUIRED = (
    "X-Goog-Channel-ID",
    "X-Goog-Message-Number",
    "X-Goog-Resource-ID",
    "X-Goog-Resource-State",
)
INT64_MAX = 2**63 - 1


# -- helpers ---------------------------------------------------------------------------------
async def real_channel(service: Service, emulator: Any, calendar_id: str = ROOM) -> Channel:
    """A room made through the API, its channel watched at the emulator and confirmed by the
    emulator's own `sync` webhook (message number 1)."""
    status, room = await call(service, "PUT", "/v1/rooms/" + quote(calendar_id), {"name": "R"})
    assert status == 201, room
    await emulator.google.drain()
    channel = await service.store.channels.get(room["channel"]["id"])
    assert channel is not None
    assert channel.state == "active" and channel.confirmed and channel.resource_id
    assert channel.last_message_number == 1
    return channel


async def pending_channel(
    service: Service, calendar_id: str, channel_id: str, resource_id: str = ""
) -> Channel:
    """A channel stored as `create_channel` stores it before `events.watch` answers."""
    now = service.clock.now()
    channel = Channel(
        id=channel_id,
        calendar_id=calendar_id,
        resource_id=resource_id,
        token="token-of-" + channel_id,
        expiration=None,
        state="pending",
        confirmed=False,
        last_message_number=0,
        last_error=None,
        created_at=now,
        updated_at=now,
    )
    await service.store.channels.insert(channel)
    return channel


def google_headers(channel: Channel, number: int | str, state: str = "exists") -> dict[str, str]:
    """What Google sends for `channel` (the emulator's header set)."""
    return {
        "X-Goog-Channel-ID": channel.id,
        "X-Goog-Message-Number": str(number),
        "X-Goog-Resource-ID": channel.resource_id,
        "X-Goog-Resource-State": state,
        "X-Goog-Resource-URI": "https://www.googleapis.com/calendar/v3/calendars/"
        + quote(channel.calendar_id, safe="")
        + "/events?alt=json",
        "X-Goog-Channel-Token": channel.token,
        "X-Goog-Channel-Expiration": email.utils.formatdate(1_800_600_000, usegmt=True),
    }


async def hook(service: Service, headers: dict[str, str]) -> tuple[int, Any]:
    return await call(service, "POST", WEBHOOK, key=None, headers=headers)


async def hook_raw(service: Service, pairs: list[tuple[str, str]]) -> int:
    """A webhook call with headers given as pairs, so that one name can repeat."""
    headers = HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    response = await AsyncHTTPClient().fetch(
        service.base_url + WEBHOOK, method="POST", body=b"", headers=headers, raise_error=False
    )
    return response.code


async def notifications(service: Service) -> list[Notification]:
    return await service.store.notifications.list(
        include_unpublished=True, limit=500, with_deliveries=True
    )


async def last_number(service: Service, channel: Channel) -> int:
    stored = await service.store.channels.get(channel.id)
    assert stored is not None
    return stored.last_message_number


async def confirmed(service: Service, channel: Channel) -> bool:
    stored = await service.store.channels.get(channel.id)
    assert stored is not None
    return stored.confirmed


async def webhook_counts(service: Service) -> dict[str, float]:
    """mrm_push_webhook_calls_total by outcome, read from GET /metrics."""
    status, text = await call(service, "GET", "/metrics", key=None)
    assert status == 200
    pattern = r'^mrm_push_webhook_calls_total\{outcome="([a-z_]+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


async def assert_nothing_stored(service: Service, channel: Channel, number: int = 1) -> None:
    assert await notifications(service) == []
    assert await last_number(service, channel) == number
    assert await service.store.channels.list_stops() == []


# -- 400: a required header missing or malformed ------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_missing_or_malformed_required_header_is_400(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    good = google_headers(channel, 5)
    cases: list[tuple[str, dict[str, str]]] = []
    for name in REQUIRED:
        cases.append((f"no {name}", {k: v for k, v in good.items() if k != name}))
        cases.append((f"empty {name}", {**good, name: ""}))
        cases.append((f"blank {name}", {**good, name: "   "}))
    cases.append(("non-ASCII channel id", {**good, "X-Goog-Channel-ID": channel.id + "\xe9"}))
    cases.append(("tab in resource id", {**good, "X-Goog-Resource-ID": "a\tb"}))
    cases.append(("no header at all", {}))
    for label, headers in cases:
        status, body = await hook(service, headers)
        assert status == 400, label
        assert body["error"]["status"] == 400, label
        assert body["error"]["code"] in ("missing_header", "invalid_header"), label
    await assert_nothing_stored(service, channel)
    assert (await webhook_counts(service))["invalid"] == len(cases)


@pytest.mark.gen_test(timeout=30)
async def test_message_number_must_be_a_positive_integer(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    bad = [
        "0",
        "-1",
        "1.5",
        "abc",
        "+5",
        "5 6",
        "1e3",
        "0x10",
        "\xb2",  # superscript two: str.isdigit() says yes, Google never sends it
        "9" * 20,
        "1" + "0" * 25,
        str(INT64_MAX + 1),  # 19 digits, yet more than either store can keep
        "9" * 19,
    ]
    for number in bad:
        status, body = await hook(service, google_headers(channel, number))
        assert status == 400, number
        assert body["error"]["code"] == "invalid_header", number
        assert "Message-Number" in body["error"]["message"], number
    await assert_nothing_stored(service, channel)
    # The largest number both stores keep is a good one.
    status, _ = await hook(service, google_headers(channel, INT64_MAX))
    assert status == 200
    [stored] = await notifications(service)
    assert stored.message_number == INT64_MAX
    assert await last_number(service, channel) == INT64_MAX


@pytest.mark.gen_test(timeout=30)
async def test_resource_state_outside_the_three_is_400(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    for state in ("SYNC", "Exists", "exist", "not-exists", "deleted", "exists,exists", "x sync"):
        status, body = await hook(service, google_headers(channel, 5, state))
        assert status == 400, state
        assert "Resource-State" in body["error"]["message"], state
    await assert_nothing_stored(service, channel)


@pytest.mark.gen_test(timeout=30)
async def test_any_x_goog_header_over_1_kb_is_400(make_service, emulator, clock):
    # X-Goog-Resource-URI has its own, larger bound (tests/test_webhook_long_ids.py).
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    good = google_headers(channel, 5)
    long_value = "a" * 1025
    for name in (
        *REQUIRED,
        "X-Goog-Channel-Token",
        "X-Goog-Channel-Expiration",
        "X-Goog-Something-New",
    ):
        status, body = await hook(service, {**good, name: long_value})
        assert status == 400, name
        assert "1024 bytes" in body["error"]["message"], name
    # Counted in bytes, not characters.
    status, _ = await hook(service, {**good, "X-Goog-Channel-Token": "\xe9" * 513})
    assert status == 400
    await assert_nothing_stored(service, channel)
    # Exactly 1 KB is allowed, and a long header that is not Google's is not ours to judge.
    status, _ = await hook(
        service, {**good, "X-Goog-Channel-Expiration": "u" * 1024, "X-Other": "o" * 2000}
    )
    assert status == 200
    assert len(await notifications(service)) == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_required_header_given_twice_is_400(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    good = list(google_headers(channel, 5).items())
    for name in REQUIRED:
        value = dict(good)[name]
        assert await hook_raw(service, [*good, (name, value)]) == 400, name
    await assert_nothing_stored(service, channel)
    assert await hook_raw(service, good) == 200


# -- unknown channel: 200, one stop queued ------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_unknown_channel_queues_one_stop_that_reaches_google(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    # The stop queued by the webhook is tried at once in the background: make that first try
    # fail, so the queue holds it until the test sends it itself.
    emulator.google.inject("stop", status=503)
    gone = dataclasses.replace(channel, id="c0ffee00-0000-4000-8000-000000000001")
    gone_headers = {**google_headers(gone, 7), "X-Goog-Resource-ID": "old-resource-id"}
    status, _ = await hook(service, gone_headers)
    assert status == 200
    [stop] = await service.store.channels.list_stops()
    assert (stop.channel_id, stop.resource_id, stop.calendar_id) == (
        gone.id,
        "old-resource-id",
        None,
    )
    # Google sends again (or sends the next number): still one stop.
    status, _ = await hook(service, {**gone_headers, "X-Goog-Message-Number": "9"})
    assert status == 200
    assert [s.channel_id for s in await service.store.channels.list_stops()] == [gone.id]
    assert await notifications(service) == []
    assert await last_number(service, channel) == 1
    assert (await webhook_counts(service))["unknown_channel"] == 2

    await service.channels.drain(5)  # the background try (503) is over
    assert ("stop", None, 503) in emulator.google.calls
    clock.advance(4000)  # past any retry delay
    assert await service.channels.process_stops() == 1
    # The emulator never had that channel: 404, which counts as stopped.
    assert emulator.google.calls[-1] == ("stop", None, 404)
    assert await service.store.channels.list_stops() == []
    # The room's own channel is untouched.
    assert [c["state"] for c in emulator.google.channels(ROOM)] == ["live"]


# -- 403: token or resource id wrong ------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_token_missing_or_different_is_403(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    good = google_headers(channel, 5)
    no_token = {k: v for k, v in good.items() if k != "X-Goog-Channel-Token"}
    cases = {
        "missing": no_token,
        "empty": {**good, "X-Goog-Channel-Token": ""},
        "different": {**good, "X-Goog-Channel-Token": "not-the-token"},
        "longer": {**good, "X-Goog-Channel-Token": channel.token + "x"},
        "prefix": {**good, "X-Goog-Channel-Token": channel.token[:-1]},
        "other case": {**good, "X-Goog-Channel-Token": channel.token.swapcase()},
    }
    for label, headers in cases.items():
        for state in ("exists", "not_exists", "sync"):
            status, body = await hook(service, {**headers, "X-Goog-Resource-State": state})
            assert status == 403, (label, state)
            assert body["error"]["code"] == "bad_channel_token", (label, state)
    await assert_nothing_stored(service, channel)
    assert (await webhook_counts(service))["forbidden"] == len(cases) * 3


@pytest.mark.gen_test(timeout=30)
async def test_resource_id_different_from_the_stored_one_is_403(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    for resource_id in ("other-resource", channel.resource_id + "x", channel.resource_id[:-1]):
        for state in ("exists", "sync"):
            headers = {**google_headers(channel, 5, state), "X-Goog-Resource-ID": resource_id}
            status, body = await hook(service, headers)
            assert status == 403, (resource_id, state)
            assert body["error"]["code"] == "bad_resource_id"
    await assert_nothing_stored(service, channel)
    stored = await service.store.channels.get(channel.id)
    assert stored is not None and stored.resource_id == channel.resource_id


@pytest.mark.gen_test(timeout=30)
async def test_a_wrong_token_does_not_confirm_a_pending_channel(make_service, clock):
    service = await make_service(clock=clock)
    channel = await pending_channel(service, ROOM, "pending-channel-1")
    headers = {**google_headers(channel, 1, "sync"), "X-Goog-Resource-ID": "res-1"}
    status, _ = await hook(service, {**headers, "X-Goog-Channel-Token": "guess"})
    assert status == 403
    stored = await service.store.channels.get(channel.id)
    assert stored is not None
    assert (stored.confirmed, stored.resource_id, stored.last_message_number) == (False, "", 0)


# -- sync ---------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_the_emulators_sync_confirms_a_real_channel(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)  # asserts confirmed, number 1
    [attempt] = [a for a in emulator.google.webhooks if a.channel_id == channel.id]
    assert (attempt.state, attempt.message_number, attempt.status) == ("sync", 1, 200)
    assert await notifications(service) == []
    assert (await webhook_counts(service))["sync"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_sync_takes_the_resource_id_when_the_stored_one_is_empty(make_service, clock):
    service = await make_service(clock=clock)
    channel = await pending_channel(service, ROOM, "pending-channel-2")
    headers = {**google_headers(channel, 1, "sync"), "X-Goog-Resource-ID": "res-from-sync"}
    status, _ = await hook(service, headers)
    assert status == 200
    stored = await service.store.channels.get(channel.id)
    assert stored is not None
    assert stored.confirmed is True
    assert stored.resource_id == "res-from-sync"
    assert stored.last_message_number == 1
    assert stored.state == "pending"  # the watch answer makes it active, not the sync
    assert await notifications(service) == []
    # From now on the resource id is checked.
    other = {**google_headers(stored, 2, "exists"), "X-Goog-Resource-ID": "another"}
    status, _ = await hook(service, other)
    assert status == 403
    status, _ = await hook(service, google_headers(stored, 2, "exists"))
    assert status == 200
    [notification] = await notifications(service)
    assert notification.channel_id == channel.id and notification.message_number == 2


@pytest.mark.gen_test(timeout=30)
async def test_sync_keeps_a_stored_resource_id(make_service, clock):
    service = await make_service(clock=clock)
    channel = await pending_channel(service, ROOM, "pending-channel-3", resource_id="res-known")
    status, _ = await hook(service, google_headers(channel, 1, "sync"))
    assert status == 200
    stored = await service.store.channels.get(channel.id)
    assert stored is not None and stored.confirmed and stored.resource_id == "res-known"


# -- duplicates ---------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_a_number_not_above_the_last_seen_is_a_duplicate(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    # Number 1 was the sync: an `exists` with it is not new.
    status, _ = await hook(service, google_headers(channel, 1))
    assert status == 200
    assert await notifications(service) == []
    assert (await webhook_counts(service)).get("duplicate") == 1

    status, _ = await hook(service, google_headers(channel, 5))
    assert status == 200
    for number, state in ((5, "exists"), (3, "not_exists"), (2, "exists"), (5, "not_exists")):
        status, body = await hook(service, google_headers(channel, number, state))
        assert (status, body) == (200, None), number
    [stored] = await notifications(service)
    assert stored.message_number == 5 and stored.resource_state == "exists"
    assert await last_number(service, channel) == 5
    counts = await webhook_counts(service)
    assert counts["duplicate"] == 5 and counts["stored"] == 1


# -- exists / not_exists ------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_exists_is_stored_durably_before_the_answer(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    google_calls = len(emulator.google.calls)

    status, body = await hook(service, google_headers(channel, 4, "exists"))
    assert (status, body) == (200, None)
    # Read back at once: it was stored before the answer went out.
    [first] = await notifications(service)
    # The answer must be fast: no Google call on the way (the sync comes after it).
    assert len(emulator.google.calls) == google_calls and emulator.google.in_flight == 0
    assert first.calendar_id == ROOM
    assert first.source == "webhook"
    assert first.channel_id == channel.id and first.message_number == 4
    assert first.resource_state == "exists"
    assert first.received_at == clock.now()

    clock.advance(10)
    status, _ = await hook(service, google_headers(channel, 9, "not_exists"))
    assert status == 200
    second = (await notifications(service))[-1]
    assert (second.message_number, second.resource_state) == (9, "not_exists")
    assert second.id > first.id and second.received_at == clock.now()
    assert await last_number(service, channel) == 9

    # Durable: a new process on the same database finds both.
    await service.stop()
    again = await make_service(clock=clock, emulator=emulator)
    kept = await notifications(again)
    assert [(n.id, n.message_number) for n in kept] == [(first.id, 4), (second.id, 9)]


@pytest.mark.gen_test(timeout=30)
async def test_the_same_number_sent_concurrently_is_stored_once(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    headers = google_headers(channel, 6)
    answers = await asyncio.gather(*(hook(service, headers) for _ in range(4)))
    assert [status for status, _ in answers] == [200] * 4
    [stored] = await notifications(service)
    assert (stored.channel_id, stored.message_number) == (channel.id, 6)
    counts = await webhook_counts(service)
    assert counts["stored"] == 1 and counts["duplicate"] == 3
    # Different numbers at once are all kept.
    more = [hook(service, google_headers(channel, n)) for n in (10, 11, 12)]
    assert [status for status, _ in await asyncio.gather(*more)] == [200] * 3
    assert sorted(n.message_number or 0 for n in await notifications(service)) == [6, 10, 11, 12]


# -- storage failing ----------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_storage_failing_is_503_and_nothing_stored(
    make_service, emulator, clock, monkeypatch
):
    service = await make_service(clock=clock, emulator=emulator)
    store = service.store
    channel = await real_channel(service, emulator)
    headers = google_headers(channel, 4)

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("database is locked")

    for repository, method in ((store.notifications, "add"), (store.channels, "get")):
        monkeypatch.setattr(repository, method, unavailable)
        status, body = await hook(service, headers)
        assert status == 503, method
        assert body["error"]["code"] == "storage_unavailable"
        monkeypatch.undo()
        await assert_nothing_stored(service, channel)
    assert (await webhook_counts(service))["store_failed"] == 2

    # Google sends the same call again once storage is back: it is stored once.
    status, _ = await hook(service, headers)
    assert status == 200
    [stored] = await notifications(service)
    assert stored.message_number == 4


@pytest.mark.gen_test(timeout=30)
async def test_storage_failing_on_sync_is_503_and_the_retry_confirms(
    make_service, clock, monkeypatch
):
    service = await make_service(clock=clock)
    channel = await pending_channel(service, ROOM, "pending-channel-4")
    headers = {**google_headers(channel, 1, "sync"), "X-Goog-Resource-ID": "res-4"}

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("disk I/O error")

    monkeypatch.setattr(service.store.channels, "confirm", unavailable)
    status, _ = await hook(service, headers)
    assert status == 503
    monkeypatch.undo()
    assert await confirmed(service, channel) is False
    status, _ = await hook(service, headers)
    assert status == 200
    assert await confirmed(service, channel) is True


@pytest.mark.gen_test(timeout=30)
async def test_once_stored_a_later_failure_still_answers_200(
    make_service, emulator, clock, monkeypatch
):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("database is locked")

    # The notification is durable once inserted; advancing the number is only a shortcut.
    monkeypatch.setattr(service.store.channels, "advance_message_number", unavailable)
    status, _ = await hook(service, google_headers(channel, 4))
    assert status == 200
    monkeypatch.undo()
    [stored] = await notifications(service)
    assert stored.message_number == 4
    # The unique (channel, number) pair still makes Google's resend a duplicate.
    status, _ = await hook(service, google_headers(channel, 4))
    assert status == 200
    assert len(await notifications(service)) == 1
    assert (await webhook_counts(service))["duplicate"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_google_resends_after_a_503_and_the_notification_is_kept(
    make_service, emulator, clock, monkeypatch
):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    real_add = service.store.notifications.add
    failures = [StoreUnavailable("database is locked")]

    async def fail_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real_add(*args, **kwargs)

    monkeypatch.setattr(service.store.notifications, "add", fail_once)
    emulator.google.insert_event(ROOM, summary="Standup")
    await emulator.google.drain()
    attempts = [a for a in emulator.google.webhooks if a.state == "exists"]
    assert [a.status for a in attempts] == [503, 200]
    assert attempts[0].message_number == attempts[1].message_number
    [stored] = await notifications(service)
    assert (stored.channel_id, stored.message_number) == (channel.id, attempts[0].message_number)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_an_event_inserted_at_google_is_stored_from_its_webhook(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    channel = await real_channel(service, emulator)
    emulator.google.insert_event(ROOM, summary="Standup", start=clock.now() + 3600)
    await emulator.google.drain()
    [attempt] = [a for a in emulator.google.webhooks if a.state == "exists"]
    assert attempt.status == 200 and attempt.channel_id == channel.id
    [stored] = await notifications(service)
    assert stored.source == "webhook"
    assert stored.resource_state == "exists"
    assert stored.calendar_id == ROOM and stored.channel_id == channel.id
    assert stored.message_number == attempt.message_number
    assert stored.message_number is not None and stored.message_number > 1
    assert await last_number(service, channel) == stored.message_number


@pytest.mark.gen_test(timeout=20)
async def test_the_stop_queue_for_unknown_channels_is_bounded(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    emulator.google.inject("stop", status=503, count=100)
    service.channels.stops.max_queued = 3
    for number in range(5):
        headers = {
            "X-Goog-Channel-ID": f"made-up-{number}",
            "X-Goog-Message-Number": "7",
            "X-Goog-Resource-ID": "resource",
            "X-Goog-Resource-State": "exists",
        }
        status, _ = await call(service, "POST", "/notifications", key=None, headers=headers)
        assert status == 200
    await service.channels.drain(5)
    assert len(await service.store.channels.list_stops()) == 3
