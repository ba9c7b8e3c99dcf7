"""The load generator: Google's webhook calls over raw keep-alive sockets, closed or open loop."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from daemon.bench.common import CALL_TIMEOUT, HOST, latency_figures

RESOURCE_URI = "https://www.googleapis.com/calendar/v3/calendars/{}/events?alt=json"


@dataclass
class Target:
    """One channel as Google knows it: what a genuine webhook call carries."""

    channel_id: str
    token: str
    resource_id: str
    calendar_id: str
    expiration: str  # as the header carries it (RFC 1123)
    number: int  # the last message number sent on it
    resource_uri: str = ""

    def __post_init__(self) -> None:
        if not self.resource_uri:
            self.resource_uri = RESOURCE_URI.format(quote(self.calendar_id, safe=""))
        self._head = (
            f"X-Goog-Channel-ID: {self.channel_id}\r\n"
            f"X-Goog-Channel-Token: {self.token}\r\n"
            f"X-Goog-Channel-Expiration: {self.expiration}\r\n"
            f"X-Goog-Resource-ID: {self.resource_id}\r\n"
            "X-Goog-Resource-State: exists\r\n"
            f"X-Goog-Resource-URI: {self.resource_uri}\r\n"
        ).encode()

    def next_headers(self) -> bytes:
        """The X-Goog headers of the next message on this channel (numbers increase by one)."""
        self.number += 1
        return self._head + f"X-Goog-Message-Number: {self.number}\r\n".encode()


class RawConnection:
    """One keep-alive HTTP/1.1 connection: a request written, its whole answer read, again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, headers: bytes = b"") -> int:
        """POST `path` with no body and these header lines; the answer's status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Length: 0\r\n".encode()
            + headers
            + b"\r\n"
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        length, close = 0, False
        for line in lines:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
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


# Called before a webhook is sent (the e2e part makes its calendar change there): the worker's
# number, the request's index, its channel.
Before = Callable[[int, int, Target], Awaitable[None]]
# Called as the webhook is written: the request's index, its channel, time.time() then.
OnSent = Callable[[int, Target, float], None]


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    statuses: Counter[int | str] = field(default_factory=Counter)
    started: float = 0.0
    ended: float = 0.0
    requested: int = 0
    rate: float = 0.0  # offered requests/s (0: closed loop)
    connections: int = 0
    # Open loop: how long after its due time each call was written (a busy worker, the timer).
    send_lags: list[float] = field(default_factory=list)

    @property
    def answered_200(self) -> int:
        return self.statuses.get(200, 0)

    def figures(self) -> dict[str, Any]:
        elapsed = max(self.ended - self.started, 1e-9)
        sent = sum(self.statuses.values())
        return {
            "mode": "open loop" if self.rate else "closed loop",
            "offered_per_s": self.rate or None,
            "connections": self.connections,
            "requested": self.requested,
            "sent": sent,
            "answered_200": self.answered_200,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "elapsed_s": round(elapsed, 3),
            "answers_per_s": round(self.answered_200 / elapsed, 1),
            **latency_figures(self.latencies),
            "send_lag": latency_figures(self.send_lags) if self.rate else None,
        }


async def run_load(
    targets: list[Target],
    count: int,
    connections: int,
    port: int,
    path: str,
    *,
    max_seconds: float,
    rate: float = 0.0,
    before: Before | None = None,
    on_sent: OnSent | None = None,
) -> LoadResult:
    """`count` webhook calls from `connections` workers, each owning its channels, so that every
    channel's numbers arrive in order (Google sends one message at a time per channel).

    Closed loop (`rate` 0): each worker sends its next call when the last is answered, which
    finds the ceiling. Open loop: call i is due at i / rate seconds and its time counts from
    then, so a late answer also delays the calls queued behind it and that wait is counted,
    not hidden. Sending stops after `max_seconds` whatever is left."""
    workers = max(1, min(connections, len(targets)))
    result = LoadResult(requested=count, rate=rate, connections=workers)
    next_index = 0
    deadline = time.monotonic() + max_seconds

    async def worker(number: int, owned: list[Target]) -> None:
        nonlocal next_index
        connection = RawConnection(port)
        turn = 0
        try:
            while next_index < count and time.monotonic() < deadline:
                index = next_index
                next_index += 1
                target = owned[turn % len(owned)]
                turn += 1
                due = result.started + index / rate if rate else None
                if due is not None:
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if before is not None:
                    await before(number, index, target)
                headers = target.next_headers()
                if on_sent is not None:
                    on_sent(index, target, time.time())
                began = time.perf_counter()
                if due is not None:
                    # Counted from when it was due: a worker still waiting for its last answer
                    # sends late, and that wait belongs to the receiver.
                    result.send_lags.append(began - due)
                    began = min(began, due)
                try:
                    status: int | str = await asyncio.wait_for(
                        connection.post(path, headers), CALL_TIMEOUT
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    status = type(exc).__name__
                    connection.close()
                else:
                    result.latencies.append(time.perf_counter() - began)
                result.statuses[status] += 1
        finally:
            connection.close()

    groups = [targets[w::workers] for w in range(workers)]
    result.started = time.perf_counter()
    await asyncio.gather(*(worker(w, group) for w, group in enumerate(groups)))
    result.ended = time.perf_counter()
    return result
