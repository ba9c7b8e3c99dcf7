"""Server-to-client WebSocket frames made once, written once per loop tick, backlog bounded."""

from __future__ import annotations

import asyncio
import json
import struct
from collections import deque
from typing import Any

from tornado.iostream import IOStream, StreamClosedError

# FIN + opcode: a whole text message, a ping. Server frames are never masked (RFC 6455 5.1), and
# compression is never negotiated, so RSV1 stays clear.
_TEXT = 0x81
PING_FRAME = b"\x89\x00"


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame around `payload` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT, size)) + payload
    if size <= 0xFFFF:
        return struct.pack("!BBH", _TEXT, 126, size) + payload
    return struct.pack("!BBQ", _TEXT, 127, size) + payload


def json_frame(message: dict[str, Any]) -> bytes:
    # ASCII output: always valid UTF-8, even for a lone surrogate that came in through JSON.
    return text_frame(json.dumps(message, separators=(",", ":")).encode("ascii"))


class Flusher:
    """Joins the frames each outbox got during one loop tick into one write per connection."""

    __slots__ = ("_dirty", "_scheduled", "frames_sent")

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self.frames_sent = 0  # handed to the streams, for the metrics

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()


class Outbox:
    """One connection's outgoing frames.

    The backlog is every frame handed to `send` that the kernel has not taken yet: the frames
    waiting for this tick's flush, plus those already given to the IOStream but still in its
    write buffer. The latter are counted per flush: after a write the kernel did not take at
    once, remember (the stream's byte index at its end, frames handed so far); the stream's own
    count of bytes written then says which flushes are done. That costs nothing while the client
    keeps up (the buffer is empty after each write) and one small tuple per tick while it does
    not. A flush half taken counts all its frames: the bound errs towards closing a little
    early, never late. The two counters are IOStream internals (there is no public figure for
    what the kernel has taken); `__init__` refuses a stream without them.
    """

    __slots__ = (
        "_flusher",
        "_handed",
        "_marks",
        "_pending",
        "_unwritten",
        "_written",
        "closed",
        "limit",
        "stream",
    )

    def __init__(self, stream: IOStream, flusher: Flusher, limit: int) -> None:
        if not hasattr(stream, "_total_write_index") or not hasattr(
            stream, "_total_write_done_index"
        ):
            raise RuntimeError("this Tornado's IOStream has no write counters: cannot bound")
        self.stream = stream
        self.limit = limit
        self.closed = False
        self._flusher = flusher
        self._pending: list[bytes] = []
        self._handed = 0  # frames given to the stream, ever
        self._written = 0  # of those, frames the kernel has taken (as of the last look)
        self._unwritten = 0  # _handed - _written, kept to make `send` cheap
        # (stream byte index at a flush's end, frames handed by then), oldest first; made when
        # first needed: an empty deque costs 600 bytes, times ten thousand idle sockets.
        self._marks: deque[tuple[int, int]] | None = None

    def send(self, frame: bytes) -> bool:
        """Queue a frame for this tick's write; False when the backlog passes the limit (the
        caller then closes the client)."""
        if self.closed:
            return True
        pending = self._pending
        pending.append(frame)
        if len(pending) == 1:
            self._flusher.mark(self)
        if len(pending) + self._unwritten > self.limit:
            self._settle()  # the figure is from the last flush: the kernel may have taken more
            return len(pending) + self._unwritten <= self.limit
        return True

    @property
    def backlog(self) -> int:
        if self.closed:
            return 0
        self._settle()
        return len(self._pending) + self._unwritten

    def flush(self) -> None:
        """Hand this tick's frames to the stream as one write (the stream writes at once what
        the kernel takes and keeps the rest); the write's future is not awaited."""
        frames = self._pending
        if self.closed or not frames:
            return
        self._pending = []
        data: bytes | memoryview = frames[0] if len(frames) == 1 else b"".join(frames)
        stream = self.stream
        if stream._total_write_done_index >= stream._total_write_index and not stream.closed():
            # Nothing queued in the stream: hand the bytes to the kernel here. IOStream.write
            # makes a Future per call and call_soon()s its callback: two objects per socket per
            # tick that outlive the tick, and at 10,000 sockets the cyclic GC's full collections
            # that follow cost more than the writes (`mrm-push bench --only ws` measures it).
            try:
                sent = stream.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the stream's own write below meets the error and closes
            if sent == len(data):
                self._handed += len(frames)
                self._flusher.frames_sent += len(frames)
                self._marks = None
                self._written = self._handed
                self._unwritten = 0
                return
            if sent:
                data = memoryview(data)[sent:]  # the rest queues in the stream, counted as usual
        try:
            stream.write(data)
        except StreamClosedError:
            self.closed = True
            return
        self._handed += len(frames)
        self._flusher.frames_sent += len(frames)
        if stream._total_write_done_index >= stream._total_write_index:
            self._marks = None  # the kernel took everything: the common case
            self._written = self._handed
            self._unwritten = 0
        else:
            if self._marks is None:
                self._marks = deque()
            self._marks.append((stream._total_write_index, self._handed))
            self._settle()

    def _settle(self) -> None:
        marks = self._marks
        if marks is not None:
            done = self.stream._total_write_done_index
            while marks and marks[0][0] <= done:
                self._written = marks.popleft()[1]
        self._unwritten = self._handed - self._written

    async def drain(self) -> bool:
        """Flush, then wait until the kernel has taken everything written so far; False when
        the stream closed (or this outbox was discarded) meanwhile."""
        self.flush()
        if self.closed:
            return False
        try:
            await self.stream.write(b"")  # resolves once every byte before it is written
        except StreamClosedError:
            self.closed = True
        return not self.closed

    def discard(self) -> None:
        """Drop what is not handed over yet and take nothing more."""
        self._pending = []
        self.closed = True
