"""The service under test (`mrm-push serve` as a child) and the fakes, as the bench drives them."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from tornado.httpclient import AsyncHTTPClient

from daemon.bench.common import (
    API_KEY,
    CALL_TIMEOUT,
    HOST,
    PROJECT_ID,
    SUBSCRIBER_TOKEN,
    Pinning,
    free_port,
)
from daemon.bench.load import LoadResult, RawConnection, Target, run_load
from daemon.bench.procs import AsyncChild, BenchError, module_argv
from daemon.bench.profile import cprofile_argv, cprofile_summary

PAGE = 500  # GET /v1/notifications' largest page
ROOM_BATCH = 8  # rooms made at once (the service makes at most a few Google calls at once)
CHANNEL_WAIT = 60.0  # seconds for every new room's channel to be active and confirmed
POLL = 0.05  # seconds between looks while waiting for the service to settle


async def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> Any:
    """One JSON call; BenchError unless it answers 2xx."""
    response = await AsyncHTTPClient().fetch(
        url,
        method=method,
        body=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
        raise_error=False,
        request_timeout=CALL_TIMEOUT,
        allow_nonstandard_methods=True,
    )
    if not 200 <= response.code < 300:
        path = url.split("?", 1)[0]
        raise BenchError(f"{method} {path}: {response.code} {response.body[:300]!r}")
    return json.loads(response.body) if response.body else None


class Api:
    """The service's management API, with the bench's key."""

    def __init__(self, base_url: str, api_key: str = API_KEY) -> None:
        self.base_url = base_url
        self._auth = {"Authorization": f"Bearer {api_key}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        return await http(method, self.base_url + path, body, self._auth)


class Fakes:
    """The emulator child (daemon/bench/fakes.py): Google and FCM for the service."""

    def __init__(self, directory: Path, pinning: Pinning) -> None:
        self.key_file = directory / "service-account.json"
        self.child = AsyncChild(
            "emulator",
            module_argv("daemon.bench.fakes", "--key-file", str(self.key_file)),
            directory / "emulator.log",
            pinning.for_load(),
        )
        self.port = 0
        pinning.note("Google/FCM emulator", "load")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        self.port = int((await self.child.start())["port"])

    async def stop(self) -> None:
        await self.child.stop()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        return await http(method, self.url + path, body)

    async def reset(self) -> None:
        await self.call("POST", "/bench/reset", {})

    async def stats(self, mark: bool = False) -> dict[str, Any]:
        """The fakes' figures (with `mark`, the loop-lag figures start again after these)."""
        return dict(await self.call("GET", "/bench/stats" + ("?mark=1" if mark else "")))

    async def fcm_messages(self) -> list[list[Any]]:
        return list((await self.call("GET", "/bench/fcm?after=0"))["messages"])


