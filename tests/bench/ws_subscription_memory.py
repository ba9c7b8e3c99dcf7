"""Memory that WebSocket subscriptions cost the server, and what stays after the sockets close.

    python tests/bench/ws_subscription_memory.py                  # 100 x 1,000 ids of 1,000 chars
    python tests/bench/ws_subscription_memory.py --shared         # every socket the same ids
    python tests/bench/ws_subscription_memory.py --tracemalloc    # Python's own count beside RSS

The service (the real Service: config, SQLite store, /ws handler, fan-out hub) runs in a child
process (`ws_subscription_memory.py serve`) that answers commands on stdin with figures about
itself: RSS (/proc/self/status), glibc's heap (mallinfo2: bytes in use and free in the
arenas), tracemalloc's count of Python allocations, the objects the cyclic GC tracks, and how
many fan-out Clients and /ws handlers are still alive. This script connects `--clients`
tornado WebSocket clients, each subscribing to `--subscriptions` calendar ids of `--id-length`
characters (in frames under websocket.max_message_size), then closes them all, and reads the
figures at each step: before, subscribed, closed (the hub has let every socket go), after a
full gc.collect(), and after malloc_trim(0). Not a test: it prints a table and exits 0.
Everything stays on 127.0.0.1; the child is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `daemon` is the repo's

HOST = "127.0.0.1"
TOKEN = "bench-subscriber-token-0123456789abcdef"
MAX_MESSAGE_SIZE = 65536


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return libc
    except (OSError, AttributeError):
        return None  # not glibc (or older than 2.33): those figures are left out


# -- the service (child process) ---------------------------------------------------------------


def figures(service: Any) -> dict[str, Any]:
    from daemon.fanout import Client
    from handlers.websocket import WebSocketFeedHandler

    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    found: dict[str, Any] = {"rss": rss}
    libc = _libc()
    if libc is not None:
        info = libc.mallinfo2()
        # uordblks: bytes malloc has handed out (main arena and the others); fordblks: bytes
        # free inside the arenas, kept by malloc rather than given back; hblkhd: mmap'ed blocks.
        found.update(
            heap_in_use=info.uordblks + info.hblkhd,
            heap_free=info.fordblks,
            heap_arena=info.arena,
        )
    if tracemalloc.is_tracing():
        found["python_traced"] = tracemalloc.get_traced_memory()[0]
    if not tracemalloc.is_tracing():  # tracing hooks the allocator: no arena figures then
        found["pymalloc_arenas"] = _pymalloc_arenas()
    objects = gc.get_objects()
    found["gc_tracked"] = len(objects)
    found["clients_alive"] = sum(1 for o in objects if type(o) is Client)
    found["handlers_alive"] = sum(1 for o in objects if isinstance(o, WebSocketFeedHandler))
    del objects
    hub = service.fanout
    found.update(
        connected=hub.connected,
        subscriptions=hub.subscriptions,
        calendars=len(getattr(hub, "index", hub).by_calendar),  # (before the index module)
        gc_counts=list(gc.get_count()),
    )
    return found


def _pymalloc_arenas() -> int:
    """Python's small-object allocator's arenas (1 MiB each) in use: it prints that to fd 2."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        for line in out.read().decode(errors="replace").splitlines():
            if line.startswith("# arenas allocated current"):
                return int(line.split("=")[1].replace(",", "").strip())
    return 0


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
    _answer({"ready": True, "port": service.port})
    snapshots: list[tracemalloc.Snapshot] = []
    all_closed = asyncio.Event()
    hub = service.fanout
    disconnect = hub.disconnect

    def disconnected(client: Any) -> None:
        disconnect(client)
        if not hub.connected:
            all_closed.set()

    hub.disconnect = disconnected
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            name = json.loads(line)["cmd"]
            answer: dict[str, Any]
            if name == "figures":
                answer = figures(service)
            elif name == "gc":
                answer = {"collected": gc.collect()}
            elif name == "trim":
                libc = _libc()
                started = time.perf_counter()
                trimmed = bool(libc.malloc_trim(0)) if libc else None
                answer = {"trimmed": trimmed, "ms": 1000 * (time.perf_counter() - started)}
            elif name == "snapshot":
                snapshots.append(tracemalloc.take_snapshot())
                answer = {"snapshots": len(snapshots)}
            elif name == "retained":
                answer = {"rows": retained(snapshots[0], tracemalloc.take_snapshot())}
            elif name == "all_closed":
                if hub.connected:
                    all_closed.clear()
                    await all_closed.wait()
                answer = {"connected": service.fanout.connected}
            elif name == "quit":
                break
            else:
                answer = {"error": f"unknown command {name}"}
            _answer(answer)
    finally:
        await service.stop()


def retained(before: tracemalloc.Snapshot, now: tracemalloc.Snapshot) -> list[str]:
    """The allocation lines holding more now than at `before`, largest first."""
    rows = []
    for stat in now.compare_to(before, "lineno")[:8]:
        if stat.size_diff <= 0:
            break
        frame = stat.traceback[0]
        where = frame.filename.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")
        rows.append(
            f"{stat.size_diff / 1024:9.1f} KiB {stat.count_diff:7d} blocks {where}:{frame.lineno}"
        )
    return rows


