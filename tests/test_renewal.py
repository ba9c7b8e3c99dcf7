"""Renewal never leaves a calendar deaf: a successor that fails for good (in the request, in a
background retry, in a late watch answer, after max_retries) gives the old channel back, an
expired calendar gets a new channel, and renewals of one calendar run one at a time.

Time is the shared ManualClock; the one real timeout is in the late-watch case (as in
tests/test_channels.py: the service's own request_timeout), where a real timeout is the point.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import pytest

from storage.base import Channel
from tests.fixtures import CalendarCallsHeld, call, clock, emulator, make_service, settle  # noqa: F401
from tests.test_channels import LATE, google_channels

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
DAY = 86400
IN_RENEWAL_WINDOW = 7 * DAY - DAY // 2  # half a day before a new channel's expiry


async def first_channel(service, emulator) -> str:
    status, room = await call(service, "PUT", PATH, {})
    assert status == 201
    await settle(service, emulator)
    assert room["channel"]["state"] == "active"
    return str(room["channel"]["id"])


async def states(service) -> dict[str, str]:
    return {c.id: c.state for c in await service.store.channels.list(ROOM)}


async def stored(service, channel_id: str) -> Channel:
    channel = await service.store.channels.get(channel_id)
    assert channel is not None
    return channel


async def assert_renewed_once_more(service, emulator, old_ids: set[str]) -> None:
    """The next renewal check makes a new channel; once confirmed it is the only one left, in
    the store and live at Google."""
    summary = await service.channels.renew_due()
    assert (summary.renewed, summary.failed) == (1, [])
    await settle(service, emulator)
    await service.channels.process_stops()
    [channel] = await service.store.channels.list(ROOM)
    assert channel.id not in old_ids
    assert channel.state == "active" and channel.confirmed
    assert [c["id"] for c in google_channels(emulator, "live")] == [channel.id]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("how", ["forbidden", "max_retries"])
async def test_a_successor_failing_for_good_in_a_retry_gives_the_old_channel_back(
    make_service, emulator, clock, how
):
    service = await make_service({"google": {"max_retries": 1}}, clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    clock.advance(IN_RENEWAL_WINDOW)
    emulator.google.inject("watch", status=503)
    assert (await service.channels.renew_due()).renewed == 1
    [successor_id] = [i for i in await states(service) if i != old_id]
    assert await states(service) == {old_id: "retiring", successor_id: "pending"}
    if how == "forbidden":
        emulator.google.inject("watch", status=403, reason="forbidden")
    else:  # the second attempt is one more than max_retries allows
        emulator.google.inject("watch", status=503)
    clock.advance(3600)
    assert await service.channels.retry_pending() == 1
    await settle(service, emulator)
    assert await states(service) == {old_id: "active", successor_id: "failed"}
    _, room = await call(service, "GET", PATH)
    assert (room["channel"]["id"], room["channel"]["state"]) == (old_id, "active")
    # Google still sends on it: the room was never deaf.
    assert [c["id"] for c in google_channels(emulator, "live")] == [old_id]
    await assert_renewed_once_more(service, emulator, {old_id, successor_id})


@pytest.mark.gen_test(timeout=30)
async def test_a_successor_refused_in_the_request_gives_the_old_channel_back(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    clock.advance(IN_RENEWAL_WINDOW)
    emulator.google.inject("watch", status=404, reason="notFound")
    summary = await service.channels.renew_due()
    assert summary.renewed == 0 and "notFound" in summary.failed[0]["reason"]
    assert (await stored(service, old_id)).state == "active"
    await assert_renewed_once_more(service, emulator, {old_id})


@pytest.mark.gen_test(timeout=30)
async def test_a_successor_whose_late_watch_answer_is_forbidden_gives_the_old_channel_back(
    make_service, emulator, clock
):
    service = await make_service(LATE, clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    clock.advance(IN_RENEWAL_WINDOW)
    # The watch waits in the gateway's thread past request_timeout; released, it is refused.
    emulator.google.inject("watch", status=403, reason="forbidden", calendar_id=ROOM)
    with CalendarCallsHeld(service.google) as held:
        assert (await service.channels.renew_due()).renewed == 1  # its watch call gave up
        assert (await stored(service, old_id)).state == "retiring"
        held.release()
        await settle(service, emulator)  # the late answer: 403
    [successor_id] = [i for i in await states(service) if i != old_id]
    assert await states(service) == {old_id: "active", successor_id: "failed"}
    await assert_renewed_once_more(service, emulator, {old_id, successor_id})


@pytest.mark.gen_test(timeout=30)
async def test_an_old_channel_expiring_while_its_successor_retries_is_not_lost(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    clock.advance(IN_RENEWAL_WINDOW)
    emulator.google.inject("watch", status=503)
    await service.channels.renew_due()
    clock.advance(DAY)  # the old channel has expired; its successor is still pending
    await service.channels.renew_due()
    emulator.google.inject("watch", status=403, reason="forbidden")
    assert await service.channels.retry_pending() == 1
    await settle(service, emulator)
    # The calendar's last channel expired without a successor: the next check makes one.
    await assert_renewed_once_more(service, emulator, {old_id})


@pytest.mark.gen_test(timeout=30)
async def test_a_retiring_channel_left_without_a_successor_is_renewed(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    # As if the process died between retiring the channel and storing its successor.
    await service.store.channels.update(old_id, clock.now(), state="retiring")
    clock.advance(8 * DAY)
    await assert_renewed_once_more(service, emulator, {old_id})


@pytest.mark.gen_test(timeout=30)
async def test_a_room_left_without_any_channel_gets_one_at_the_next_check(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    # Its channel expired and was forgotten (say, stopped at expiry by an older mrm-push).
    clock.advance(8 * DAY)
    await service.store.channels.delete(old_id)
    await assert_renewed_once_more(service, emulator, {old_id})


@pytest.mark.gen_test(timeout=30)
async def test_renew_now_waits_for_the_periodic_renewal_of_the_same_calendar(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    old_id = await first_channel(service, emulator)
    clock.advance(IN_RENEWAL_WINDOW)
    release = asyncio.Event()
    held = emulator.google.inject("watch", calendar_id=ROOM, hold=release)
    waits = asyncio.Event()

    class Waits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "channel_renewal_waits":
                waits.set()

    handler, logger = Waits(), logging.getLogger("daemon.renewal")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        due = asyncio.ensure_future(service.channels.renew_due())
        await held.taken.wait()  # the periodic renewal's watch is at Google, held there
        now = asyncio.ensure_future(service.channels.renew_now(ROOM))
        # Either renew_now runs alongside (the bug) and ends, or it waits for the calendar.
        waiting = asyncio.ensure_future(waits.wait())
        await asyncio.wait({now, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        ran_alongside = now.done()
        release.set()
        due_summary, now_summary = await due, await now
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (due_summary.renewed, due_summary.failed) == (1, [])
    assert (now_summary.renewed, now_summary.failed) == (1, [])
    await settle(service, emulator)
    await service.channels.process_stops()
    [channel] = await service.store.channels.list(ROOM)
    assert channel.state == "active" and channel.confirmed and channel.id != old_id
    assert [c["id"] for c in google_channels(emulator, "live")] == [channel.id]
    assert len(google_channels(emulator, "stopped")) == 2
    assert waits.is_set() and not ran_alongside