class ServiceProcess:
    """`mrm-push serve` in a child: a config in a temporary directory, SQLite there, Google
    and FCM pointed at the fakes, no safety-net poll, the service's CPU."""

    def __init__(
        self,
        directory: Path,
        fakes: Fakes,
        pinning: Pinning,
        log_level: str,
        name: str,
        cprofile: Path | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cprofile = cprofile
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.api = Api(self.base_url)
        config = write_config(directory, fakes, self.port, log_level)
        self.child = AsyncChild(
            "mrm-push serve",
            (
                [*cprofile_argv(cprofile), "-m", "daemon.cli"]
                if cprofile
                else module_argv("daemon.cli")
            )
            + ["serve", "--config", str(config)],
            directory / "service.log",
            pinning.for_service(),
            cwd=directory,
        )
        pinning.note(f"mrm-push serve ({name})", "service")

    @property
    def pid(self) -> int:
        return self.child.pid

    async def start(self) -> None:
        await self.child.spawn()
        await self.child.wait_http(self.base_url + "/healthz")

    async def stop(self) -> int | None:
        return await self.child.stop()

    def profile(self) -> dict[str, Any] | None:
        """With --cprofile: the summary of the profile the service wrote as it exited."""
        return cprofile_summary(self.cprofile) if self.cprofile is not None else None


def write_config(directory: Path, fakes: Fakes, port: int, log_level: str) -> Path:
    config = {
        "server": {"host": HOST, "port": port, "public_url": f"http://{HOST}:{port}"},
        "storage": {"url": f"sqlite:///{directory / 'bench.sqlite3'}"},
        "auth": {
            "api_keys": [API_KEY],
            "subscribers": [{"token": SUBSCRIBER_TOKEN, "calendars": ["*"]}],
        },
        "logging": {"level": log_level},
        "google": {
            "service_account_file": str(fakes.key_file),
            "calendar_endpoint": fakes.url + "/calendar/v3/",
        },
        "fcm": {
            "service_account_file": str(fakes.key_file),
            "project_id": PROJECT_ID,
            "endpoint": fakes.url,
        },
        # The bench's syncs come from its webhooks only; pings would only cost the WS client.
        "sync": {"poll_interval": 0},
        "websocket": {"ping_interval": 3600},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- rooms and their channels ---------------------------------------------------------------------


def room_name(part: str, index: int) -> str:
    return f"bench-{part}-{index:04d}@resource.calendar.google.com"


async def make_rooms(api: Api, emulator_url: str, rooms: dict[str, list[str]]) -> list[Target]:
    """Rooms (calendar id → tablet tokens) with active, confirmed channels; their webhook
    headers as Google would send them, read from the emulator (the channel tokens never leave
    the service)."""
    names = list(rooms)
    for start in range(0, len(names), ROOM_BATCH):
        await asyncio.gather(
            *(
                api.call(
                    "PUT", "/v1/rooms/" + quote(name, safe=""), {"firebase_tokens": rooms[name]}
                )
                for name in names[start : start + ROOM_BATCH]
            )
        )
    wanted = set(names)
    deadline = time.monotonic() + CHANNEL_WAIT
    while True:
        channels = (await api.call("GET", "/v1/channels"))["channels"]
        active = {
            c["id"]: c
            for c in channels
            if c["calendar_id"] in wanted and c["state"] == "active" and c["confirmed"]
        }
        if len(active) >= len(wanted):
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"{len(active)} of {len(wanted)} channels active after {CHANNEL_WAIT}s"
            )
        await asyncio.sleep(POLL)
    google = (await http("GET", emulator_url + "/emulator/google/channels"))["channels"]
    targets = [
        Target(
            channel_id=c["id"],
            token=c["token"],
            resource_id=c["resource_id"],
            calendar_id=c["calendar_id"],
            expiration=email.utils.formatdate(_epoch(c["expiration"]), usegmt=True),
            number=c["last_message_number"],
            resource_uri=c["resource_uri"],
        )
        for c in google
        if c["id"] in active and c["state"] == "live"
    ]
    if len(targets) != len(wanted):
        raise BenchError(f"{len(targets)} live channels at the emulator for {len(wanted)} rooms")
    return sorted(targets, key=lambda t: t.calendar_id)


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# -- before measuring ---------------------------------------------------------------------------


class Changes:
    """Changes at the emulator, one before each webhook (a new event in the webhook's
    calendar, made quietly: the bench sends the webhook), on a keep-alive connection per
    worker. Event ids are unique in the run: `prefix` and a counter."""

    def __init__(self, fakes: Fakes, workers: int, prefix: str) -> None:
        self.connections = [RawConnection(fakes.port) for _ in range(workers)]
        self.prefix = prefix
        self.made: list[str] = []
        self.by_index: dict[int, str] = {}  # the current load's request index → its event

    async def __call__(self, worker: int, index: int, target: Target) -> None:
        event_id = f"{self.prefix}{len(self.made):09d}"
        self.made.append(event_id)
        self.by_index[index] = event_id
        path = f"/bench/change?c={quote(target.calendar_id, safe='')}&e={event_id}"
        status = await self.connections[worker].post(path)
        if status != 204:
            raise BenchError(f"the emulator answered {status} to a change")

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


@dataclass
class WarmUp:
    load: LoadResult
    changes: list[str]
    settle: dict[str, Any]


async def warm_up(
    api: Api, port: int, fakes: Fakes | None, targets: list[Target], prefix: str, limit: float
) -> WarmUp:
    """One change (without the bench's fakes: none) and its webhook per room, then a settle,
    so that the first-use costs (the Calendar client's discovery document, the first OAuth
    tokens, the FCM client) are paid before anything is measured, as in a service that has
    been running for a while."""
    workers = min(len(targets), 50)
    changes = Changes(fakes, workers, prefix) if fakes is not None else None
    try:
        load = await run_load(
            targets,
            len(targets),
            workers,
            port,
            "/notifications",
            max_seconds=limit,
            before=changes,
        )
    finally:
        if changes is not None:
            changes.close()
    return WarmUp(load, changes.made if changes else [], await settle(api, limit))


# -- reading the outcome ------------------------------------------------------------------------


async def all_notifications(api: Api, *, unpublished: bool) -> list[dict[str, Any]]:
    """Every stored notification (with `unpublished`, in id order) or every published one
    (in seq order)."""
    found: list[dict[str, Any]] = []
    after = 0
    flag = "&include_unpublished=1" if unpublished else ""
    while True:
        page = await api.call("GET", f"/v1/notifications?limit={PAGE}&after={after}{flag}")
        found.extend(page["notifications"])
        if len(page["notifications"]) < PAGE:
            return found
        after = page["next_after"]


async def settle(api: Api, limit: float) -> dict[str, Any]:
    """Wait until the service has nothing left to do: no notification still `received` (its
    sync not done) and no delivery `pending` or `in_flight`. Bounded by `limit` seconds."""
    started = time.monotonic()
    watermark = 0  # notifications below this id are synced already
    while True:
        waiting, watermark = await _first_received(api, watermark)
        counts = (await api.call("GET", "/v1/deliveries?limit=1"))["counts"]
        busy = counts.get("pending", 0) + counts.get("in_flight", 0)
        if not waiting and not busy:
            return {"settled": True, "seconds": round(time.monotonic() - started, 2)}
        if time.monotonic() - started > limit:
            return {
                "settled": False,
                "seconds": round(time.monotonic() - started, 2),
                "unsynced": waiting,
                "deliveries_busy": busy,
            }
        await asyncio.sleep(POLL)


async def _first_received(api: Api, after: int) -> tuple[bool, int]:
    """Whether a notification past id `after` is still `received`, and the id below which
    none is (so that the next look starts there)."""
    while True:
        page = await api.call(
            "GET", f"/v1/notifications?include_unpublished=1&limit={PAGE}&after={after}"
        )
        for notification in page["notifications"]:
            if notification["state"] == "received":
                return True, after
            after = notification["id"]
        if len(page["notifications"]) < PAGE:
            return False, after
