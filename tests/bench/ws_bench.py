"""WebSocket fan-out bench: idle memory, delivery latency to all, frames/s, and the reference.

    python tests/bench/ws_bench.py                 # 10,000 clients, both servers, ~4 minutes

Three processes: the server under test pinned to the first CPU, the load generator
(tests/bench/ws_loadgen.py: raw sockets on one epoll loop, frames counted, not decoded) pinned
to the second, and this script (it only sends commands and reads /proc) beside the generator.
The server is first mrm-push (the real Service: config, SQLite store, /ws handler, fan-out hub)
run in a child of this script (`ws_bench.py serve-ours`) with a driver inside it that publishes
the way a sync does: `store.notifications.add` + `store.notifications.publish`, then every
`publication_listeners` callback (so the hub's real path from the publication on); then the
reference, tests/bench/ws_reference_server.py (`websockets.broadcast()`). Both take the same
load from the same generator in the same run, with compression off and the same slow-client
bound (max_queue messages). Every notification carries its publish time (`time.time()`, taken
before the store calls) in `changes[0].summary`; the generator compares it with its own
`time.time()` when the notification's frame reached the LAST of the subscribers.

Not a test: it prints each figure, a summary table with the issue's targets, and exits 0 when
every target is met (1 otherwise). Everything stays on 127.0.0.1 and every child is killed at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `daemon` is the repo's

HOST = "127.0.0.1"
TOKEN = "bench-subscriber-token-0123456789abcdef"
CALENDAR = "bench-room-0001@resource.calendar.google.com"  # as ws_reference_server.CALENDAR
FD_LIMIT = 70000

TARGET_KB_PER_CLIENT = 20.0
TARGET_P99_MS = 150.0
TARGET_FRAMES = 100_000.0
TARGET_RATIO = 1.2


# -- the mrm-push server with its driver (child process) --------------------------------------


class Driver:
    """Publishes into a running Service the way a sync does, and answers the bench's
    commands."""

    def __init__(self, service: Any) -> None:
        from ws_reference_server import GcClock, make_change

        self.service = service
        self.make_change = make_change
        self.gc_clock = GcClock()
        self.store_seconds: list[float] = []
        self.profile: cProfile.Profile | None = None
        self.snapshots: list[tracemalloc.Snapshot] = []

    async def stored(self) -> Any:
        """One notification through the store: received, then published with its seq."""
        store = self.service.store
        started = time.perf_counter()
        now = time.time()
        received = await store.notifications.add(CALENDAR, "poll", "exists", received_at=now)
        published = await store.notifications.publish(
            received.id, [self.make_change(received.id, now)], False, [], now
        )
        self.store_seconds.append(time.perf_counter() - started)
        return published

    def announce(self, notification: Any) -> None:
        for listener in self.service.publication_listeners:
            listener(notification)

    async def publish(self, count: int, rate: float) -> dict[str, Any]:
        """`count` notifications at `rate` per second (each at its due time)."""
        self.store_seconds = []
        started = time.monotonic()
        late = 0.0
        gc_mark = self.gc_clock.mark()
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            self.announce(await self.stored())
        return {
            "published": count,
            "late_max": late,
            **self.store_figures(),
            **self.gc_clock.since(gc_mark),
        }

    async def flood(self, seconds: float, burst: int) -> dict[str, Any]:
        """Store `burst` notifications (the loop writes out the last batch meanwhile), then
        announce them in one tick; again until `seconds` have passed."""
        hub = self.service.fanout
        self.store_seconds = []
        cpu, frames = time.process_time(), hub.frames_sent
        gc_mark = self.gc_clock.mark()
        started = time.time()
        deadline = time.monotonic() + seconds
        published = 0
        while time.monotonic() < deadline:
            batch = [await self.stored() for _ in range(burst)]
            for notification in batch:
                self.announce(notification)
            published += burst
            await asyncio.sleep(0)
        ended = time.time()
        return {
            "published": published,
            "started": started,
            "ended": ended,
            "cpu": time.process_time() - cpu,
            "frames_handed": hub.frames_sent - frames,
            **self.store_figures(),
            **self.gc_clock.since(gc_mark),
        }

    def store_figures(self) -> dict[str, float]:
        times = sorted(self.store_seconds) or [0.0]
        return {"store_ms_mean": 1000 * sum(times) / len(times), "store_ms_max": 1000 * times[-1]}

    def stats(self) -> dict[str, Any]:
        hub = self.service.fanout
        return {
            "connected": hub.connected,
            "subscriptions": hub.subscriptions,
            "frames_sent": hub.frames_sent,
            "slow_closes": hub.slow_consumer_closes,
            "cpu": time.process_time(),
        }

    def tracemalloc_snapshot(self) -> dict[str, Any]:
        gc.collect()
        self.snapshots.append(tracemalloc.take_snapshot())
        return {"snapshots": len(self.snapshots)}

    def tracemalloc_compare(self, per: int, top: int) -> dict[str, Any]:
        """What the sockets opened between the last two snapshots hold, by allocation line."""
        before, after = self.snapshots[-2], self.snapshots[-1]
        rows = []
        for stat in after.compare_to(before, "lineno")[:top]:
            frame = stat.traceback[0]
            rows.append(
                {
                    "where": f"{_short(frame.filename)}:{frame.lineno}",
                    "bytes_per_client": stat.size_diff / per,
                    "blocks_per_client": stat.count_diff / per,
                }
            )
        total = sum(s.size_diff for s in after.compare_to(before, "filename"))
        return {"rows": rows, "total_per_client": total / per}

    def profile_start(self) -> dict[str, Any]:
        self.profile = cProfile.Profile()
        self.profile.enable()
        return {"ok": True}

    def profile_stop(self, top: int) -> dict[str, Any]:
        assert self.profile is not None
        self.profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(self.profile, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        self.profile = None
        text = out.getvalue().replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")
        return {"text": text}


def _short(filename: str) -> str:
    for prefix in (str(ROOT) + "/", sys.prefix + "/lib/python3.11/site-packages/"):
        if filename.startswith(prefix):
            return filename[len(prefix) :]
    return filename


async def serve_ours(config: str, trace: bool) -> None:
    from daemon.app import Service
    from daemon.configfile import load_config
    from daemon.logs import setup_logging

    if trace:
        tracemalloc.start(1)
    loaded = load_config(config, environ={})
    setup_logging(loaded.config.logging.level)
    service = Service(loaded)
    await service.start()
    driver = Driver(service)
    _answer({"ready": True, "port": service.port})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            name = cmd["cmd"]
            answer: dict[str, Any]
            if name == "publish":
                answer = await driver.publish(int(cmd["count"]), float(cmd["rate"]))
            elif name == "flood":
                answer = await driver.flood(float(cmd["seconds"]), int(cmd.get("burst", 1)))
            elif name == "stats":
                answer = driver.stats()
            elif name == "gc":
                answer = {"collected": gc.collect()}
            elif name == "snapshot":
                answer = driver.tracemalloc_snapshot()
            elif name == "compare":
                answer = driver.tracemalloc_compare(int(cmd["per"]), int(cmd.get("top", 15)))
            elif name == "profile_start":
                answer = driver.profile_start()
            elif name == "profile_stop":
                answer = driver.profile_stop(int(cmd.get("top", 25)))
            elif name == "quit":
                break
            else:
                answer = {"error": f"unknown command {name}"}
            _answer(answer)
    finally:
        await service.stop()


def _answer(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


# -- children ---------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for target in ((FD_LIMIT, max(FD_LIMIT, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            return
        except (ValueError, OSError):
            continue


class Child:
    """A child process spoken to in JSON lines (stdin/stdout); its stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=raise_fd_limit,  # 10,000 sockets and more: above the usual 1024 or 20000
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"{self.name}: no answer within {timeout:g} s\n{self.tail()}")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:  # it exited
                    raise SystemExit(f"{self.name}: exited\n{self.tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def call(self, cmd: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def tail(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
        return "\n".join(f"  {self.name}: {line}" for line in lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime: fields 14 and 15


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def plan_pinning(enabled: bool) -> tuple[list[str], list[str], str]:
    """`taskset` prefixes for the server (first CPU) and the generator (second); this script
    joins the generator's CPU (it mostly waits)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled:
        return [], [], "none (--no-pin): server and generator share the CPUs"
    if shutil.which("taskset") is None or len(cpus) < 2:
        return [], [], f"none (taskset: {shutil.which('taskset')}, CPUs {cpus}): shared"
    server, generator = cpus[0], cpus[1]
    os.sched_setaffinity(0, {generator})
    return (
        ["taskset", "-c", str(server)],
        ["taskset", "-c", str(generator)],
        f"server on CPU {server} (taskset -c {server}), load generator and this script on "
        f"CPU {generator} (taskset -c {generator})",
    )


def write_config(directory: Path, port: int, args: argparse.Namespace) -> Path:
    config = {
        "server": {"host": HOST, "port": port, "public_url": f"http://{HOST}:{port}"},
        "storage": {"url": f"sqlite:///{directory / 'bench.sqlite3'}"},
        "auth": {"subscribers": [{"token": TOKEN, "calendars": ["*"]}]},
        "logging": {"level": "warning"},
        "sync": {"poll_interval": 0},
        "websocket": {
            "max_queue": args.max_queue,
            "max_connections": max(20000, args.clients + 1000),
            "ping_interval": 3600,  # no pings during the bench (the generator does not answer)
        },
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- measurements -----------------------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def at(samples: list[list[float]], moment: float) -> float:
    """Frames received by `moment`, interpolated between the generator's samples."""
    previous = samples[0]
    for sample in samples:
        if sample[0] >= moment:
            span = sample[0] - previous[0]
            if span <= 0:
                return sample[1]
            return previous[1] + (sample[1] - previous[1]) * (moment - previous[0]) / span
        previous = sample
    return samples[-1][1]


def gc_line(answer: dict[str, Any], wall: float) -> str:
    """The server's garbage collections during a measurement, in one phrase."""
    if "gc_collections" not in answer:
        return ""
    counts, seconds = answer["gc_collections"], answer["gc_seconds"]
    return (
        f"; GC in the server: {sum(seconds):.2f} s ({sum(seconds) / wall:.0%} of the time; "
        f"collections gen0/1/2 {counts[0]}/{counts[1]}/{counts[2]}, gen2 {seconds[2]:.2f} s, "
        f"longest pause {1000 * answer['gc_longest_s']:.0f} ms)"
    )


def connect(generator: Child, port: int, count: int, label: str) -> dict[str, Any]:
    answer = generator.call(
        {"cmd": "connect", "port": port, "count": count, "token": TOKEN, "inflight": 100},
        timeout=180,
    )
    if answer["subscribed"] != count:
        raise SystemExit(f"{label}: {answer['subscribed']} of {count} subscribed: {answer}")
    return answer


def measure_memory(
    server: Child, generator: Child, port: int, clients: int, label: str
) -> dict[str, Any]:
    # Warm up first (lazy imports, first-use caches, the first notification's path), so that
    # the difference is what the sockets hold.
    connect(generator, port, 50, label)
    server.call({"cmd": "publish", "count": 2, "rate": 20})
    generator.call({"cmd": "disconnect"})
    time.sleep(1.0)
    server.call({"cmd": "gc"})
    before = rss_kb(server.pid)
    answer = connect(generator, port, clients, label)
    time.sleep(2.0)
    stats = server.call({"cmd": "stats"})
    after = rss_kb(server.pid)
    per = (after - before) * 1024 / clients / 1000
    print(
        f"  {label}: {clients} clients connected and subscribed in {answer['seconds']:.1f} s "
        f"(server says {stats.get('connected')} connected); RSS {before / 1024:.1f} MiB -> "
        f"{after / 1024:.1f} MiB: {per:.1f} KB per idle client",
        flush=True,
    )
    return {"kb_per_client": per, "rss_before_kb": before, "rss_after_kb": after}


def measure_latency(
    server: Child, generator: Child, count: int, rate: float, label: str
) -> dict[str, Any]:
    generator.call({"cmd": "latency_start", "expected": count})
    published = server.call({"cmd": "publish", "count": count, "rate": rate}, count / rate + 60)
    result = generator.call({"cmd": "latency_result", "wait": 10}, timeout=30)
    probe = result["probe"]
    receivers = result["receivers"]
    if len(probe) != count:
        raise SystemExit(f"{label}: the probe saw {len(probe)} of {count} notifications")
    latencies = sorted(last - t for (_, t), last in zip(probe, result["last"], strict=True))
    missing = sum(receivers - got for got in result["got"])
    figures = {
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1],
        "min_ms": 1000 * latencies[0],
        "missing": missing,
        "receivers": receivers,
        "frame_bytes": result.get("frame_bytes"),
        "store_ms_mean": published.get("store_ms_mean"),
        "late_max_ms": 1000 * published.get("late_max", 0.0),
    }
    store = (
        f"; store calls {figures['store_ms_mean']:.2f} ms mean (inside the figures)"
        if figures["store_ms_mean"] is not None
        else ""
    )
    print(
        f"  {label}: {count} notifications at {rate:g}/s to {receivers} subscribers, "
        f"{figures['frame_bytes']}-byte frames: delivered to the last one after p50 "
        f"{figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, max "
        f"{figures['max_ms']:.1f} ms (min {figures['min_ms']:.1f}); frames missing: {missing}"
        + store
        + gc_line(published, count / rate),
        flush=True,
    )
    figures["gc_longest_ms"] = 1000 * published.get("gc_longest_s", 0.0)
    return figures


def measure_throughput(
    server: Child, generator: Child, seconds: float, burst: int, clients: int, label: str
) -> dict[str, Any]:
    generator.call({"cmd": "count_start"})
    user, system = cpu_split(server.pid)
    flood = server.call({"cmd": "flood", "seconds": seconds, "burst": burst}, seconds + 120)
    user_after, system_after = cpu_split(server.pid)
    expected = flood["published"] * clients
    counted = generator.call({"cmd": "count_stop", "expected": expected, "wait": 20}, timeout=60)
    samples = counted["samples"]
    start, end = flood["started"] + 1.0, flood["ended"]  # the first second is ramp-up
    steady = (at(samples, end) - at(samples, start)) / (end - start)
    done_at = next((t for t, n in samples if n - samples[0][1] >= expected), samples[-1][0])
    wall = flood["ended"] - flood["started"]
    figures = {
        "frames_per_s": steady,
        "published": flood["published"],
        "frames": counted["frames"],
        "expected": expected,
        "server_handed_per_s": flood["frames_handed"] / wall,
        "server_cpu": flood["cpu"] / wall,
        "server_user": (user_after - user) / wall,
        "server_system": (system_after - system) / wall,
        "generator_cpu": counted["cpu"] / (samples[-1][0] - samples[0][0]),
        "drain_s": max(0.0, done_at - flood["ended"]),
        "closed": counted["closed_by_server"],
        "probe_gaps": counted.get("probe_gaps", 0),
    }
    print(
        f"  {label}: burst {burst} (notifications per loop tick), {seconds:g} s: "
        f"{steady:,.0f} frames/s received (steady, after the first second); "
        f"{flood['published']} notifications, {counted['frames']:,} of {expected:,} frames "
        f"received, the last {figures['drain_s']:.2f} s after publication stopped; server "
        f"handed {figures['server_handed_per_s']:,.0f} frames/s to its sockets; CPU server "
        f"{figures['server_cpu']:.0%} (user {figures['server_user']:.0%}, kernel "
        f"{figures['server_system']:.0%}), generator {figures['generator_cpu']:.0%}; "
        f"sockets closed by the server: {counted['closed_by_server']}" + gc_line(flood, wall),
        flush=True,
    )
    if figures["generator_cpu"] > 0.9 and figures["server_cpu"] < 0.9:
        print(f"  {label}: WARNING: the generator, not the server, was the limit", flush=True)
    return figures


def suite(
    label: str, server: Child, generator: Child, port: int, args: argparse.Namespace
) -> dict[str, Any]:
    ready = server.read(60)
    if not ready.get("ready"):
        raise SystemExit(f"{label}: {ready}")
    print(f"{label} (pid {server.pid}) on 127.0.0.1:{port}", flush=True)
    results: dict[str, Any] = {}
    results["memory"] = measure_memory(server, generator, port, args.clients, label)
    if label == "mrm-push" or args.reference_latency:
        results["latency"] = measure_latency(
            server, generator, args.latency_count, args.latency_rate, label
        )
    for burst in args.bursts:
        time.sleep(1.0)
        results[f"burst{burst}"] = measure_throughput(
            server, generator, args.flood_seconds, burst, args.clients, label
        )
    if label == "mrm-push" and args.profile_cpu:
        time.sleep(1.0)
        server.call({"cmd": "profile_start"})
        measure_throughput(
            server,
            generator,
            args.flood_seconds,
            args.bursts[-1],
            args.clients,
            label + "+cProfile",
        )
        text = server.call({"cmd": "profile_stop", "top": 30})["text"]
        results["profile"] = text
        print(text, flush=True)
    stats = server.call({"cmd": "stats"})
    results["slow_closes"] = stats.get("slow_closes", 0)
    generator.call({"cmd": "disconnect"})
    return results


def profile_memory(
    python: list[str], generator: Child, directory: Path, args: argparse.Namespace
) -> None:
    """mrm-push again with tracemalloc on: what each idle socket's Python objects are."""
    port = free_port()
    directory = directory / "tracemalloc"  # a store of its own
    directory.mkdir()
    config = write_config(directory, port, args)
    server = Child(
        "mrm-push+tracemalloc",
        [*python, str(HERE / "ws_bench.py"), "serve-ours", "--config", str(config), "--trace"],
        directory / "ours-trace.log",
    )
    try:
        if not server.read(60).get("ready"):
            raise SystemExit("mrm-push+tracemalloc did not start")
        connect(generator, port, 50, "tracemalloc")
        generator.call({"cmd": "disconnect"})
        time.sleep(1.0)
        server.call({"cmd": "snapshot"})
        connect(generator, port, args.profile_clients, "tracemalloc")
        time.sleep(1.0)
        server.call({"cmd": "snapshot"}, timeout=120)
        found = server.call({"cmd": "compare", "per": args.profile_clients, "top": 20}, 120)
        print(
            f"  tracemalloc, {args.profile_clients} idle clients: Python allocations "
            f"{found['total_per_client']:,.0f} bytes per client; the biggest lines:"
        )
        for row in found["rows"]:
            print(
                f"    {row['bytes_per_client']:8,.0f} B  {row['blocks_per_client']:5.1f} blocks"
                f"  {row['where']}"
            )
        generator.call({"cmd": "disconnect"})
    finally:
        server.stop()


def summary(ours: dict[str, Any], ref: dict[str, Any] | None, args: argparse.Namespace) -> bool:
    ok = True
    rows: list[tuple[str, str, str, str, str]] = []

    def row(name: str, mine: str, theirs: str, target: str, met: bool | None) -> None:
        nonlocal ok
        ok = ok and met is not False
        rows.append(
            (name, mine, theirs, target, "-" if met is None else "met" if met else "MISSED")
        )

    kb = ours["memory"]["kb_per_client"]
    ref_kb = f"{ref['memory']['kb_per_client']:.1f}" if ref else "-"
    row(
        "memory per idle client (KB)", f"{kb:.1f}", ref_kb, f"<= {TARGET_KB_PER_CLIENT:g}", kb <= 20
    )
    lat = ours["latency"]
    ref_lat = ref.get("latency") if ref else None
    for key, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        theirs = f"{ref_lat[key]:.1f}" if ref_lat else "-"
        if key == "p99_ms":
            met = lat[key] <= TARGET_P99_MS and lat["missing"] == 0
            row(f"latency to all, {name} (ms)", f"{lat[key]:.1f}", theirs, "<= 150", met)
        else:
            row(f"latency to all, {name} (ms)", f"{lat[key]:.1f}", theirs, "", None)
    for burst in args.bursts:
        mine = ours[f"burst{burst}"]["frames_per_s"]
        row(
            f"frames/s, burst {burst}",
            f"{mine:,.0f}",
            f"{ref[f'burst{burst}']['frames_per_s']:,.0f}" if ref else "-",
            ">= 100,000",
            mine >= TARGET_FRAMES,
        )
        if ref:
            ratio = mine / ref[f"burst{burst}"]["frames_per_s"]
            row(
                f"  ratio to websockets, burst {burst}",
                f"{ratio:.2f}x",
                "",
                ">= 1.2x",
                ratio >= TARGET_RATIO,
            )
    widths = [
        max(len(r[i]) for r in [*rows, ("measure", "mrm-push", "websockets", "target", "")])
        for i in range(5)
    ]
    header = ("measure", "mrm-push", "websockets", "target", "")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return ok


def bench(args: argparse.Namespace) -> int:
    server_pin, generator_pin, pinning = plan_pinning(not args.no_pin)
    python = [*server_pin, sys.executable]
    print(f"WebSocket fan-out bench: {args.clients} clients; pinning: {pinning}")
    print(
        f"  compression off on both; slow-client bound {args.max_queue} messages on both; "
        f"latency: {args.latency_count} notifications at {args.latency_rate:g}/s; "
        f"throughput: {args.flood_seconds:g} s floods at bursts {args.bursts}",
        flush=True,
    )
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    children: list[Child] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mrm-push-ws-bench-", dir=parent) as temp:
        directory = Path(temp)
        try:
            generator = Child(
                "generator",
                [*generator_pin, sys.executable, str(HERE / "ws_loadgen.py")],
                directory / "generator.log",
            )
            children.append(generator)
            port = free_port()
            config = write_config(directory, port, args)
            ours_server = Child(
                "mrm-push",
                [*python, str(HERE / "ws_bench.py"), "serve-ours", "--config", str(config)],
                directory / "ours.log",
            )
            children.append(ours_server)
            ours = suite("mrm-push", ours_server, generator, port, args)
            ours_server.stop()
            if args.profile_memory or ours["memory"]["kb_per_client"] > TARGET_KB_PER_CLIENT:
                profile_memory(python, generator, directory, args)
            ref = None
            if not args.no_reference:
                port = free_port()
                ref_server = Child(
                    "websockets",
                    [
                        *python,
                        str(HERE / "ws_reference_server.py"),
                        "--port",
                        str(port),
                        "--token",
                        TOKEN,
                        "--max-queue",
                        str(args.max_queue),
                    ],
                    directory / "reference.log",
                )
                children.append(ref_server)
                ref = suite("websockets", ref_server, generator, port, args)
                ref_server.stop()
            generator.stop()
        finally:
            for child in children:
                child.stop()
    ok = summary(ours, ref, args)
    print(f"\n  whole run: {time.monotonic() - started:.0f} s; result: {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-ours"]:
        server = argparse.ArgumentParser(prog="ws_bench.py serve-ours")
        server.add_argument("--config", required=True)
        server.add_argument("--trace", action="store_true", help="tracemalloc from the start")
        options = server.parse_args(argv[1:])
        sys.path.insert(0, str(HERE))
        asyncio.run(serve_ours(options.config, options.trace))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--latency-count", type=int, default=100)
    parser.add_argument("--latency-rate", type=float, default=2.0, help="notifications/s")
    parser.add_argument("--flood-seconds", type=float, default=10.0)
    parser.add_argument(
        "--bursts",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[1, 8],
        help="notifications published per loop tick in the floods, comma-separated",
    )
    parser.add_argument("--max-queue", type=int, default=1000, help="both servers' bound")
    parser.add_argument("--no-reference", action="store_true", help="mrm-push only")
    parser.add_argument(
        "--reference-latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the reference's latency too (50 s more)",
    )
    parser.add_argument("--profile-memory", action="store_true", help="tracemalloc, always")
    parser.add_argument("--profile-clients", type=int, default=2000)
    parser.add_argument("--profile-cpu", action="store_true", help="one more flood, cProfiled")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.latency_rate <= 0 or args.flood_seconds < 2:
        parser.error("--clients >= 1, --latency-rate > 0, --flood-seconds >= 2")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
