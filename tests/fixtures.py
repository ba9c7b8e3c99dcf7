"""The shared fixtures and helpers: the emulator, a store, mrm_api's endpoint, the real service.

Import a fixture by name into the test module that uses it; a module may override one (its own
`clock`, say), and the fixtures that take it then get that one.
"""

from __future__ import annotations

import asyncio
import functools
import json
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httplib2
import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.netutil import bind_sockets

from daemon.app import Service
from daemon.clock import Clock, ManualClock
from daemon.configfile import load_config
from daemon.emulator.app import Emulator
from daemon.emulator.fcm import FcmEmulator
from daemon.emulator.keys import write_key_info, write_service_account
from daemon.google_calendar import GoogleCalendar
from storage.sqlite import SqliteStore
from tests.mrm_api import MrmApi, start_mrm_api

API_KEY = "test-api-key-0123456789abcdef"
PROJECT = "mrm-push-emulator"  # the emulator's Firebase project
KEY_FILE = "service-account.json"  # the emulator's key, in the test's directory
STORE_FILE = "store.sqlite3"  # the `store` fixture's, in the test's directory
EXECUTOR_THREADS = 4


def write_config(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A config file in `directory`: SQLite there, one API key, plus the given sections."""
    config: dict[str, Any] = {
        "server": {"port": 0},
        "storage": {"url": "sqlite:///mrm-push.sqlite3"},
        "auth": {"api_keys": [API_KEY]},
        "logging": {"level": "debug"},
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@functools.cache
def service_account() -> dict[str, Any]:
    """One service-account key for the run (making an RSA key takes a noticeable fraction of
    a second); each emulator trusts it, with its own token_uri."""
    with tempfile.TemporaryDirectory() as directory:
        return write_service_account(
            Path(directory) / KEY_FILE,
            token_uri="http://unused/token",
            client_email=f"mrm-push@{PROJECT}.iam.gserviceaccount.com",
            project_id=PROJECT,
        )


@pytest.fixture
def emulator(io_loop, clock, tmp_path) -> Iterator[Emulator]:
    """The Google and FCM emulator on a free port, on the test's movable clock; its key is in
    the test's directory (`key_file`)."""
    emulator = Emulator(clock)
    emulator.fcm = FcmEmulator(emulator.oauth, clock, project_id=PROJECT)
    emulator.start()
    info = dict(service_account(), token_uri=emulator.token_url)
    write_key_info(tmp_path / KEY_FILE, info)
    emulator.oauth.register(info)
    yield emulator
    emulator.fcm.release()  # a test that failed half-way leaves no FCM request held
    emulator.stop()


@pytest.fixture
def key_file(emulator, tmp_path) -> str:
    """The path of the emulator's service-account key."""
    return str(tmp_path / KEY_FILE)


def emulator_config(emulator: Emulator, key_file: str) -> dict[str, Any]:
    return {
        "google": {
            "service_account_file": key_file,
            "calendar_endpoint": emulator.calendar_endpoint,
            "request_timeout": 5,
        },
        "fcm": {
            "service_account_file": key_file,
            "project_id": PROJECT,
            "endpoint": emulator.base_url,
        },
    }


@pytest.fixture
def store(io_loop, tmp_path) -> Iterator[SqliteStore]:
    """A SQLite store in the test's directory (STORE_FILE), open (closed after the test)."""
    opened = SqliteStore(str(tmp_path / STORE_FILE))
    io_loop.run_sync(opened.open)
    yield opened
    io_loop.run_sync(opened.close)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    """Threads for an FCM sender's blocking work."""
    pool = ThreadPoolExecutor(max_workers=EXECUTOR_THREADS)
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def backend(io_loop) -> Iterator[MrmApi]:
    """mrm_api's GraphQL endpoint (tests/mrm_api.py) on a free port of 127.0.0.1."""
    api, server = start_mrm_api()
    yield api
    api.release()
    server.stop()


@pytest.fixture
def make_service(io_loop, tmp_path) -> Iterator[Callable[..., Awaitable[Service]]]:
    started: list[Service] = []

    async def make(
        overrides: dict[str, Any] | None = None,
        clock: Clock | None = None,
        emulator: Emulator | None = None,
    ) -> Service:
        """Build and start a service on a free port of 127.0.0.1 (stopped after the test);
        with `emulator`, pointed at it for Google and FCM."""
        sockets = bind_sockets(0, "127.0.0.1")
        port = sockets[0].getsockname()[1]
        merged: dict[str, Any] = {"server": {"public_url": f"http://127.0.0.1:{port}"}}
        if emulator is not None:
            merged.update(emulator_config(emulator, str(tmp_path / "service-account.json")))
        for section, values in (overrides or {}).items():
            merged.setdefault(section, {}).update(values)
        loaded = load_config(str(write_config(tmp_path, merged)), environ={})
        service = Service(loaded, clock=clock)
        await service.start(sockets)
        started.append(service)
        return service

    yield make
    for service in started:
        if not service.stopping:
            io_loop.run_sync(service.stop)


async def call(
    service: Service,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = API_KEY,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One HTTP request to the service; returns (status, parsed JSON or text or None)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers.setdefault("Authorization", f"Bearer {key}")
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if payload is None and method in ("POST", "PUT", "PATCH"):
        payload = b""
    response: HTTPResponse = await AsyncHTTPClient().fetch(
        service.base_url + path,
        method=method,
        body=payload,
        headers=all_headers,
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    text = response.body.decode() if response.body else ""
    if response.headers.get("Content-Type", "").startswith("application/json") and text:
        return response.code, json.loads(text)
    return response.code, text or None


@pytest.fixture
def list_pages(monkeypatch) -> list[tuple[str, dict[str, Any]]]:
    """Every events.list answer the Google client libraries receive here, as (uri, page): a
    pass-through of httplib2, the transport they use."""
    pages: list[tuple[str, dict[str, Any]]] = []
    request = httplib2.Http.request

    def recording(self: httplib2.Http, uri: str, *args: Any, **kwargs: Any) -> Any:
        response, content = request(self, uri, *args, **kwargs)
        if "/events?" in uri:
            pages.append((uri, json.loads(content)))
        return response, content

    monkeypatch.setattr(httplib2.Http, "request", recording)
    return pages


async def settle(service: Service, emulator: Emulator, limit: float = 10.0) -> None:
    """Wait until the service's background channel work (late watches, stops) and Google's
    webhook calls are all over. Each can start the other (a watch makes the emulator send
    `sync`; a webhook can make the service stop a channel): both are waited for at once, and
    again only while one of them still has work."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    # ChannelManager has no public "busy" yet: its set of background tasks says it.
    while service.channels._tasks or not emulator.google.idle:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"channel work or webhook calls still under way after {limit} s")
        await asyncio.wait_for(
            asyncio.gather(service.channels.drain(remaining), emulator.google.drain()), remaining
        )


class CalendarCallsHeld:
    """Holds a Calendar gateway's calls in their worker thread until release(), before they
    send anything: a late answer made on purpose, without a real-time window to hit.

    Every call takes the gateway's token lock in its thread before its request and waits for
    it with no timeout. While the test holds the lock, a call is running (not queued, so it
    is never cancelled) with no socket open: the caller's request_timeout runs out for sure,
    and the request reaches Google only once the test lets go; its answer comes late.
    Use it as a context manager, so that the thread is let go whatever happens.
    """

    def __init__(self, gateway: GoogleCalendar | None) -> None:
        assert gateway is not None, "the service has no Google credentials"
        self._lock = gateway._refresh_lock
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a Calendar call is fetching a token: hold when none runs")
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def __enter__(self) -> CalendarCallsHeld:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
