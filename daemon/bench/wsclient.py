"""A companion-app client on the bench's loop, subscribed to "*": when each frame arrived.

It also tells the bench when every change it waits for was in a frame.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from daemon.bench.common import CALL_TIMEOUT, HOST, SUBSCRIBER_TOKEN
from daemon.bench.procs import BenchError


class WsClient:
    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: WebSocketClientConnection | None = None
        self.frames: list[tuple[int, int, float]] = []  # (notification id, seq, arrival)
        self.changes_seen: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def connect(self) -> None:
        request = HTTPRequest(
            f"ws://{HOST}:{self.port}/ws",
            headers={"Authorization": f"Bearer {SUBSCRIBER_TOKEN}"},
            request_timeout=CALL_TIMEOUT,
        )
        self.connection = await websocket_connect(request)
        await self.connection.write_message(
            json.dumps({"type": "subscribe", "calendar_ids": ["*"]})
        )
        first = await asyncio.wait_for(self.connection.read_message(), CALL_TIMEOUT)
        if not isinstance(first, str) or json.loads(first).get("type") != "subscribed":
            raise BenchError(f"the WebSocket subscribe was answered {first!r}")
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.connection is not None
        while True:
            message = await self.connection.read_message()
            if message is None:
                return
            arrived = time.time()
            data: dict[str, Any] = json.loads(message)
            if data.get("type") != "notification":
                continue
            self.frames.append((int(data["id"]), int(data["seq"]), arrived))
            for change in data.get("changes") or []:
                self.changes_seen.add(str(change.get("event_id")))
            self._changed.set()

    async def wait_for(self, changes: set[str], limit: float) -> bool:
        """Until every one of `changes` was in a frame; False after `limit` seconds."""
        deadline = time.monotonic() + limit
        while not changes <= self.changes_seen:
            left = deadline - time.monotonic()
            if left <= 0 or (self._reader is not None and self._reader.done()):
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
        return True

    def arrivals(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for notification_id, _seq, arrived in self.frames:
            found.setdefault(str(notification_id), []).append(arrived)
        return found

    def seqs(self) -> list[int]:
        return [seq for _id, seq, _at in self.frames]

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        if self._reader is not None:
            self._reader.cancel()


async def wait_fcm(fakes: Any, wanted: int, limit: float) -> bool:
    """Until the FCM emulator has accepted `wanted` messages in this part; False after `limit`
    seconds. Asks the emulator (its own CPU), never the service, which is still measured."""
    deadline = time.monotonic() + limit
    while (await fakes.stats())["fcm_messages"] < wanted:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True
