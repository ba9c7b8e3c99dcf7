"""The WebSocket part's two timed measurements: latency to all, and frames/s during a flood."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from daemon.bench.common import percentile
from daemon.bench.procs import BenchError, SyncChild


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


def gc_figures(answer: dict[str, Any], wall: float) -> dict[str, Any] | None:
    """The server's garbage collections during a measurement."""
    if "gc_collections" not in answer:
        return None
    seconds = answer["gc_seconds"]
    return {
        "collections": answer["gc_collections"],
        "seconds": round(sum(seconds), 3),
        "share": round(sum(seconds) / wall, 3) if wall > 0 else None,
        "longest_ms": round(1000 * answer["gc_longest_s"], 1),
    }


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime: fields 14 and 15


def measure_latency(
    server: SyncChild, generator: SyncChild, count: int, rate: float
) -> dict[str, Any]:
    """`count` notifications at `rate`/s; for each, when its frame reached the last socket."""
    generator.call({"cmd": "latency_start", "expected": count})
    published = server.call({"cmd": "publish", "count": count, "rate": rate}, count / rate + 60)
    result = generator.call({"cmd": "latency_result", "wait": 10}, timeout=30)
    probe = result["probe"]
    if len(probe) != count:
        raise BenchError(f"{server.name}: the probe saw {len(probe)} of {count} notifications")
    latencies = sorted(last - t for (_, t), last in zip(probe, result["last"], strict=True))
    missing = sum(result["receivers"] - got for got in result["got"])
    return {
        "notifications": count,
        "rate": rate,
        "receivers": result["receivers"],
        "frame_bytes": result.get("frame_bytes"),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 2),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
        "max_ms": round(1000 * latencies[-1], 2),
        "missing": missing,
        "store_ms_mean": published.get("store_ms_mean"),
        "late_max_ms": round(1000 * published.get("late_max", 0.0), 2),
        "gc": gc_figures(published, count / rate),
    }


def measure_throughput(
    server: SyncChild, generator: SyncChild, seconds: float, burst: int, clients: int
) -> dict[str, Any]:
    """A flood of `seconds`: frames/s received by the generator after the ramp-up."""
    generator.call({"cmd": "count_start"})
    user, system = cpu_split(server.pid)
    flood = server.call({"cmd": "flood", "seconds": seconds, "burst": burst}, seconds + 120)
    user_after, system_after = cpu_split(server.pid)
    expected = flood["published"] * clients
    counted = generator.call({"cmd": "count_stop", "expected": expected, "wait": 20}, timeout=60)
    samples = counted["samples"]
    ramp = min(1.0, seconds / 4)  # the first stretch is ramp-up
    start, end = flood["started"] + ramp, flood["ended"]
    steady = (at(samples, end) - at(samples, start)) / (end - start)
    done_at = next((t for t, n in samples if n - samples[0][1] >= expected), samples[-1][0])
    wall = flood["ended"] - flood["started"]
    generator_cpu = counted["cpu"] / max(samples[-1][0] - samples[0][0], 1e-9)
    server_cpu = flood["cpu"] / wall
    figures = {
        "burst": burst,
        "frames_per_s": round(steady, 1),
        "published": flood["published"],
        "frames": counted["frames"],
        "expected": expected,
        "server_handed_per_s": round(flood["frames_handed"] / wall, 1),
        "server_cpu": round(server_cpu, 3),
        "server_user": round((user_after - user) / wall, 3),
        "server_system": round((system_after - system) / wall, 3),
        "generator_cpu": round(generator_cpu, 3),
        "drain_s": round(max(0.0, done_at - flood["ended"]), 3),
        "closed": counted["closed_by_server"],
        "probe_gaps": counted.get("probe_gaps", 0),
        "gc": gc_figures(flood, wall),
    }
    cpu = f"server {server_cpu:.0%}, generator {generator_cpu:.0%}"
    if server_cpu >= 0.85:
        figures["bound_by"] = f"server CPU ({cpu})"
    elif generator_cpu >= 0.85:
        figures["bound_by"] = f"generator CPU ({cpu})"
    else:  # the driver's store calls between bursts: the server's loop waits on its thread
        figures["bound_by"] = f"server waits, not CPU ({cpu})"
    return figures
