"""Drain under load: a real SIGTERM to a real `serve` while webhooks flow and FCM answers
slowly; after the restart every notification answered 200 is stored, and every change reaches
each tablet exactly once (contract 8: nothing answered 200 is lost, nothing is sent twice by a
clean stop).

The Google/FCM emulator runs in the test process, on the real clock, so that it outlives the
service. This test takes some seconds on purpose: FCM answers in FCM_DELAY, longer than the
fixed two seconds the drain once gave attempts in flight, and the service restarts once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import pytest

from daemon.emulator.app import Emulator
from daemon.emulator.fcm import FcmEmulator
from tests.fixtures import emulator_config, write_config
from tests.test_cli_exit import COMMAND
from tests.test_crash import WAIT, ServiceProcess, api, free_port, real_emulator  # noqa: F401

ROOMS = {
    f"drain-room-{n}@resource.calendar.google.com": [
        f"drain-tablet-{n}{t}-" + chr(ord("a") + 2 * n + t) * 40 for t in range(2)
    ]
    for n in range(2)
}
TABLETS = [token for tokens in ROOMS.values() for token in tokens]
SHUTDOWN_TIMEOUT = 6
FCM_DELAY = 2.5  # seconds FCM takes to answer while the first run drains
PACE = 0.05  # seconds between two calendar changes (each makes a webhook per channel)
AFTER_RESTART = 10  # changes made once the service is back


@pytest.fixture
def service(io_loop, real_emulator, tmp_path):
    port = free_port()
    overrides = emulator_config(real_emulator, str(tmp_path / "service-account.json"))
    overrides.update(
        {
            "server": {
                "port": port,
                "public_url": f"http://127.0.0.1:{port}",
                "shutdown_timeout": SHUTDOWN_TIMEOUT,
            },
            "storage": {"url": f"sqlite:///{tmp_path / 'drain.sqlite3'}", "lease_seconds": 1},
            "logging": {"level": "info"},
        }
    )
    process = ServiceProcess(
        write_config(tmp_path, overrides), f"http://127.0.0.1:{port}", command=COMMAND
    )
    try:
        yield process
    finally:
        io_loop.run_sync(process.cleanup)


class Flow:
    """Calendar changes, one every PACE seconds, alternating between the rooms: each is a new
    event, so that each change has its own id to find in the tablets' messages."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.events: dict[str, list[str]] = {room: [] for room in ROOMS}
        self.made = 0
        self.stop_at: int | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        rooms = list(ROOMS)
        while self.stop_at is None or self.made < self.stop_at:
            room = rooms[self.made % len(rooms)]
            event = self.emulator.google.insert_event(room, summary=f"change {self.made}")
            self.events[room].append(event["id"])
            self.made += 1
            await asyncio.sleep(PACE)  # the pace of the load, not a wait for an outcome

    async def finish(self, more: int) -> None:
        self.stop_at = self.made + more
        await asyncio.wait_for(self.task, WAIT)


async def all_notifications(service: ServiceProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await api(
            service, "GET", f"/v1/notifications?include_unpublished=1&limit=500&after={after}"
        )
        found += page["notifications"]
        if len(page["notifications"]) < 500:
            return found
        after = page["next_after"]


def event_ids(message: dict[str, Any]) -> list[str]:
    data = message["message"]["data"]
    assert data["full_resync"] == "0", data  # every change named: none lost in a resync
    return json.loads(data["event_ids"])


async def everything_delivered(service: ServiceProcess, fcm: FcmEmulator, flow: Flow) -> None:
    """Wait (on the FCM inbox) until each tablet has every change of its room and the store
    holds no delivery still to make: from then on nothing more can be sent."""
    for room, tokens in ROOMS.items():
        for token in tokens:
            while not set(flow.events[room]) <= {
                e for m in fcm.messages(token) for e in event_ids(m)
            }:
                await fcm.wait_for(token, len(fcm.messages(token)) + 1, WAIT)
    while True:
        open_ = [
            d
            for n in await all_notifications(service)
            for d in n["deliveries"]
            if d["state"] not in ("sent", "failed", "cancelled", "expired")
        ]
        if not open_:
            return
        token = next(t for t in TABLETS if t.endswith(open_[0]["token"]))
        await fcm.wait_for(token, len(fcm.messages(token)) + 1, WAIT)


@pytest.mark.gen_test(timeout=90)
async def test_sigterm_under_load_loses_nothing_and_sends_nothing_twice(service, real_emulator):
    fcm = real_emulator.fcm
    google = real_emulator.google
    assert isinstance(fcm, FcmEmulator)
    await service.start()
    for room, tokens in ROOMS.items():
        await api(service, "PUT", "/v1/rooms/" + quote(room), {"firebase_tokens": tokens})
    await asyncio.wait_for(google.drain(), WAIT)
    channels = (await api(service, "GET", "/v1/channels"))["channels"]
    assert {(c["state"], c["confirmed"]) for c in channels} == {("active", True)}

    fcm.delay(None, FCM_DELAY)  # every send waits FCM_DELAY before FCM takes it
    flow = Flow(real_emulator)
    # Load on every part: webhooks answered, notifications published, FCM attempts in flight.
    await fcm.wait_for_attempts(TABLETS[0], 2, WAIT)
    await fcm.wait_for_attempts(TABLETS[-1], 2, WAIT)
    assert fcm.held > 0 and fcm.messages() == []
    assert service.process is not None
    stopped_at = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert await service.exited(SHUTDOWN_TIMEOUT + 5) == 0, service.tail()
    took = time.monotonic() - stopped_at
    assert took < SHUTDOWN_TIMEOUT, f"the drain took {took:.1f} s\n{service.tail()}"
    assert service.logged("stopped"), service.tail()
    assert not service.logged("deliveries_left_in_flight"), service.tail()
    fcm.delay(None, 0)  # the next run's sends are answered at once

    await service.start()  # the same store: a clean stop released the lease
    await flow.finish(AFTER_RESTART)
    await asyncio.wait_for(google.drain(), WAIT)
    await everything_delivered(service, fcm, flow)

    # Every webhook answered 200 with a change is a stored notification.
    stored = {(n["channel_id"], n["message_number"]) for n in await all_notifications(service)}
    answered = {
        (w.channel_id, w.message_number)
        for w in google.webhooks
        if w.status == 200 and w.state != "sync"
    }
    assert answered and answered <= stored, answered - stored
    # Every change reached each tablet of its room exactly once, each notification once.
    published = [n for n in await all_notifications(service) if n["seq"] is not None]
    for room, tokens in ROOMS.items():
        for token in tokens:
            messages = fcm.messages(token)
            ids = Counter(m["message"]["data"]["notification_id"] for m in messages)
            assert max(ids.values()) == 1, f"sent twice: {ids.most_common(3)}"
            changes = Counter(e for m in messages for e in event_ids(m))
            assert set(changes) == set(flow.events[room])
            assert max(changes.values()) == 1, f"a change twice: {changes.most_common(3)}"
            mine = [n for n in published if n["calendar_id"] == room]
            assert len(messages) == len(mine)
    await service.terminate()
