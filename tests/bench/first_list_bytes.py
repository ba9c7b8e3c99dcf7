"""Bytes the service receives for a calendar's first list: every event, or the sync token only.

    python tests/bench/first_list_bytes.py --events 2000 --page 250

Starts the Google emulator in this process, puts `--events` events in one calendar, and reads
its first sync token the two ways the gateway can: `list_events(calendar, None)` (every page
with its events, what a channel's first list did before) and `full_sync_token(calendar)` (every
page, `fields=nextPageToken,nextSyncToken`). Counts the answer bodies httplib2 hands the client
library (the emulator does not compress; Google would gzip both) and the time each took. Not a
test: it prints figures and exits 0 when both ways end with a sync token.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httplib2

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `daemon` is the repo's

from daemon.clock import ManualClock  # noqa: E402
from daemon.emulator.app import Emulator  # noqa: E402
from daemon.google_calendar import GoogleCalendar  # noqa: E402

CALENDAR = "room-1@resource.calendar.google.com"


class Counted:
    """httplib2's answers to events.list, counted as they come (from the gateway's threads)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self._request = httplib2.Http.request
        counted = self

        def request(http: httplib2.Http, uri: str, *args: Any, **kwargs: Any) -> Any:
            response, content = counted._request(http, uri, *args, **kwargs)
            if "/events?" in uri:
                counted.requests += 1
                counted.bytes += len(content)
            return response, content

        httplib2.Http.request = request  # type: ignore[method-assign]

    def take(self) -> tuple[int, int]:
        taken, self.requests, self.bytes = (self.requests, self.bytes), 0, 0
        return taken


async def main(events: int, page: int) -> int:
    emulator = Emulator(ManualClock())
    emulator.start()
    for n in range(events):
        emulator.google.insert_event(CALENDAR, summary=f"meeting {n}")
    with tempfile.TemporaryDirectory() as directory:
        key_file = str(Path(directory) / "key.json")
        emulator.write_service_account(key_file)
        gateway = GoogleCalendar(
            key_file, None, emulator.calendar_endpoint, 30.0, 1, page_size=page
        )
        counted = Counted()
        try:
            await gateway.check()
            started = time.perf_counter()
            listing = await gateway.list_events(CALENDAR, None)
            full_time = time.perf_counter() - started
            full = counted.take()
            started = time.perf_counter()
            token = await gateway.full_sync_token(CALENDAR)
            token_time = time.perf_counter() - started
            tokens = counted.take()
        finally:
            gateway.close()
            emulator.stop()
    print(f"{events} events, pages of {page}")
    print(
        f"list_events(calendar, None): {full[0]} requests, {full[1]:,} bytes, "
        f"{full_time * 1000:.0f} ms, {len(listing.items)} events kept"
    )
    print(
        f"full_sync_token(calendar):   {tokens[0]} requests, {tokens[1]:,} bytes, "
        f"{token_time * 1000:.0f} ms, 0 events kept"
    )
    return 0 if listing.next_sync_token and token else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--page", type=int, default=250)
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.events, arguments.page)))
