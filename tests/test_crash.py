"""Crash tests: the service as a subprocess, SIGKILLed at set points, restarted on its store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient

from daemon.clock import SystemClock
from daemon.emulator.app import Emulator
from daemon.emulator.fcm import FcmEmulator
from tests.fixtures import API_KEY, emulator_config, write_config

ROOT = Path(__file__).resolve().parent.parent
ROOM = "crash-room@resource.calendar.google.com"
TABLET = "crash-tablet-" + "c" * 40
START_TIMEOUT = 20.0  # a cold start imports firebase-admin and the Google client
WAIT = 10.0  # any one thing the test waits for

Event = dict[str, Any]


class ServiceProcess:
    """`python -m daemon.cli serve` as a child process; its JSON log lines can be awaited."""

    def __init__(
        self,
        config: Path,
        base_url: str,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.base_url = base_url
        self.command = command or [sys.executable, "-m", "daemon.cli"]
        self.env = env  # added to this process's environment
        self.process: asyncio.subprocess.Process | None = None
        self.events: list[Event] = []
        self.runs = 0
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []

    async def start(self) -> Event:
        """Start a run and wait for its `listening` line; returns the `recovered` line."""
        await self.spawn()
        await self.wait_event("listening", START_TIMEOUT)
        return await self.wait_event("recovered", 0)  # logged just before `listening`

    async def spawn(self) -> None:
        """Start a run, without waiting for anything."""
        assert self.process is None or self.process.returncode is not None
        self.runs += 1
        self.events = []
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            "serve",
            "--config",
            str(self.config),
            cwd=ROOT,
            env=None if self.env is None else {**os.environ, **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=2**20,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read(self.process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                event = {"event": None, "text": line}
            self.events.append(event)
            for predicate, future in list(self._waiters):
                if not future.done() and predicate(event):
                    future.set_result(event)

    async def wait_event(
        self, name: str, limit: float = WAIT, *, after: int = 0, **fields: Any
    ) -> Event:
        """The first line of this run with this event (and these fields), waiting for it;
        `after`: only lines from that index of `events` on."""

        def matches(event: Event) -> bool:
            return event.get("event") == name and all(event.get(k) == v for k, v in fields.items())

        for event in self.events[after:]:
            if matches(event):
                return event
        assert self._reader is not None
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        entry = (matches, future)
        # stderr ends when the process does: the reader's end says the line will never come.
        exited = asyncio.shield(self._reader)
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait(
                {future, exited}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._waiters.remove(entry)
            exited.cancel()
        if future in done:
            return future.result()
        why = "the service exited" if exited in done else f"nothing in {limit:g} s"
        raise AssertionError(f"no {name!r} log line: {why}\n{self.tail()}")

    def logged(self, name: str) -> bool:
        return any(event.get("event") == name for event in self.events)

    def tail(self, lines: int = 30) -> str:
        shown = [json.dumps(e) if e.get("event") is not None else e["text"] for e in self.events]
        return f"service run {self.runs}, last log lines:\n" + "\n".join(shown[-lines:])

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed."""
        await self._end(signal.SIGKILL, expect=-signal.SIGKILL)

    async def terminate(self) -> None:
        """SIGTERM: the graceful stop (attempts in flight are finished and recorded)."""
        await self._end(signal.SIGTERM, expect=0)
        assert self.logged("stopped") and not self.logged("deliveries_left_in_flight"), self.tail()

    async def _end(self, signum: int, expect: int) -> None:
        assert self.process is not None and self.process.returncode is None, self.tail()
        self.process.send_signal(signum)
        code = await self.exited()
        assert code == expect, f"exit code {code}, wanted {expect}\n{self.tail()}"

    async def exited(self, limit: float = WAIT) -> int:
        """The run's exit code, once it has ended and its log has been read to the end."""
        assert self.process is not None and self._reader is not None
        code = await asyncio.wait_for(self.process.wait(), limit)
        await asyncio.wait_for(self._reader, WAIT)
        return code

    async def cleanup(self) -> None:
        """Whatever happened: no child left behind, its pipe read to the end."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), WAIT)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, WAIT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def real_emulator(io_loop, tmp_path) -> Iterator[Emulator]:
    """The emulator on the real clock: the service in its own process can share no other."""
    emulator = Emulator(SystemClock())
    emulator.fcm = FcmEmulator(emulator.oauth, emulator.clock, project_id="mrm-push-emulator")
    emulator.start()
    emulator.write_service_account(str(tmp_path / "service-account.json"))
    yield emulator
    emulator.stop()


@pytest.fixture
def service(io_loop, real_emulator, tmp_path) -> Iterator[ServiceProcess]:
    port = free_port()
    overrides = emulator_config(real_emulator, str(tmp_path / "service-account.json"))
    overrides.update(
        {
            # The same port every run: Google's channels keep the address they were made with.
            "server": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
            # A short instance lease: a restart after SIGKILL waits for the dead run's lease.
            "storage": {"url": f"sqlite:///{tmp_path / 'crash.sqlite3'}", "lease_seconds": 1},
            "logging": {"level": "info"},
        }
    )
    process = ServiceProcess(write_config(tmp_path, overrides), f"http://127.0.0.1:{port}")
    try:
        yield process
    finally:
        io_loop.run_sync(process.cleanup)


async def api(service: ServiceProcess, method: str, path: str, body: Any = None) -> Any:
    response = await AsyncHTTPClient().fetch(
        service.base_url + path,
        method=method,
        body=None if body is None else json.dumps(body),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        raise_error=False,
        request_timeout=WAIT,
    )
    assert response.code in (200, 201), f"{method} {path}: {response.code} {response.body!r}"
    return json.loads(response.body)


async def add_room_with_active_channel(service: ServiceProcess, emulator: Emulator) -> None:
    await api(service, "PUT", "/v1/rooms/" + quote(ROOM), {"firebase_tokens": [TABLET]})
    # The watch answers after Google's `sync` call, and the PUT after the watch.
    await asyncio.wait_for(emulator.google.drain(), WAIT)
    [channel] = (await api(service, "GET", "/v1/channels"))["channels"]
    assert (channel["state"], channel["confirmed"]) == ("active", True), channel


def hold_next_list(emulator: Emulator) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the next `events.list` in the Google emulator until the second event is set; the
    first is set when the call has arrived."""
    release = asyncio.Event()
    return emulator.google.inject("list", hold=release).taken, release


