"""The emulator's state file: what a restarted emulator knows, how and when the file is written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from daemon.clock import ManualClock, SystemClock
from daemon.emulator.app import Emulator
from daemon.emulator.google import MAX_SYNC_TOKENS_PER_CALENDAR, GoogleApiError
from daemon.emulator.oauth import JWT_BEARER
from daemon.emulator.state import STATE_FILE, StateKeeper
from tests.emulator.test_google_emulator import assertion

CAL = "room-1@resource.calendar.google.com"
HOOK = "http://127.0.0.1:9/notifications"  # never called: the sync is not started


def read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def fresh(tmp_path, clock=None) -> tuple[Emulator, StateKeeper]:
    emulator = Emulator(clock or SystemClock(), sync_before_answer=False)
    keeper = StateKeeper(emulator, tmp_path / STATE_FILE)
    keeper.load()
    return emulator, keeper


@pytest.mark.gen_test(timeout=10)
async def test_a_restarted_emulator_knows_calendars_events_channels_and_sync_tokens(tmp_path):
    emulator, keeper = fresh(tmp_path)
    google = emulator.google
    google.insert_event(CAL, summary="kept", event_id="event1")
    token = google.list_events(CAL, {})["nextSyncToken"]
    google.insert_event(CAL, summary="after the token", event_id="event2")
    google.cancel_event(CAL, "event1")
    google.create_calendar("gone@x")
    google.delete_calendar("gone@x")
    google.advance_clock(3600)
    body = {"id": "chan-1", "type": "web_hook", "address": HOOK}
    answer, channel = await google.watch(CAL, body)
    channel.last_number, channel.sync_started = 7, True  # messages sent before the restart
    keeper.close()
    assert stat.S_IMODE(os.stat(tmp_path / STATE_FILE).st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))

    again, _ = fresh(tmp_path)
    assert again.google.channels() == google.channels()
    assert again.google.channels()[0]["last_message_number"] == 7
    assert again.google.events(CAL) == google.events(CAL)
    assert again.google.now() == pytest.approx(google.now(), abs=5)  # the clock move is kept
    # The old sync token still works and sees what changed since it was issued.
    changed = again.google.list_events(CAL, {"syncToken": token})["items"]
    assert [(e["id"], e["status"]) for e in changed] == [
        ("event2", "confirmed"),
        ("event1", "cancelled"),
    ]
    with pytest.raises(GoogleApiError) as missing:
        again.google.list_events("gone@x", {})
    assert missing.value.status == 404  # deleted stays deleted
    restored = again.google.channel("chan-1")
    assert restored.resource_id == answer["resourceId"] and restored.sync_done.is_set()


def test_sync_tokens_are_bounded_per_calendar_the_oldest_answer_410():
    google = Emulator(ManualClock()).google
    first = google.list_events(CAL, {})["nextSyncToken"]
    newest = [
        google.list_events(CAL, {})["nextSyncToken"] for _ in range(MAX_SYNC_TOKENS_PER_CALENDAR)
    ]
    with pytest.raises(GoogleApiError) as expired:
        google.list_events(CAL, {"syncToken": first})
    assert expired.value.status == 410
    assert google.list_events(CAL, {"syncToken": newest[0]})["items"] == []


@pytest.mark.gen_test(timeout=10)
async def test_changes_are_saved_once_per_burst_and_at_stop(tmp_path):
    emulator, keeper = fresh(tmp_path)
    for number in range(20):
        emulator.google.insert_event(CAL, summary=f"event {number}")
    assert keeper._timer is not None and keeper.saves == 0  # one save pending for the burst
    keeper.save()  # what the timer does when the delay is over
    assert keeper.saves == 1 and keeper._timer is None
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert len(saved["calendars"][0]["events"]) == 20
    emulator.google.insert_event(CAL, summary="one more")
    keeper.close()
    assert keeper.saves == 2
    assert len(json.loads((tmp_path / STATE_FILE).read_text())["calendars"][0]["events"]) == 21


def test_an_unusable_state_file_is_moved_aside_and_the_emulator_starts_empty(tmp_path):
    (tmp_path / STATE_FILE).write_text('{"version": 1, "calendars": [{"id": 1}]}')
    emulator, _ = fresh(tmp_path)
    assert emulator.google.calendar_ids() == []
    assert (tmp_path / (STATE_FILE + ".broken")).exists()
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.gen_test(timeout=10)
async def test_the_key_file_stays_valid_and_is_trusted_again(tmp_path):
    path = str(tmp_path / "key.json")
    first = Emulator(ManualClock())
    first.start()
    before = first.keep_service_account(path)
    first.stop()
    second = Emulator(ManualClock())
    second.start()  # another port: the key's token_uri follows it
    try:
        after = second.keep_service_account(path)
        assert after["private_key_id"] == before["private_key_id"]
        assert after["private_key"] == before["private_key"]
        assert read_json(path)["token_uri"] == second.token_url
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        grant = second.oauth.exchange(JWT_BEARER, assertion(after), second.token_url)
        assert grant.client_email == after["client_email"]
    finally:
        second.stop()
