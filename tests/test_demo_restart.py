"""`serve --emulator` stopped and started again on the same state directory goes on where it was.

Real processes (the console script): the point is what survives a process restart. Two starts
and stops take about three seconds.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from daemon.configfile import load_config
from daemon.emulator.google import MAX_CHANNEL_TTL
from daemon.emulator.run import renewal_advance
from tests.fixtures import write_config
from tests.test_cli_exit import COMMAND

ROOM = "room-1@resource.calendar.google.com"
TABLET = "demo-tablet-token"


class Demo:
    """One `serve --emulator` process and the URLs it printed."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        config = write_config(
            tmp_path, {"server": {"port": port, "state_dir": "state"}, "auth": {"api_keys": []}}
        )
        self.log = (tmp_path / "serve.log").open("a")
        self.process = subprocess.Popen(
            [*COMMAND, "serve", "--config", str(config), "--emulator"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.printed = self._read_instructions()
        self.service = re.search(r"(http://127\.0\.0\.1:\d+)/v1/channels", self.printed)[1]
        self.emulator = re.search(r"(http://127\.0\.0\.1:\d+)/emulator/clock", self.printed)[1]
        self.port = int(self.service.rsplit(":", 1)[1])
        self.api_key = (tmp_path / "state" / "emulator-api-key").read_text().strip()

    def _read_instructions(self, limit: float = 20) -> str:
        """stdout up to the last line of the instructions (the clock move)."""
        deadline = time.monotonic() + limit
        text = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"/emulator/clock" not in text:
                if not selector.select(max(deadline - time.monotonic(), 0)):
                    raise AssertionError(f"no instructions within {limit}s: {text!r}")
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"serve --emulator ended: {self.process.wait()}")
                text += chunk
        return text.decode()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=15) as response:
        return response.status, json.loads(response.read() or b"null")


def test_a_restarted_demo_keeps_its_calendars_channels_and_sync_tokens(tmp_path):
    first = Demo(tmp_path, port=0)
    try:
        assert '{"advance": 518460}' in first.printed  # 7 days - 1 day + 60 s: the window
        tail = next(line for line in first.printed.splitlines() if "notifications tail" in line)
        assert f"--url {first.service}" in tail and "emulator-subscriber-token" in tail
        status, room = http(
            "PUT",
            f"{first.service}/v1/rooms/{quote(ROOM)}",
            {"firebase_tokens": [TABLET]},
            first.api_key,
        )
        assert status == 201 and room["channel"]["state"] == "active"
        channel_id = room["channel"]["id"]
        key_before = json.loads((tmp_path / "state/emulator-service-account.json").read_text())
        assert first.stop() == 0
    finally:
        first.kill()

    # Google keeps calling the address a channel was made with, so the second run listens on
    # the same port (as a demo on the default 8080 does).
    second = Demo(tmp_path, port=first.port)
    try:
        assert second.emulator == first.emulator  # the emulator's port again: same URLs
        _, known = http("GET", f"{second.emulator}/emulator/google/channels")
        assert [(c["id"], c["state"]) for c in known["channels"]] == [(channel_id, "live")]
        _, channels = http("GET", f"{second.service}/v1/channels", key=second.api_key)
        assert [(c["id"], c["state"]) for c in channels["channels"]] == [(channel_id, "active")]

        status, event = http(
            "POST",
            f"{second.emulator}/emulator/google/calendars/{quote(ROOM)}/events",
            {"summary": "after the restart"},
        )
        assert status == 201
        _, inbox = http("GET", f"{second.emulator}/emulator/fcm/messages?token={TABLET}&wait=10")
        [message] = inbox["messages"]
        data = message["message"]["data"]
        assert json.loads(data["event_ids"]) == [event["id"]]
        # The sync token from before the restart still worked: no full resync.
        assert data["full_resync"] == "0"
        key_after = json.loads((tmp_path / "state/emulator-service-account.json").read_text())
        assert key_after["private_key_id"] == key_before["private_key_id"]
        assert second.stop() == 0
    finally:
        second.kill()


@pytest.mark.parametrize(
    ("ttl", "renew_before"), [(604800, 86400), (3600, 600), (10**7, 86400), (120, 100)]
)
def test_the_printed_clock_move_lands_in_the_renewal_window(ttl, renew_before):
    environ = {
        "MRM_PUSH__GOOGLE__CHANNEL_TTL": str(ttl),
        "MRM_PUSH__GOOGLE__RENEW_BEFORE": str(renew_before),
    }
    advance = renewal_advance(load_config(None, environ=environ))
    lifetime = min(ttl, MAX_CHANNEL_TTL)  # what the emulator grants
    # A channel made just before the move expires within renew_before of the new time...
    assert lifetime - advance <= renew_before
    # ...and has not expired yet: the old one still listens while its successor starts.
    assert advance < lifetime
