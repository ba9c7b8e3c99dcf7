"""The WebSocket part's reference: a server on the `websockets` library's broadcast().

    python -m daemon.bench.ws_reference --port P --token T   # driven by `mrm-push bench`

asyncio, `websockets.asyncio.server.serve` with compression off and no keepalive pings, and
just enough of contract 5 for the load generator: a Bearer token checked before the upgrade,
`subscribe` answered with `subscribed` (every socket gets every notification), `ping` with
`pong`. Publication is `websockets.broadcast(subscribers, text)`: the JSON encoded once, each
connection framing and writing it (the library's way). The driver in this process builds the
same `notification` message the mrm-push hub sends (same keys, same sizes), stamped with the
publish time in `changes[0].summary`.

The slow-client bound, as in mrm-push: a client whose unsent backlog passes `--max-queue`
messages is dropped. broadcast() has no bound of its own (it never waits), so a sweep every
SWEEP_EVERY seconds compares each transport's write buffer with max_queue times the last frame
size and aborts the connections over it (mrm-push checks at every send; the sweep is cheaper).

Commands on stdin, one JSON object a line, answers on stdout: `publish` (count, rate), `flood`
(seconds, burst), `stats`, `gc`, `quit`; see daemon/bench/ws_part.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import json
import logging
import sys
import time
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when run: ws_server.py takes make_change from here without them
    from websockets.asyncio.server import Server, ServerConnection
    from websockets.http11 import Request, Response

CALENDAR = "bench-room-0001@resource.calendar.google.com"
SWEEP_EVERY = 0.1  # seconds between slow-client sweeps


def rfc3339(ts: float) -> str:
    """As daemon/clock.py writes times: UTC, milliseconds, Z."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def make_change(number: int, published: float) -> dict[str, Any]:
    """The one change of a bench notification; `summary` carries the publish time."""
    return {
        "event_id": f"bench-event-{number}",
        "status": "confirmed",
        "updated": "2024-05-01T09:00:00Z",
        "start": "2024-05-02T09:00:00Z",
        "end": "2024-05-02T10:00:00Z",
        "summary": f"t={published:.6f}",
    }


def notification_text(seq: int, published: float) -> str:
    """The message daemon/fanout.py's notification_message() makes, for the same input."""
    return json.dumps(
        {
            "type": "notification",
            "id": seq,
            "seq": seq,
            "calendar_id": CALENDAR,
            "source": "poll",
            "resource_state": "exists",
            "changes": [make_change(seq, published)],
            "full_resync": False,
            "received_at": rfc3339(published),
        },
        separators=(",", ":"),
    )


