"""The stop queue over real HTTP and the Google emulator: one stop per unknown channel id, for
`google.channel_ttl`; failed stops retried up to `google.max_retries`, then dropped; a full
queue refuses quietly (one warning a minute, not one per call)."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest

from tests.fixtures import call, clock, emulator, make_service  # noqa: F401

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
WEEK = 7 * 86400


def unknown(channel_id: str, number: int = 7) -> dict[str, str]:
    return {
        "X-Goog-Channel-ID": channel_id,
        "X-Goog-Message-Number": str(number),
        "X-Goog-Resource-ID": "resource-of-" + channel_id,
        "X-Goog-Resource-State": "exists",
    }


async def hook(service, headers: dict[str, str]) -> None:
    status, _ = await call(service, "POST", "/notifications", key=None, headers=headers)
    assert status == 200


def stop_calls(emulator) -> list[int]:
    return [status for method, _, status in emulator.google.calls if method == "stop"]


@pytest.mark.gen_test(timeout=20)
async def test_an_unknown_id_gets_one_stop_even_after_it_ran(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    await hook(service, unknown("gone-1"))
    await service.channels.drain(5)
    assert stop_calls(emulator) == [404]  # Google never had it: counts as stopped
    assert await service.store.channels.list_stops() == []
    # Google (or anyone) sends on it again, days later: nothing more is queued or sent.
    clock.advance(WEEK - 60)
    await hook(service, unknown("gone-1", 8))
    await service.channels.drain(5)
    assert await service.store.channels.list_stops() == []
    assert stop_calls(emulator) == [404]
    # After google.channel_ttl the id is forgotten: Google's channel has expired by then.
    clock.advance(120)
    await hook(service, unknown("gone-1", 9))
    await service.channels.drain(5)
    assert stop_calls(emulator) == [404, 404]


@pytest.mark.gen_test(timeout=20)
async def test_a_stopped_renewed_channel_sending_late_queues_nothing(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    _, room = await call(service, "PUT", PATH, {})
    await emulator.google.drain()
    old = room["channel"]
    status, _ = await call(service, "DELETE", PATH)
    assert status == 204
    await service.channels.drain(5)
    assert stop_calls(emulator) == [200]
    await hook(service, {**unknown(old["id"], 5), "X-Goog-Resource-ID": old["resource_id"]})
    await service.channels.drain(5)
    assert stop_calls(emulator) == [200] and await service.store.channels.list_stops() == []


@pytest.mark.gen_test(timeout=20)
async def test_a_failing_stop_is_dropped_after_max_retries(make_service, emulator, clock, caplog):
    caplog.set_level(logging.INFO, logger="daemon.stops")
    service = await make_service({"google": {"max_retries": 2}}, clock=clock, emulator=emulator)
    await call(service, "PUT", PATH, {})
    await emulator.google.drain()
    emulator.google.inject("stop", status=503, count=100)
    await call(service, "DELETE", PATH)
    await service.channels.drain(5)  # the first attempt
    for attempts in (1, 2):
        [stop] = await service.store.channels.list_stops()
        assert stop.attempts == attempts
        clock.advance(3 * 3600)
        await service.channels.process_stops()
    assert await service.store.channels.list_stops() == []
    assert stop_calls(emulator) == [503, 503, 503]  # the first try and max_retries more
    [dropped] = [r for r in caplog.records if r.getMessage() == "channel_stop_dropped"]
    assert dropped.levelno == logging.WARNING and "503" in dropped.reason
    # Given up, but remembered: Google's next message on it queues nothing.
    [channel] = emulator.google.channels(ROOM)
    await hook(service, {**unknown(channel["id"], 9), "X-Goog-Resource-ID": channel["resource_id"]})
    assert await service.store.channels.list_stops() == []


@pytest.mark.gen_test(timeout=20)
async def test_a_full_queue_warns_once_a_minute(make_service, emulator, clock, caplog):
    caplog.set_level(logging.INFO, logger="daemon.stops")
    service = await make_service(clock=clock, emulator=emulator)
    emulator.google.inject("stop", status=503, count=100)
    service.channels.stops.max_queued = 2
    for number in range(6):
        await hook(service, unknown(f"made-up-{number}"))
    await service.channels.drain(5)
    assert await service.store.channels.count_stops() == 2
    full = [r for r in caplog.records if r.getMessage() == "stop_queue_full"]
    assert len(full) == 1 and full[0].levelno == logging.WARNING
    clock.advance(61)
    for number in range(6, 9):
        await hook(service, unknown(f"made-up-{number}"))
    full = [r for r in caplog.records if r.getMessage() == "stop_queue_full"]
    assert len(full) == 2 and full[1].refused == 4


@pytest.mark.gen_test(timeout=20)
async def test_the_unknown_channel_check_reads_no_queue(make_service, emulator, clock):
    """The cost must not grow with the queue (timings are in tests/bench/stop_queue_cost.py):
    the webhook's check never lists stops, it asks the store, which keeps the count."""
    service = await make_service(clock=clock, emulator=emulator)
    service.channels.stops.google = None  # the sender is off: only the webhook's reads count
    listed: list[str] = []
    store = service.store
    for name in ("due_stops", "list_stops"):
        real = getattr(store.channels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            listed.append(_name)
            return _real(*args, **kwargs)

        setattr(store.channels, name, spy)
    for number in range(3):
        await hook(service, unknown(f"made-up-{number}"))
    service.channels.stops.max_queued = 3
    await hook(service, unknown("made-up-full"))
    await service.channels.drain(5)
    assert listed == []
    assert await store.channels.count_stops() == 3
