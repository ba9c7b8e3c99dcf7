"""Webhook answer time under concurrent `exists` POSTs, with the service in its own process.

    python tests/bench/webhook_latency.py --requests 5000 --concurrency 100

Starts the Google/FCM emulator here and `python -m daemon.cli serve` as a child (SQLite in a
temporary directory), makes rooms with active channels, then fires `exists` notifications with
valid headers at the webhook and measures every answer. Not a test: it prints figures and
exits 0 when every answer was 200 and the store holds one notification per request.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `daemon` is the repo's

from daemon.clock import SystemClock  # noqa: E402
from daemon.emulator.app import Emulator  # noqa: E402
from daemon.emulator.fcm import FcmEmulator  # noqa: E402

HOST = "127.0.0.1"
API_KEY = "bench-api-key-" + "0" * 32
PROJECT_ID = "mrm-push-emulator"
START_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0  # one webhook POST, or one API call
PAGE = 500  # GET /v1/notifications' largest page


@dataclass
class Target:
    """One channel as Google knows it: what a genuine webhook call carries."""

    channel_id: str
    token: str
    resource_id: str
    resource_uri: str
    expiration: str
    number: int  # the last message number sent on it

    def headers(self) -> dict[str, str]:
        self.number += 1
        return {
            "X-Goog-Channel-ID": self.channel_id,
            "X-Goog-Channel-Token": self.token,
            "X-Goog-Channel-Expiration": self.expiration,
            "X-Goog-Message-Number": str(self.number),
            "X-Goog-Resource-ID": self.resource_id,
            "X-Goog-Resource-State": "exists",
            "X-Goog-Resource-URI": self.resource_uri,
        }


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    statuses: Counter[int | str] = field(default_factory=Counter)
    started: float = 0.0
    ended: float = 0.0
    service_cpu: float | None = None  # CPU seconds the service used during the load
    own_cpu: float = 0.0  # CPU seconds of this process (generator and emulator) meanwhile
    list_calls: int = 0  # events.list calls the service made meanwhile (its syncs)


def process_cpu(pid: int) -> float | None:
    """User plus system CPU seconds of a process, from /proc (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- processes and pinning -------------------------------------------------------------------


def plan_pinning(enabled: bool) -> tuple[list[str], str]:
    """`taskset` for the service on one CPU, this process (generator, emulator) on another."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled:
        return [], "none (--no-pin): service and load generator share the CPUs"
    if shutil.which("taskset") is None:
        return [], "none (no taskset): service and load generator share the CPUs"
    if len(cpus) < 2:
        return [], f"none (only CPU {cpus} available): service and load generator share it"
    service_cpu, generator_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {generator_cpu})
    return (
        ["taskset", "-c", str(service_cpu)],
        f"service on CPU {service_cpu} (taskset -c {service_cpu}); "
        f"load generator and emulator on CPU {generator_cpu}",
    )


class ServiceProcess:
    """The service as a child; its stderr (JSON log lines) copied to a file as it comes."""

    def __init__(self, command: list[str], log_path: Path, base_url: str) -> None:
        self.command = command
        self.log_path = log_path
        self.base_url = base_url
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start it and wait until /healthz answers (whatever the log level)."""
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.get_running_loop().create_task(self._copy_log())
        client = AsyncHTTPClient()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not self._reader.done():
            try:
                response = await client.fetch(
                    self.base_url + "/healthz", raise_error=False, request_timeout=1
                )
            except OSError:
                response = None
            if response is not None and response.code == 200:
                return
            await asyncio.sleep(0.05)
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await asyncio.wait_for(self._reader, START_TIMEOUT)
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit("the service did not start; the end of its log:\n" + "\n".join(tail))

    async def _copy_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.log_path.open("wb") as log:
            while chunk := await self.process.stderr.read(65536):
                log.write(chunk)

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), START_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, START_TIMEOUT)
        return self.process.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, emulator: Emulator, port: int, log_level: str) -> Path:
    key_file = str(directory / "service-account.json")
    emulator.write_service_account(key_file, project_id=PROJECT_ID)
    config = {
        "server": {"host": HOST, "port": port, "public_url": f"http://{HOST}:{port}"},
        "storage": {"url": f"sqlite:///{directory / 'bench.sqlite3'}"},
        "auth": {"api_keys": [API_KEY]},
        "logging": {"level": log_level},
        "google": {
            "service_account_file": key_file,
            "calendar_endpoint": emulator.calendar_endpoint,
        },
        "fcm": {
            "service_account_file": key_file,
            "project_id": PROJECT_ID,
            "endpoint": emulator.base_url,
        },
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- set-up through the API ------------------------------------------------------------------


async def api(base_url: str, method: str, path: str, body: Any = None) -> Any:
    response = await AsyncHTTPClient().fetch(
        base_url + path,
        method=method,
        body=None if body is None else json.dumps(body),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        raise_error=False,
        request_timeout=CALL_TIMEOUT,
    )
    if response.code not in (200, 201):
        raise SystemExit(f"{method} {path}: {response.code} {response.body[:300]!r}")
    return json.loads(response.body)


async def make_rooms(base_url: str, emulator: Emulator, rooms: int) -> list[Target]:
    """Rooms with active, confirmed channels; their webhook headers as Google would send them."""
    names = [f"bench-room-{i:04d}@resource.calendar.google.com" for i in range(rooms)]
    for start in range(0, rooms, 8):  # the service makes at most a few Google calls at once
        await asyncio.gather(
            *(
                api(base_url, "PUT", "/v1/rooms/" + quote(name), {"firebase_token": f"tab-{i}"})
                for i, name in enumerate(names[start : start + 8], start)
            )
        )
    await asyncio.wait_for(emulator.google.drain(), CALL_TIMEOUT)
    channels = (await api(base_url, "GET", "/v1/channels"))["channels"]
    active = {c["id"] for c in channels if c["state"] == "active" and c["confirmed"]}
    targets = [
        Target(
            channel_id=c["id"],
            token=c["token"],
            resource_id=c["resource_id"],
            resource_uri=_resource_uri(c["calendar_id"]),
            expiration=email.utils.formatdate(_epoch(c["expiration"]), usegmt=True),
            number=c["last_message_number"],
        )
        for c in emulator.google.channels()
        if c["id"] in active and c["state"] == "live"
    ]
    if len(targets) != rooms:
        raise SystemExit(f"{len(targets)} active channels for {rooms} rooms")
    return targets


def _resource_uri(calendar_id: str) -> str:
    base = "https://www.googleapis.com/calendar/v3/calendars/"
    return base + quote(calendar_id, safe="") + "/events?alt=json"


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# -- the load --------------------------------------------------------------------------------

Sender = Callable[[dict[str, str]], Awaitable[int]]


class RawConnection:
    """One keep-alive HTTP/1.1 connection: a request written, its answer read, again."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.path = path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, headers: dict[str, str]) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {HOST}:{self.port}", "Content-Length: 0"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        length, close = 0, False
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        if length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return int(status_line.split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_load(
    targets: list[Target],
    requests: int,
    concurrency: int,
    make_sender: Callable[[], tuple[Sender, Callable[[], None]]],
    deadline: float,
    rate: float = 0.0,
) -> Results:
    """`concurrency` workers, each owning its own channels, so that every channel's numbers
    arrive in order (Google sends one message at a time per channel). With `rate`, request i
    is due at i / rate seconds and its time counts from then (open loop: a late answer also
    delays the requests queued behind it, and that wait is counted, not hidden)."""
    results = Results()
    remaining = requests

    async def worker(owned: list[Target]) -> None:
        nonlocal remaining
        send, close = make_sender()
        turn = 0
        try:
            while remaining > 0 and time.monotonic() < deadline:
                index = requests - remaining
                remaining -= 1
                target = owned[turn % len(owned)]
                turn += 1
                headers = target.headers()
                began = time.perf_counter()
                if rate:
                    due = results.started + index / rate
                    if due > began:
                        await asyncio.sleep(due - began)
                    began = due
                try:
                    status: int | str = await asyncio.wait_for(send(headers), CALL_TIMEOUT)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    status = type(exc).__name__
                    close()
                else:
                    results.latencies.append(time.perf_counter() - began)
                results.statuses[status] += 1
        finally:
            close()

    groups = [targets[w::concurrency] for w in range(concurrency)]
    results.started = time.perf_counter()
    await asyncio.gather(*(worker(group) for group in groups))
    results.ended = time.perf_counter()
    return results


def raw_sender(port: int, path: str) -> Callable[[], tuple[Sender, Callable[[], None]]]:
    def make() -> tuple[Sender, Callable[[], None]]:
        connection = RawConnection(port, path)
        return connection.send, connection.close

    return make


def tornado_sender(url: str, concurrency: int) -> Callable[[], tuple[Sender, Callable[[], None]]]:
    client = AsyncHTTPClient(force_instance=True, max_clients=concurrency)

    async def send(headers: dict[str, str]) -> int:
        request = HTTPRequest(url, method="POST", body=b"", headers=headers)
        response = await client.fetch(request, raise_error=False)
        return response.code

    def make() -> tuple[Sender, Callable[[], None]]:
        return send, lambda: None

    return make


async def count_notifications(base_url: str, limit_pages: int) -> Counter[str]:
    """Every stored notification (published or not), by source and state, paging by id."""
    found: Counter[str] = Counter()
    after = 0
    for _ in range(limit_pages):
        page = await api(
            base_url,
            "GET",
            f"/v1/notifications?include_unpublished=1&limit={PAGE}&after={after}",
        )
        for notification in page["notifications"]:
            found[f"{notification['source']}/{notification['resource_state']}"] += 1
        if not page["notifications"]:
            return found
        after = page["next_after"]
    raise SystemExit(f"more than {limit_pages} pages of notifications")


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


# -- main ------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> int:
    taskset, pinning = plan_pinning(not args.no_pin)
    rooms = args.rooms or args.concurrency
    if rooms < args.concurrency:
        raise SystemExit("--rooms must be at least --concurrency: each worker owns its channels")
    emulator = Emulator(SystemClock())
    emulator.fcm = FcmEmulator(emulator.oauth, emulator.clock, project_id=PROJECT_ID)
    emulator.start(HOST, 0)
    with tempfile.TemporaryDirectory(prefix="mrm-push-bench-") as temp:
        directory = Path(temp)
        port = free_port()
        config = write_config(directory, emulator, port, args.log_level)
        command = [*taskset, sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)]
        base_url = f"http://{HOST}:{port}"
        service = ServiceProcess(command, directory / "service.log", base_url)
        try:
            await service.start()
            targets = await make_rooms(base_url, emulator, rooms)
            if args.client == "raw":
                make_sender = raw_sender(port, "/notifications")
                client = "raw asyncio sockets, HTTP/1.1 keep-alive, one connection per worker"
            else:
                make_sender = tornado_sender(base_url + "/notifications", args.concurrency)
                client = (
                    f"tornado AsyncHTTPClient (max_clients={args.concurrency}), "
                    "a new connection per request"
                )
            deadline = time.monotonic() + args.max_seconds
            assert service.process is not None
            pid = service.process.pid
            cpu_before, own_before = process_cpu(pid), time.process_time()
            lists_before = sum(1 for call in emulator.google.calls if call[0] == "list")
            results = await run_load(
                targets, args.requests, args.concurrency, make_sender, deadline, args.rate
            )
            cpu_after = process_cpu(pid)
            if cpu_before is not None and cpu_after is not None:
                results.service_cpu = cpu_after - cpu_before
            results.own_cpu = time.process_time() - own_before
            results.list_calls = (
                sum(1 for call in emulator.google.calls if call[0] == "list") - lists_before
            )
            counted = await count_notifications(base_url, args.requests // PAGE + 10)
        finally:
            code = await service.stop()
            emulator.stop()
    return report(args, rooms, pinning, client, results, counted, code)


def report(
    args: argparse.Namespace,
    rooms: int,
    pinning: str,
    client: str,
    results: Results,
    counted: Counter[str],
    exit_code: int | None,
) -> int:
    sent = sum(results.statuses.values())
    ordered = sorted(results.latencies)
    elapsed = results.ended - results.started
    stored = counted["webhook/exists"]
    ok = results.statuses.get(200, 0) == args.requests == sent and stored == args.requests
    pace = f"paced at {args.rate:g}/s (open loop)" if args.rate else "as fast as answered"
    print(
        f"webhook latency: {sent} POST /notifications (exists), concurrency {args.concurrency}, "
        + pace
    )
    print(f"  rooms/channels: {rooms}; each worker owns its channels, numbers in order")
    print(f"  pinning: {pinning}")
    print(f"  client: {client}")
    print(f"  service log level: {args.log_level}; store: SQLite in a temporary directory")
    print(f"  answers: {dict(sorted(results.statuses.items(), key=str))}")
    if sent < args.requests:
        print(f"  stopped after --max-seconds {args.max_seconds:g}: {sent} of {args.requests} sent")
    if ordered:
        figures = "  ".join(
            f"{name} {percentile(ordered, q) * 1000:.2f}"
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        )
        print(f"  latency ms: {figures}  max {ordered[-1] * 1000:.2f}")
    print(f"  throughput: {sent / elapsed:.0f} requests/s ({sent} in {elapsed:.2f} s)")
    if results.service_cpu is not None:
        print(
            f"  CPU during the load: service {results.service_cpu:.2f} s "
            f"({results.service_cpu / elapsed:.0%} of one CPU), generator and emulator "
            f"{results.own_cpu:.2f} s ({results.own_cpu / elapsed:.0%})"
        )
    print(f"  syncs meanwhile: {results.list_calls} events.list calls from the service")
    print(f"  store: {stored} webhook notifications for {args.requests} requests ({dict(counted)})")
    print(f"  service exit code after SIGTERM: {exit_code}")
    print("  result: " + ("OK" if ok else "MISMATCH"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rooms", type=int, default=0, help="default: --concurrency")
    parser.add_argument("--client", choices=("raw", "tornado"), default="raw")
    parser.add_argument(
        "--rate", type=float, default=0, help="requests/s in all (0: each worker sends on answer)"
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop the load after")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.rate < 0:
        parser.error("--requests and --concurrency must be positive, --rate not negative")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