class GcClock:
    """Time the cyclic garbage collector takes, by generation (both servers' drivers report
    it: with ten thousand sockets a full collection walks every object they hold)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        spent = time.perf_counter() - self._began
        generation = info["generation"]
        self.count[generation] += 1
        self.seconds[generation] += spent
        self.longest = max(self.longest, spent)

    def mark(self) -> tuple[list[int], list[float]]:
        self.longest = 0.0
        return list(self.count), list(self.seconds)

    def since(self, mark: tuple[list[int], list[float]]) -> dict[str, Any]:
        count, seconds = mark
        return {
            "gc_collections": [a - b for a, b in zip(self.count, count, strict=True)],
            "gc_seconds": [a - b for a, b in zip(self.seconds, seconds, strict=True)],
            "gc_longest_s": self.longest,
        }


class Reference:
    def __init__(self, token: str, max_queue: int) -> None:
        from websockets.asyncio.server import broadcast

        self.broadcast = broadcast
        self.token = token
        self.max_queue = max_queue
        self.subscribers: set[ServerConnection] = set()
        self.connections = 0
        self.seq = 0
        self.frame_size = 300  # bytes; the last broadcast's frame, for the backlog bound
        self.frames_sent = 0
        self.slow_closes = 0
        self.server: Server | None = None
        self.gc_clock = GcClock()

    # -- the WebSocket side ------------------------------------------------------------------
    def check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        if hmac.compare_digest(given, self.token.encode()):
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid subscriber token is required")

    async def handler(self, connection: ServerConnection) -> None:
        self.connections += 1
        try:
            async for message in connection:
                try:
                    data = json.loads(message)
                except ValueError:
                    continue
                kind = data.get("type") if isinstance(data, dict) else None
                if kind == "subscribe":
                    self.subscribers.add(connection)
                    await connection.send(
                        json.dumps(
                            {"type": "subscribed", "calendar_ids": ["*"], "store_epoch": "ref"},
                            separators=(",", ":"),
                        )
                    )
                elif kind == "ping":
                    await connection.send('{"type":"pong"}')
        finally:
            self.subscribers.discard(connection)
            self.connections -= 1

    async def sweep(self) -> None:
        """Drop connections whose unsent backlog passes max_queue frames."""
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            limit = self.max_queue * self.frame_size
            slow = [c for c in self.subscribers if c.transport.get_write_buffer_size() > limit]
            for connection in slow:
                self.slow_closes += 1
                self.subscribers.discard(connection)
                connection.transport.abort()  # the backlog goes with it; the client sees 1006

    # -- the driver --------------------------------------------------------------------------
    def publish_one(self) -> None:
        self.seq += 1
        text = notification_text(self.seq, time.time())
        self.frame_size = len(text) + 4
        self.frames_sent += len(self.subscribers)
        self.broadcast(self.subscribers, text)

    async def publish(self, count: int, rate: float) -> dict[str, Any]:
        """`count` notifications at `rate` per second (each at its due time)."""
        started = time.monotonic()
        late = 0.0
        gc_mark = self.gc_clock.mark()
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            self.publish_one()
        return {"published": count, "late_max": late, **self.gc_clock.since(gc_mark)}

    async def flood(self, seconds: float, burst: int) -> dict[str, Any]:
        """Publish `burst` notifications per loop tick until `seconds` have passed: as fast as
        the loop comes back (each tick also writes out what the last one queued)."""
        cpu, frames = time.process_time(), self.frames_sent
        gc_mark = self.gc_clock.mark()
        started = time.time()
        deadline = time.monotonic() + seconds
        published = 0
        while time.monotonic() < deadline:
            for _ in range(burst):
                self.publish_one()
            published += burst
            await asyncio.sleep(0)
        ended = time.time()
        return {
            "published": published,
            "started": started,
            "ended": ended,
            "cpu": time.process_time() - cpu,
            "frames_handed": self.frames_sent - frames,
            **self.gc_clock.since(gc_mark),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connections,
            "subscribers": len(self.subscribers),
            "frames_sent": self.frames_sent,
            "slow_closes": self.slow_closes,
            "cpu": time.process_time(),
        }


async def control(reference: Reference) -> None:
    """JSON commands on stdin, answers on stdout, until `quit` or EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "publish":
            answer = await reference.publish(int(cmd["count"]), float(cmd["rate"]))
        elif name == "flood":
            answer = await reference.flood(float(cmd["seconds"]), int(cmd.get("burst", 1)))
        elif name == "stats":
            answer = reference.stats()
        elif name == "gc":
            answer = {"collected": gc.collect()}
        elif name == "quit":
            break
        else:
            answer = {"error": f"unknown command {name}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import serve

    reference = Reference(args.token, args.max_queue)
    async with serve(
        reference.handler,
        "127.0.0.1",
        args.port,
        compression=None,
        ping_interval=None,
        process_request=reference.check_token,
        max_size=args.max_message_size,
        write_limit=args.max_queue * reference.frame_size,
        backlog=128,  # as Tornado's bind_sockets
    ) as server:
        reference.server = server
        sweeper = asyncio.get_running_loop().create_task(reference.sweep())
        sys.stdout.write(json.dumps({"ready": True, "port": args.port}) + "\n")
        sys.stdout.flush()
        try:
            await control(reference)
        finally:
            sweeper.cancel()
            server.close()  # closes every connection (1001), as mrm-push does at shutdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--max-queue", type=int, default=1000, help="messages, as mrm-push's")
    parser.add_argument("--max-message-size", type=int, default=65536)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