async def check_delivered_once(service: ServiceProcess, emulator: Emulator, event_id: str) -> None:
    """The tablet has the change exactly once, and a further restart sends nothing again."""
    fcm = emulator.fcm
    assert isinstance(fcm, FcmEmulator)
    [message] = await fcm.wait_for(TABLET, 1, WAIT)
    assert json.loads(message["message"]["data"]["event_ids"]) == [event_id]
    # A graceful stop finishes the attempt in flight and records it; the next run reads it.
    await service.terminate()
    recovered = await service.start()
    assert recovered["released_claims"] == 0, service.tail()
    page = await api(service, "GET", "/v1/notifications")
    [notification] = page["notifications"]
    assert notification["seq"] == 1 and notification["source"] == "webhook"
    assert [c["event_id"] for c in notification["changes"]] == [event_id]
    assert [(d["target"], d["state"]) for d in notification["deliveries"]] == [("fcm", "sent")]
    await service.terminate()
    assert len(fcm.messages(TABLET)) == 1


@pytest.mark.gen_test(timeout=60)
async def test_sigkill_with_the_fcm_send_in_flight_delivers_once_after_restart(
    service, real_emulator
):
    fcm = real_emulator.fcm
    await service.start()
    await add_room_with_active_channel(service, real_emulator)
    # FCM has the request but does not answer: the message is stored, published and being
    # sent, not accepted. The emulator would record a held request when released, even with
    # its client gone, so this one is never released: FCM never accepted it.
    fcm.hold_answers(TABLET)
    event = real_emulator.google.insert_event(ROOM, summary="Standup")
    await fcm.wait_for_attempts(TABLET, 1, WAIT)
    await service.wait_event("published")  # written before the send: already in the pipe
    await service.kill()
    assert fcm.messages(TABLET) == []
    fcm.stop_holding(TABLET)  # new requests go through; the held one stays held

    recovered = await service.start()
    assert recovered["released_claims"] == 1, service.tail()
    await check_delivered_once(service, real_emulator, event["id"])
    assert fcm.attempts(TABLET) == 2


@pytest.mark.gen_test(timeout=60)
async def test_sigkill_after_the_webhook_answer_and_before_the_sync_syncs_after_restart(
    service, real_emulator
):
    fcm = real_emulator.fcm
    google = real_emulator.google
    await service.start()
    await add_room_with_active_channel(service, real_emulator)
    list_arrived, release_list = hold_next_list(real_emulator)
    try:
        event = google.insert_event(ROOM, summary="Retro")
        await asyncio.wait_for(list_arrived.wait(), WAIT)
        await asyncio.wait_for(google.drain(), WAIT)
        answered = google.webhooks[-1]
        assert (answered.state, answered.status) == ("exists", 200)
        assert not service.logged("published"), service.tail()
        await service.kill()
    finally:
        release_list.set()  # its answer goes to a dead connection
    assert fcm.attempts(TABLET) == 0

    recovered = await service.start()
    assert recovered["released_claims"] == 0, service.tail()
    await service.wait_event("sync_resumed", notifications=1)
    await check_delivered_once(service, real_emulator, event["id"])
    assert fcm.attempts(TABLET) == 1
