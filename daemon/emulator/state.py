"""The emulator's Google state in one JSON file, so that a restarted demo goes on where it was.

Calendars, events, channels, sync tokens and the clock, in a file of the state directory.

Saved atomically (a temporary file renamed over the old one) soon after each change, at most
once per SAVE_DELAY, and at stop; loaded before the emulator listens. What is not kept: FCM
messages and FCM/Google failure injections, webhook and call logs, page tokens (a listing cut
by a restart is asked again), access tokens (clients get new ones, as after a revocation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from daemon.emulator.app import Emulator, OffsetClock
from daemon.emulator.google.model import Calendar, Channel, Event

log = logging.getLogger(__name__)

STATE_FILE = "emulator-state.json"
VERSION = 1
SAVE_DELAY = 0.5  # seconds: a burst of changes (a page of events) is written once
MAX_DEAD_CHANNELS = 1000  # stopped or expired channels kept (live ones all are)


class StateKeeper:
    """Loads an emulator's state from `path` and keeps the file up to date.

    It reads and writes the tables of the Google emulator's parts: this module is its storage
    half, kept apart so that the google package stays about Google's behaviour.
    """

    def __init__(self, emulator: Emulator, path: Path, delay: float = SAVE_DELAY) -> None:
        self.emulator = emulator
        self.path = path
        self.delay = delay
        self.saved_port = 0  # the port of the previous run, to listen on again
        self._timer: asyncio.TimerHandle | None = None
        self.saves = 0

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> bool:
        """Restore the previous run's state, if any; a file that cannot be used is moved aside
        (`.broken`) and the emulator starts empty. Then watch for changes."""
        loaded = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"not a version {VERSION} emulator state")
            restore(self.emulator, data)
            self.saved_port = int(data.get("port") or 0)
            loaded = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as error:
            aside = self.path.with_name(self.path.name + ".broken")
            log.warning(
                "emulator_state_unusable",
                extra={"path": str(self.path), "moved_to": str(aside), "reason": str(error)},
            )
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            reset(self.emulator)
        self.emulator.google.on_change = self.changed
        if loaded:
            log.info("emulator_state_loaded", extra={"path": str(self.path)})
        return loaded

    # -- saving -------------------------------------------------------------------------------
    def changed(self) -> None:
        """Save soon (once for a burst of changes)."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a script driving the emulator): save now
            self.save()
            return
        self._timer = loop.call_later(self.delay, self.save)

    def save(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        text = json.dumps(dump(self.emulator), separators=(",", ":"))
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)  # readers see the old file or the new, never half
        except OSError as error:
            log.warning(
                "emulator_state_not_saved", extra={"path": str(self.path), "reason": str(error)}
            )
            return
        self.saves += 1

    def close(self) -> None:
        """The last save, at stop; no more after it."""
        self.emulator.google.on_change = None
        self.save()


# -- the file's content -------------------------------------------------------------------------
def dump(emulator: Emulator) -> dict[str, Any]:
    google = emulator.google
    now = google.now()
    calendars = google.calendar_set
    channels = list(google.channel_set.by_id.values())
    dead = [c for c in channels if c.stopped or c.expiration <= now]
    dead.sort(key=lambda c: c.expiration)
    kept = {c.id for c in channels if not (c.stopped or c.expiration <= now)}
    kept.update(c.id for c in dead[-MAX_DEAD_CHANNELS:])
    return {
        "version": VERSION,
        "port": emulator.port,
        "clock_offset": emulator.clock.offset if isinstance(emulator.clock, OffsetClock) else 0.0,
        "google_offset": google.offset,
        "calendars": [_calendar(c) for c in calendars.by_id.values()],
        "deleted": sorted(calendars.deleted),
        "channels": [_channel(c) for c in channels if c.id in kept],
        "sync_tokens": [
            [token, p.calendar_id, p.change, p.generation]
            for token, p in calendars.sync_tokens.items()
        ],
    }


def _calendar(calendar: Calendar) -> dict[str, Any]:
    return {
        "id": calendar.id,
        "resource_id": calendar.resource_id,
        "change": calendar.change,
        "generation": calendar.generation,
        "events": [vars(event) for event in calendar.events.values()],
    }


def _channel(channel: Channel) -> dict[str, Any]:
    return {
        "id": channel.id,
        "calendar_id": channel.calendar_id,
        "resource_id": channel.resource_id,
        "resource_uri": channel.resource_uri,
        "address": channel.address,
        "token": channel.token,
        "expiration": channel.expiration,
        "stopped": channel.stopped,
        "last_number": channel.last_number,
        "sync_started": channel.sync_started,
    }


def reset(emulator: Emulator) -> None:
    calendars = emulator.google.calendar_set
    calendars.by_id.clear()
    calendars.deleted.clear()
    calendars.sync_tokens.clear()
    calendars.issued.clear()
    emulator.google.channel_set.by_id.clear()


def restore(emulator: Emulator, data: dict[str, Any]) -> None:
    """Put a dumped state back (into an emulator that has not started: no channel is sent to)."""
    reset(emulator)
    google = emulator.google
    if isinstance(emulator.clock, OffsetClock):
        emulator.clock.offset = float(data["clock_offset"])
    google.offset = float(data["google_offset"])
    calendars, channels = google.calendar_set, google.channel_set
    for item in data["calendars"]:
        calendar = Calendar(
            str(item["id"]),
            resource_id=str(item["resource_id"]),
            change=int(item["change"]),
            generation=int(item["generation"]),
        )
        for fields in item["events"]:
            event = Event(**fields)
            calendar.events[event.id] = event
        calendars.by_id[calendar.id] = calendar
    calendars.deleted.update(str(calendar_id) for calendar_id in data["deleted"])
    for item in data["channels"]:
        channel = Channel(**item)
        if channel.sync_started:
            channel.sync_done.set()  # nobody waits for a sync sent by the previous run
        channels.by_id[channel.id] = channel
    on_change, google.on_change = google.on_change, None
    try:
        for token, calendar_id, change, generation in data["sync_tokens"]:
            google.remember_sync_token(str(token), str(calendar_id), int(change), int(generation))
    finally:
        google.on_change = on_change
