"""Part (c), WebSocket fan-out: mrm-push's hub against `websockets.broadcast()`, same load.

Three processes: the server under test on the service's CPU (first mrm-push, daemon/bench/
ws_server.py: the real Service with a driver that publishes as a sync does; then the
reference, daemon/bench/ws_reference.py), the load generator (daemon/bench/ws_loadgen.py: raw
sockets on one epoll loop, frames counted, not decoded) on the other CPU, and the bench beside
it sending JSON commands and reading /proc. Both servers: compression off, no pings, the same
slow-client bound. Measured on each: memory per idle client (RSS after N subscribed idle
clients minus before, after a warm-up and a gc), latency to all (notifications at a steady
rate, each stamped with its publish time; the moment its frame reached the LAST socket), and
frames/s received during floods at each burst (notifications per loop tick).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import yaml

from daemon.bench.common import HOST, SUBSCRIBER_TOKEN, free_port, rss_kb
from daemon.bench.context import Context
from daemon.bench.procs import BenchError, SyncChild, module_argv
from daemon.bench.ws_measure import measure_latency, measure_throughput


def write_config(directory: Path, port: int, clients: int, max_queue: int) -> Path:
    config = {
        "server": {"host": HOST, "port": port, "public_url": f"http://{HOST}:{port}"},
        "storage": {"url": f"sqlite:///{directory / 'ws.sqlite3'}"},
        "auth": {"subscribers": [{"token": SUBSCRIBER_TOKEN, "calendars": ["*"]}]},
        "logging": {"level": "warning"},
        "sync": {"poll_interval": 0},
        "websocket": {
            "max_queue": max_queue,
            "max_connections": max(20000, clients + 1000),
            "ping_interval": 3600,  # no pings during the bench (the generator does not answer)
        },
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def connect(generator: SyncChild, port: int, count: int, label: str) -> dict[str, Any]:
    answer = generator.call(
        {
            "cmd": "connect",
            "port": port,
            "count": count,
            "token": SUBSCRIBER_TOKEN,
            "inflight": 100,
        },
        timeout=180,
    )
    if answer["subscribed"] != count:
        raise BenchError(f"{label}: {answer['subscribed']} of {count} subscribed: {answer}")
    return answer


def measure_memory(
    server: SyncChild, generator: SyncChild, port: int, clients: int
) -> dict[str, Any]:
    # A warm-up first (lazy imports, first-use caches, the first notification's path), so that
    # the difference is what the sockets hold.
    rest = min(2.0, 0.2 + clients / 5000)
    connect(generator, port, min(50, clients), server.name)
    server.call({"cmd": "publish", "count": 2, "rate": 20})
    generator.call({"cmd": "disconnect"})
    time.sleep(rest / 2)
    server.call({"cmd": "gc"})
    before = rss_kb(server.pid)
    answer = connect(generator, port, clients, server.name)
    time.sleep(rest)
    after = rss_kb(server.pid)
    return {
        "clients": clients,
        "connect_s": round(answer["seconds"], 2),
        "rss_before_kb": before,
        "rss_after_kb": after,
        "kb_per_client": round((after - before) * 1024 / clients / 1000, 2),
    }


def suite(server: SyncChild, generator: SyncChild, port: int, args: Any) -> dict[str, Any]:
    ready = server.read(60)
    if not ready.get("ready"):
        raise BenchError(f"{server.name}: {ready}")
    results: dict[str, Any] = {"memory": measure_memory(server, generator, port, args.ws_clients)}
    results["latency"] = measure_latency(
        server, generator, args.ws_latency_count, args.ws_latency_rate
    )
    for burst in args.ws_bursts:
        time.sleep(0.5)
        results[f"burst{burst}"] = measure_throughput(
            server, generator, args.ws_flood_seconds, burst, args.ws_clients
        )
    if server.name == "mrm-push" and args.ws_profile_cpu:
        time.sleep(0.5)
        server.call({"cmd": "profile_start"})
        measure_throughput(
            server, generator, args.ws_flood_seconds, args.ws_bursts[-1], args.ws_clients
        )
        results["profile"] = server.call({"cmd": "profile_stop", "top": 30})["text"]
    results["slow_closes"] = server.call({"cmd": "stats"}).get("slow_closes", 0)
    generator.call({"cmd": "disconnect"})
    return results


def profile_memory(
    ctx: Context, generator: SyncChild, directory: Path, clients: int
) -> dict[str, Any]:
    """mrm-push again with tracemalloc on: what each idle socket's Python objects are."""
    directory = directory / "tracemalloc"  # a store of its own
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(directory, port, clients, ctx.args.ws_max_queue)
    argv = module_argv("daemon.bench.ws_server", "--config", str(config), "--trace")
    server = SyncChild(
        "mrm-push+tracemalloc", argv, directory / "server.log", ctx.pinning.for_service()
    )
    try:
        if not server.read(60).get("ready"):
            raise BenchError("mrm-push with tracemalloc did not start")
        connect(generator, port, min(50, clients), server.name)
        generator.call({"cmd": "disconnect"})
        time.sleep(0.5)
        server.call({"cmd": "snapshot"})
        connect(generator, port, clients, server.name)
        time.sleep(0.5)
        server.call({"cmd": "snapshot"}, timeout=120)
        found = server.call({"cmd": "compare", "per": clients, "top": 20}, 120)
        generator.call({"cmd": "disconnect"})
    finally:
        server.stop()
    return found


