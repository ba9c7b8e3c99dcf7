"""What one unknown-channel webhook costs the stop queue, by how many stops it already holds.

    python tests/bench/stop_queue_cost.py --queued 10000 --calls 200

Opens a real SQLite store in a temporary directory, queues `--queued` stops, then times
`--calls` calls of the check a webhook for an unknown channel makes (StopQueue.queue_unknown)
with made-up channel ids: once with the queue's bound at `--queued` (full: the check queues
nothing, the case of a flood), once with room left (each call queues a stop), and the latter
with a queue holding 100. No Google: the queue's sender is off, so only the store work is
timed. Not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `daemon` is the repo's

from daemon.clock import ManualClock  # noqa: E402
from daemon.config import Config  # noqa: E402
from daemon.stops import StopQueue  # noqa: E402
from storage.sqlite import SqliteStore  # noqa: E402


async def measure(directory: str, queued: int, bound: int, calls: int) -> list[float]:
    store = SqliteStore(str(Path(directory) / f"stops-{queued}-{bound}.sqlite3"))
    await store.open()
    clock = ManualClock()
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    try:
        for number in range(queued):
            await store.channels.enqueue_stop(f"queued-{number}", "resource", None, clock.now())
        stops = StopQueue(store.channels, None, clock, Config(), spawn)
        stops.max_queued = bound
        times = []
        for number in range(calls):
            start = time.perf_counter()
            await stops.queue_unknown(f"made-up-{number}", "resource")
            times.append(time.perf_counter() - start)
        if tasks:
            await asyncio.wait(tasks)
        return times
    finally:
        await store.close()


def report(label: str, times: list[float]) -> None:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"{label}: {len(ms)} calls, mean {statistics.mean(ms):.3f} ms,"
        f" p50 {statistics.median(ms):.3f} ms, p99 {p99:.3f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger("daemon.stops").setLevel(logging.ERROR)  # "queue full" warnings
    queued, calls = args.queued, args.calls
    with tempfile.TemporaryDirectory() as directory:
        report("holding 100, room left", await measure(directory, 100, 2 * queued, calls))
        report(f"holding {queued}, room left", await measure(directory, queued, 2 * queued, calls))
        report(f"holding {queued}, full", await measure(directory, queued, queued, calls))


if __name__ == "__main__":
    asyncio.run(main())
