"""SIGHUP to a real `mrm-push serve`: auth.* and logging.level re-read from the edited config
file without dropping connections; a broken file keeps the old settings; sd_notify says
RELOADING=1 (with MONOTONIC_USEC) then READY=1."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.test_cli_exit import COMMAND
from tests.test_crash import WAIT, ServiceProcess

OLD_KEY = "old-api-key-0123456789abcdef"
NEW_KEY = "new-api-key-0123456789abcdef"
KEPT = "kept-subscriber-token-0123456789"
REMOVED = "removed-subscriber-token-0123456789"
NARROWED = "narrowed-subscriber-token-0123456789"
ROOM_A = "room-a@resource.calendar.google.com"
ROOM_B = "room-b@resource.calendar.google.com"


def config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "server": {"port": 0, "max_body_size": 65536},
        "storage": {"url": "sqlite:///reload.sqlite3"},
        "auth": {
            "api_keys_file": "api-keys",
            "subscribers": [
                {"token": KEPT, "calendars": ["*"]},
                {"token": REMOVED, "calendars": ["*"]},
                {"token": NARROWED, "calendars": [ROOM_A, ROOM_B]},
            ],
        },
        "logging": {"level": "info"},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        document[section][key] = value
    return document


def write(tmp_path: Path, document: dict[str, Any] | str) -> Path:
    path = tmp_path / "config.yaml"
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text)
    return path


class Notifications:
    """A NOTIFY_SOCKET as systemd has it: what the service says, one datagram at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), WAIT)
        return data.decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    notifications = Notifications(tmp_path / "notify.sock")
    yield notifications
    notifications.close()


@pytest.fixture
def service(io_loop, tmp_path, notify):
    (tmp_path / "api-keys").write_text(OLD_KEY + "\n")
    path = write(tmp_path, config(tmp_path))
    process = ServiceProcess(
        path, "", command=COMMAND, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": ""}
    )
    try:
        yield process
    finally:
        io_loop.run_sync(process.cleanup)


async def status(service: ServiceProcess, path: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = await AsyncHTTPClient().fetch(
        service.base_url + path, headers=headers, raise_error=False, request_timeout=WAIT
    )
    return response.code


async def subscribed(
    service: ServiceProcess, token: str, calendars: list[str]
) -> WebSocketClientConnection:
    url = service.base_url.replace("http://", "ws://") + "/ws"
    request = HTTPRequest(url, headers={"Authorization": f"Bearer {token}"})
    connection = await websocket_connect(request)
    await connection.write_message(json.dumps({"type": "subscribe", "calendar_ids": calendars}))
    first = json.loads(await asyncio.wait_for(connection.read_message(), WAIT))
    assert first["type"] == "subscribed", first
    return connection


async def still_open(connection: WebSocketClientConnection) -> None:
    await connection.write_message(json.dumps({"type": "ping"}))
    answer = await asyncio.wait_for(connection.read_message(), WAIT)
    assert answer is not None and json.loads(answer) == {"type": "pong"}


async def closed_with(connection: WebSocketClientConnection) -> tuple[int | None, str | None]:
    assert await asyncio.wait_for(connection.read_message(), WAIT) is None
    return connection.close_code, connection.close_reason


async def reload(service: ServiceProcess, notify: Notifications) -> int:
    """SIGHUP; the sd_notify lines it brings; returns where this reload's log lines start."""
    assert service.process is not None
    start = len(service.events)
    before = time.monotonic_ns() // 1000
    service.process.send_signal(signal.SIGHUP)
    reloading = await notify.next()
    name, _, usec = reloading.partition("\nMONOTONIC_USEC=")
    assert name == "RELOADING=1", reloading
    assert before <= int(usec) <= time.monotonic_ns() // 1000, reloading
    assert await notify.next() == "READY=1"
    return start


@pytest.mark.gen_test(timeout=60)
async def test_sighup_reloads_auth_and_log_level_without_dropping_connections(
    service, notify, tmp_path
):
    await service.spawn()
    listening = await service.wait_event("listening", 20)
    service.base_url = f"http://127.0.0.1:{listening['port']}"
    assert await notify.next() == "READY=1"
    kept = await subscribed(service, KEPT, ["*"])
    removed = await subscribed(service, REMOVED, [ROOM_A])
    narrowed = await subscribed(service, NARROWED, [ROOM_B])
    narrowed_kept = await subscribed(service, NARROWED, [ROOM_A])
    assert await status(service, "/v1/rooms", OLD_KEY) == 200
    assert await status(service, "/v1/rooms", NEW_KEY) == 401

    # The key file rotated, a subscriber removed, one narrowed, the level raised, and a key
    # that only a restart can change.
    (tmp_path / "api-keys").write_text(f"# rotated\n{NEW_KEY}\n")
    edited = config(
        tmp_path,
        auth__subscribers=[{"token": KEPT}, {"token": NARROWED, "calendars": [ROOM_A]}],
        logging__level="warning",
        server__max_body_size=4096,
    )
    write(tmp_path, edited)
    start = await reload(service, notify)
    reloaded = await service.wait_event("config_reloaded", after=start)
    assert (reloaded["sockets_revoked"], reloaded["sockets_calendars_revoked"]) == (1, 1)
    stale = await service.wait_event("config_reload_needs_restart", after=start)
    assert (stale["level"], stale["keys"]) == ("warning", ["server.max_body_size"])

    assert await closed_with(removed) == (1008, "token revoked")
    assert await closed_with(narrowed) == (1008, "calendars revoked")
    await still_open(kept)
    await still_open(narrowed_kept)
    assert await status(service, "/v1/rooms", NEW_KEY) == 200
    assert await status(service, "/v1/rooms", OLD_KEY) == 401
    # A removed token cannot come back in.
    with pytest.raises(Exception, match="401"):
        await subscribed(service, REMOVED, ["*"])

    # logging.level is warning now: no access line (INFO) from here on, the WARNING of a
    # refused legacy call is there.
    mark = len(service.events)
    assert await status(service, "/healthz", None) == 200
    assert await status(service, "/add_room?calendar_id=x", None) == 401
    await service.wait_event("legacy_call_refused", after=mark)
    after_reload = service.events[service.events.index(reloaded) :]
    assert not [e for e in after_reload if e.get("event") == "request"], service.tail()

    # A broken file: the old settings stay, one ERROR line says why.
    write(tmp_path, "auth: {api_keys_file: [\n")
    start = await reload(service, notify)
    failed = await service.wait_event("config_reload_failed", after=start)
    assert failed["level"] == "error"
    assert failed["reason"].startswith(f"{tmp_path / 'config.yaml'}: not valid YAML"), failed
    # A key file that cannot be read: the same.
    write(tmp_path, config(tmp_path, auth__api_keys_file="absent"))
    start = await reload(service, notify)
    failed = await service.wait_event("config_reload_failed", after=start)
    assert failed["reason"] == (
        f"auth.api_keys_file ({tmp_path / 'config.yaml'}): cannot read "
        f"{tmp_path / 'absent'} (No such file or directory)"
    )
    assert [e["event"] for e in service.events].count("config_reloaded") == 1
    assert await status(service, "/v1/rooms", NEW_KEY) == 200
    assert await status(service, "/v1/rooms", OLD_KEY) == 401
    await still_open(kept)

    service.process.send_signal(signal.SIGTERM)
    assert await notify.next() == "STOPPING=1"
    assert await service.exited() == 0
    assert await closed_with(kept) == (1001, "server shutting down")