def run_ws(ctx: Context) -> dict[str, Any]:
    """Both servers in turn against one generator; blocking (it runs in a thread)."""
    args = ctx.args
    directory = ctx.directory / "ws"
    directory.mkdir(parents=True, exist_ok=True)
    pin = ctx.pinning
    children: list[SyncChild] = []
    ours: dict[str, Any] = {}
    reference: dict[str, Any] | None = None
    missing = importlib.util.find_spec("websockets") is None
    try:
        generator = SyncChild(
            "generator",
            module_argv("daemon.bench.ws_loadgen"),
            directory / "generator.log",
            pin.for_load(),
        )
        children.append(generator)
        pin.note("WebSocket load generator", "load")
        port = free_port()
        config = write_config(directory, port, args.ws_clients, args.ws_max_queue)
        server = SyncChild(
            "mrm-push",
            module_argv("daemon.bench.ws_server", "--config", str(config)),
            directory / "mrm-push.log",
            pin.for_service(),
        )
        children.append(server)
        pin.note("mrm-push WebSocket server (Service + publishing driver)", "service")
        ours = suite(server, generator, port, args)
        server.stop()
        if args.ws_profile_memory:
            ours["tracemalloc"] = profile_memory(ctx, generator, directory, args.ws_clients)
        if not missing:
            port = free_port()
            argv = module_argv(
                "daemon.bench.ws_reference",
                "--port",
                str(port),
                "--token",
                SUBSCRIBER_TOKEN,
                "--max-queue",
                str(args.ws_max_queue),
            )
            ref = SyncChild("websockets", argv, directory / "websockets.log", pin.for_service())
            children.append(ref)
            pin.note("websockets.broadcast() reference server", "service")
            reference = suite(ref, generator, port, args)
            ref.stop()
        generator.stop()
    finally:
        for child in children:
            child.stop()
    return summarise(ours, reference, args, missing)


def summarise(
    ours: dict[str, Any], reference: dict[str, Any] | None, args: Any, missing: bool
) -> dict[str, Any]:
    ratios: dict[str, float | None] = {}
    if reference is not None:
        for burst in args.ws_bursts:
            key = f"burst{burst}"
            theirs = reference[key]["frames_per_s"]
            ratios[f"frames_per_s_{key}"] = (
                round(ours[key]["frames_per_s"] / theirs, 3) if theirs else None
            )
        theirs_p99 = reference["latency"]["p99_ms"]
        ratios["latency_p99"] = (
            round(ours["latency"]["p99_ms"] / theirs_p99, 3) if theirs_p99 else None
        )
        theirs_kb = reference["memory"]["kb_per_client"]
        ratios["kb_per_client"] = (
            round(ours["memory"]["kb_per_client"] / theirs_kb, 3) if theirs_kb > 0 else None
        )
    missing_frames = ours["latency"]["missing"] + sum(
        ours[f"burst{b}"]["expected"] - ours[f"burst{b}"]["frames"] for b in args.ws_bursts
    )
    return {
        "clients": args.ws_clients,
        "mrm-push": ours,
        "websockets": reference,
        "reference_skipped": (
            "the websockets package is not installed (pip install 'mrm-push[bench]'): "
            "mrm-push measured alone, no ratio"
            if missing
            else None
        ),
        "ratios": ratios,
        "lost": {"ws_missing": max(0, missing_frames)},
        "lost_total": max(0, missing_frames),
        "duplicated_total": 0,
    }
