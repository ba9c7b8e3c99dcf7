"""The WebSocket part's mrm-push server: the real Service with a driver that publishes as a sync.

    python -m daemon.bench.ws_server --config FILE     # driven by `mrm-push bench`

The Service (config, SQLite store, /ws handler, fan-out hub) with a driver in the same process
that publishes the way a sync does: `store.notifications.add` + `store.notifications.publish`,
then every `publication_listeners` callback; so what is measured is the hub's real path from
the publication on. Each notification carries its publish time (`time.time()`, taken before
the store calls) in `changes[0].summary`. Commands on stdin, one JSON object a line, answers on
stdout: `publish` (count, rate), `flood` (seconds, burst), `stats`, `gc`, `profile_start`,
`profile_stop` (top), with --trace `snapshot` and `compare` (per, top: what the sockets opened
between the last two snapshots hold, by line), `quit`; the first line out is
{"ready": true, "port": P}.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import uvloop

from daemon.bench.ws_reference import CALENDAR, GcClock, make_change

ROOT = str(Path(__file__).resolve().parents[2]) + "/"
SITE = sys.prefix + "/lib/python3.11/site-packages/"


class Driver:
    """Publishes into a running Service the way a sync does."""

    def __init__(self, service: Any) -> None:
        self.service = service
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
            received.id, [make_change(received.id, now)], False, [], now
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

    def profile_start(self) -> dict[str, Any]:
        self.profile = cProfile.Profile()
        self.profile.enable()
        return {"ok": True}

    def profile_stop(self, top: int) -> dict[str, Any]:
        if self.profile is None:
            return {"text": ""}
        self.profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(self.profile, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        self.profile = None
        return {"text": out.getvalue().replace(ROOT, "").replace(sys.prefix + "/", "")}

    def snapshot(self) -> dict[str, Any]:
        gc.collect()
        self.snapshots.append(tracemalloc.take_snapshot())
        return {"snapshots": len(self.snapshots)}

    def compare(self, per: int, top: int) -> dict[str, Any]:
        """What the sockets opened between the last two snapshots hold, by allocation line."""
        before, after = self.snapshots[-2], self.snapshots[-1]
        rows = []
        for stat in after.compare_to(before, "lineno")[:top]:
            frame = stat.traceback[0]
            where = frame.filename.replace(SITE, "").replace(ROOT, "")
            rows.append(
                {
                    "where": f"{where}:{frame.lineno}",
                    "bytes_per_client": round(stat.size_diff / per, 1),
                    "blocks_per_client": round(stat.count_diff / per, 2),
                }
            )
        total = sum(s.size_diff for s in after.compare_to(before, "filename"))
        return {"rows": rows, "total_per_client": round(total / per, 1)}

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to one command; None for `quit`."""
        name = cmd.get("cmd")
        if name == "publish":
            return await self.publish(int(cmd["count"]), float(cmd["rate"]))
        if name == "flood":
            return await self.flood(float(cmd["seconds"]), int(cmd.get("burst", 1)))
        if name == "stats":
            return self.stats()
        if name == "gc":
            return {"collected": gc.collect()}
        if name == "profile_start":
            return self.profile_start()
        if name == "profile_stop":
            return self.profile_stop(int(cmd.get("top", 25)))
        if name == "snapshot":
            return self.snapshot()
        if name == "compare":
            return self.compare(int(cmd["per"]), int(cmd.get("top", 20)))
        if name == "quit":
            return None
        return {"error": f"unknown command {name}"}


async def serve(config: str, trace: bool) -> None:
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
            answer = await driver.command(json.loads(line))
            if answer is None:
                break
            _answer(answer)
    finally:
        await service.stop()


def _answer(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--trace", action="store_true", help="tracemalloc from the start")
    args = parser.parse_args()
    # On the event loop `mrm-push serve` runs (daemon/cli.py).
    uvloop.run(serve(args.config, args.trace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