def _answer(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


# -- the clients (this process) ----------------------------------------------------------------


class Child:
    def __init__(self, config: Path, trace: bool) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "serve", str(config)]
        if trace:
            command.append("--tracemalloc")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        self.port = int(self.read()["port"])

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the service stopped")
        return dict(json.loads(line))

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, SystemExit):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def calendar_ids(args: argparse.Namespace, client: int) -> list[str]:
    suffix = "@resource.calendar.google.com"
    owner = client - client % args.clients if args.shared else client
    ids = []
    for n in range(args.subscriptions):
        head = f"c{owner:05d}-{n:05d}-"
        ids.append((head + "x" * args.id_length)[: args.id_length - len(suffix)] + suffix)
    return ids


def frames_of(ids: list[str]) -> list[str]:
    """Subscribe messages holding `ids`, each under the server's max_message_size."""
    frames, batch = [], []
    for calendar_id in ids:
        trial = json.dumps({"type": "subscribe", "calendar_ids": [*batch, calendar_id]})
        if len(trial.encode()) > MAX_MESSAGE_SIZE - 64 and batch:
            frames.append(json.dumps({"type": "subscribe", "calendar_ids": batch}))
            batch = []
        batch.append(calendar_id)
    if batch:
        frames.append(json.dumps({"type": "subscribe", "calendar_ids": batch}))
    return frames


async def subscribed_client(port: int, ids: list[str]) -> tuple[Any, int, int]:
    """A client holding its subscriptions: (connection, calendars accepted, refused)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(f"ws://{HOST}:{port}/ws", headers={"Authorization": f"Bearer {TOKEN}"})
    ws = await websocket_connect(request, max_message_size=2**24)
    for frame in frames_of(ids):
        await ws.write_message(frame)
    await ws.write_message(json.dumps({"type": "ping"}))
    accepted = refused = 0
    while True:
        text = await ws.read_message()
        if text is None:
            raise SystemExit(f"closed: {ws.close_code} {ws.close_reason}")
        message = json.loads(text)
        if message["type"] == "pong":
            return ws, accepted, refused
        if message["type"] == "subscribed":
            accepted += len(message["calendar_ids"])
        elif message.get("code") == "too_many_subscriptions":
            refused += len(message["calendar_ids"])


async def run(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="ws-subscription-memory-"))
    config = {
        "server": {"host": HOST, "port": 0, "public_url": f"http://{HOST}:8080"},
        "storage": {"url": f"sqlite:///{directory / 'bench.sqlite3'}"},
        "auth": {"subscribers": [{"token": TOKEN, "calendars": ["*"]}]},
        "logging": {"level": "warning"},
        "sync": {"poll_interval": 0},
        "websocket": {"max_message_size": MAX_MESSAGE_SIZE, "ping_interval": 3600},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    child = Child(path, args.tracemalloc)
    rows: list[tuple[str, dict[str, Any]]] = []
    trim: dict[str, Any] = {}
    kept: list[str] = []
    accepted = refused = 0
    try:
        rows.append(("before", child.ask("figures")))
        if args.tracemalloc:
            child.ask("snapshot")
        for wave in range(1, args.waves + 1):
            clients = []
            for n in range(args.clients):
                ids = calendar_ids(args, n + wave * args.clients)
                ws, took, left = await subscribed_client(child.port, ids)
                clients.append(ws)
                accepted, refused = accepted + took, refused + left
            rows.append((f"subscribed {wave}", child.ask("figures")))
            for ws in clients:
                ws.close()
            for ws in clients:
                await ws.read_message()  # None once the server has answered the close
            child.ask("all_closed")  # on_close follows the close handshake on the server
            del clients
            rows.append((f"closed {wave}", child.ask("figures")))
        child.ask("gc")
        rows.append(("gc.collect()", child.ask("figures")))
        if args.tracemalloc:
            kept = child.ask("retained")["rows"]
        trim = child.ask("trim")
        rows.append(("malloc_trim(0)", child.ask("figures")))
    finally:
        child.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"{args.waves} x {args.clients} sockets x {args.subscriptions} ids of {args.id_length} "
        f"chars ({'the same ids in a wave' if args.shared else 'distinct ids'}): "
        f"{accepted} subscriptions accepted, {refused} refused"
    )
    show(rows)
    if kept:
        print("held after gc.collect() that was not before (tracemalloc, by line):")
        print("\n".join("  " + row for row in kept))
    if trim.get("trimmed") is not None:
        print(f"malloc_trim(0) took {trim['ms']:.1f} ms on the service's loop")


def show(rows: list[tuple[str, dict[str, Any]]]) -> None:
    mib = 1024 * 1024
    columns = [
        ("rss", "RSS MiB", mib),
        ("heap_in_use", "malloc used", mib),  # MiB
        ("heap_free", "malloc free", mib),
        ("python_traced", "traced MiB", mib),
        ("pymalloc_arenas", "py arenas", 1),  # 1 MiB each
        ("gc_tracked", "GC objects", 1),
        ("clients_alive", "Clients", 1),
        ("handlers_alive", "handlers", 1),
        ("subscriptions", "subs", 1),
    ]
    present = [c for c in columns if c[0] in rows[0][1]]
    print(f"{'step':<15}" + "".join(f"{label:>12}" for _, label, _ in present))
    for step, found in rows:
        cells = []
        for name, _, unit in present:
            value = found[name]
            cells.append(f"{value / unit:>12.1f}" if unit != 1 else f"{value:>12d}")
        print(f"{step:<15}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve")
    child.add_argument("config")
    child.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--subscriptions", type=int, default=1000)
    parser.add_argument("--id-length", type=int, default=1000)
    parser.add_argument("--shared", action="store_true", help="every socket the same ids")
    parser.add_argument("--waves", type=int, default=2, help="connect, subscribe, close: again")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.config, args.tracemalloc))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
