"""`mrm-push bench`'s options, registered on the mrm-push command line."""

from __future__ import annotations

import argparse
from typing import Any

PARTS = ("ingest", "e2e", "ws", "fcm")

DESCRIPTION = """\
Start mrm-push (`mrm-push serve` with a temporary config and SQLite store), the Google/FCM
emulator and a load generator in separate processes, pinned (the service on one CPU, the rest
on another), measure webhook ingest against two reference receivers, webhook-to-FCM and
webhook-to-WebSocket latency, WebSocket fan-out against websockets.broadcast() and FCM sends/s,
and print one table. Exit status 1 when a notification was lost or duplicated, or a part
failed. Everything stays on 127.0.0.1."""


def _parts(text: str) -> list[str]:
    parts = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {','.join(PARTS)} (got {text!r})")
    return parts


def _bursts(text: str) -> list[int]:
    try:
        bursts = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated whole numbers") from None
    if not bursts or min(bursts) < 1:
        raise argparse.ArgumentTypeError("bursts are 1 or more")
    return bursts


def _positive(kind: type[int] | type[float]) -> Any:
    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be above 0")
        return value

    return check


def add_bench_command(commands: Any) -> None:
    """The `bench` subcommand and its options."""
    bench = commands.add_parser(
        "bench",
        help="measure webhook ingest, latency to the tablets, WebSocket fan-out, FCM sends",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pos_int, pos_float = _positive(int), _positive(float)
    add = bench.add_argument
    add("--only", type=_parts, default=",".join(PARTS), help="parts to run, comma-separated")
    add("--json", metavar="FILE", help="write every figure, the machine and the options here")
    add("--max-seconds", type=pos_float, default=120.0, help="bound of each load and each wait")
    add("--no-pin", action="store_true", help="do not pin processes to CPUs")
    add(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the services' (info: an access-log line per call, as in production)",
    )
    add("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    add("--py-spy", metavar="DIR", help="sample the service with py-spy during the ingest ceiling")
    add(
        "--cprofile",
        metavar="DIR",
        help="run the services of ingest, e2e and fcm under cProfile (slower: figures not "
        "comparable); DIR/PART.prof and .txt",
    )
    url = bench.add_argument_group("a running service instead of the bench's own (ingest only)")
    url.add_argument("--url", help="the service, on 127.0.0.1 (its webhook at /notifications)")
    url.add_argument(
        "--api-key-file",
        help="a file holding an API key of that service (or $MRM_PUSH_API_KEY)",
    )
    url.add_argument("--emulator-url", help="the emulator that service's Google is pointed at")
    ingest = bench.add_argument_group("ingest")
    ingest.add_argument("--connections", type=pos_int, default=50, help="keep-alive connections")
    ingest.add_argument("--channels", type=pos_int, default=50, help="rooms (channels) receiving")
    ingest.add_argument("--requests", type=pos_int, default=4000, help="webhooks, closed loop")
    ingest.add_argument("--rate", type=pos_float, default=500.0, help="webhooks/s, open loop")
    ingest.add_argument("--rate-seconds", type=pos_float, default=6.0, help="open loop's length")
    ingest.add_argument("--tablets", type=pos_int, default=1, help="FCM tokens per room")
    e2e = bench.add_argument_group("e2e")
    e2e.add_argument("--calendars", type=pos_int, default=100, help="rooms with a tablet each")
    e2e.add_argument("--e2e-rate", type=pos_float, default=500.0, help="notifications/s")
    e2e.add_argument("--e2e-seconds", type=pos_float, default=6.0, help="length of the load")
    ws = bench.add_argument_group("ws")
    ws.add_argument("--ws-clients", type=pos_int, default=2000, help="subscribed sockets")
    ws.add_argument("--ws-latency-count", type=pos_int, default=50, help="notifications timed")
    ws.add_argument("--ws-latency-rate", type=pos_float, default=10.0, help="their rate, per s")
    ws.add_argument("--ws-flood-seconds", type=pos_float, default=5.0, help="each flood's length")
    ws.add_argument("--ws-bursts", type=_bursts, default="1,8", help="notifications per tick")
    ws.add_argument("--ws-max-queue", type=pos_int, default=1000, help="slow-client bound, both")
    ws.add_argument("--ws-profile-cpu", action="store_true", help="one more flood, cProfiled")
    ws.add_argument(
        "--ws-profile-memory",
        action="store_true",
        help="mrm-push again under tracemalloc: the biggest allocations per idle client",
    )
    fcm = bench.add_argument_group("fcm")
    fcm.add_argument("--fcm-rooms", type=pos_int, default=10, help="rooms")
    fcm.add_argument("--fcm-tokens", type=pos_int, default=100, help="tablet tokens per room")
    fcm.add_argument("--fcm-rounds", type=pos_int, default=10, help="publications per room")


def run(args: argparse.Namespace) -> int:
    from daemon.bench.run import run_bench

    return run_bench(args)
