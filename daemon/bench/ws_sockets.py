"""The WebSocket load generator's sockets: raw, on one epoll loop, frames counted, not decoded.

Each connection does the HTTP upgrade by hand, sends one masked `subscribe` ("*") text frame,
and from then on its bytes are only walked header to header over one shared bytearray to count
text frames. The first frame a socket gets is `subscribed`; the k-th after it is the k-th
notification, the same one on every socket, so delivery to ALL subscribers is the latest
arrival time of frame k over the sockets. One socket, the probe, also decodes its frames (JSON)
to learn each notification's seq and the publish time the server put in `changes[0].summary`
("t=<epoch seconds>"). Times are `time.time()`, the clock the servers stamp with. Every
connection's state is in lists indexed by file descriptor (no object per socket beyond it).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import resource
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_SIZE = 1 << 18  # one recv: up to 256 KiB (many joined frames)
SAMPLE_EVERY = 0.1  # seconds between (time, frames) samples while counting
SUBSCRIBE = b'{"type":"subscribe","calendar_ids":["*"]}'

# Connection phases.
CONNECTING, UPGRADING, OPEN = 0, 1, 2


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask, RFC 6455 5.3)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes((0x80 | opcode,))
    if size < 126:
        head += bytes((0x80 | size,))
    else:
        head += bytes((0x80 | 126,)) + size.to_bytes(2, "big")
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return head + mask + body


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(wanted, soft), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return target
        except (ValueError, OSError):
            continue
    return soft


class Sockets:
    """Every connection's state in lists indexed by file descriptor."""

    def __init__(self) -> None:
        self.max_fds = min(raise_fd_limit(70000), 1 << 17)
        size = self.max_fds + 1
        self.socks: list[socket.socket | None] = [None] * size
        self.phase = [0] * size
        self.hbuf: list[bytearray | None] = [None] * size  # the upgrade answer, while upgrading
        self.keys: list[bytes] = [b""] * size
        self.skip = [0] * size  # payload bytes of the current frame still to come
        self.pend_op = [0] * size  # the opcode of that frame (counted when it ends)
        self.tail: list[bytes] = [b""] * size  # a frame header cut by the end of a recv
        self.count = [0] * size  # text frames after `subscribed` (-1 until it came)
        self.buf = bytearray(READ_SIZE + 16)
        self.view = memoryview(self.buf)
        self.epoll = select.epoll()
        self.epoll.register(0, select.EPOLLIN)
        self.open_fds: set[int] = set()
        self.port = 0
        self.token = ""
        self.to_start = 0
        self.inflight = 0  # connections started and not yet subscribed (or failed)
        self.inflight_limit = 100
        self.subscribed = 0
        self.failures: Counter[str] = Counter()
        self.close_codes: Counter[int] = Counter()
        self.closed_by_server = 0
        self.probe_fd = -1
        self.probe_buf = bytearray()
        self.probe: list[tuple[int, float]] = []  # (seq, publish time) of each notification
        self.probe_errors: list[str] = []
        self.probe_seq = 0  # the last notification seq the probe saw
        self.probe_gaps = 0  # notifications the probe saw out of order or after a gap
        self.probe_size = 0  # bytes of the last notification frame the probe saw
        # Latency: for notification k, the latest arrival over sockets and how many got it.
        self.lat_on = False
        self.lat_k = 0
        self.lat_last: list[float] = []
        self.lat_got: list[int] = []
        self.lat_base: list[int] = []  # per fd: its count when the measurement began
        # Throughput.
        self.total = 0  # text frames after `subscribed`, every socket
        self.samples: list[tuple[float, int]] = []
        self.sampling = False
        self.next_sample = 0.0
        self.cpu_mark = 0.0
        self.pending: tuple[Callable[[], bool], float, Callable[[], dict[str, Any]]] | None = None
        self.stdin_buf = b""
        self.running = True

    def reply(self, answer: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- connections -------------------------------------------------------------------------
    def start_more(self) -> None:
        while self.to_start > 0 and self.inflight < self.inflight_limit:
            self.to_start -= 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            fd = sock.fileno()
            if fd > self.max_fds:
                sock.close()
                self.failures["fd_limit"] += 1
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex((HOST, self.port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                self.failures[errno.errorcode.get(code, str(code))] += 1
                continue
            self.socks[fd] = sock
            self.phase[fd] = CONNECTING
            self.open_fds.add(fd)
            self.inflight += 1
            self.epoll.register(fd, select.EPOLLOUT)

    def fail(self, fd: int, reason: str) -> None:
        self.failures[reason] += 1
        self.drop(fd)

    def drop(self, fd: int) -> None:
        sock = self.socks[fd]
        if sock is None:
            return
        if self.phase[fd] != OPEN or self.count[fd] < 0:
            self.inflight -= 1
        self.epoll.unregister(fd)
        sock.close()
        self.socks[fd] = None
        self.hbuf[fd] = None
        self.open_fds.discard(fd)
        if fd == self.probe_fd:
            self.probe_fd = -1

    def on_writable(self, fd: int) -> None:
        sock = self.socks[fd]
        assert sock is not None
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.fail(fd, errno.errorcode.get(error, str(error)))
            return
        key = base64.b64encode(os.urandom(16))
        self.keys[fd] = key
        request = (
            f"GET /ws HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {self.token}\r\n\r\n"
        ).encode()
        try:
            sock.send(request)  # small: the new socket's buffer takes it whole
        except OSError as exc:
            self.fail(fd, type(exc).__name__)
            return
        self.phase[fd] = UPGRADING
        self.hbuf[fd] = bytearray()
        self.epoll.modify(fd, select.EPOLLIN)

    def on_upgrade_data(self, fd: int) -> None:
        sock = self.socks[fd]
        head = self.hbuf[fd]
        assert sock is not None and head is not None
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(fd, type(exc).__name__)
            return
        if not chunk:
            self.fail(fd, "eof_during_upgrade")
            return
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(head[:end]).split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            self.fail(fd, "http_" + status[1].decode(errors="replace") if len(status) > 1 else "?")
            return
        # RFC 6455's accept key is SHA-1 by definition, not a security choice.
        accept = base64.b64encode(
            hashlib.sha1(self.keys[fd] + GUID, usedforsecurity=False).digest()
        )
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])
        }
        if headers.get(b"sec-websocket-accept") != accept:
            self.fail(fd, "bad_accept")
            return
        rest = bytes(head[end + 4 :])
        self.hbuf[fd] = None
        self.phase[fd] = OPEN
        self.count[fd] = -1  # the first text frame is `subscribed`
        self.skip[fd] = 0
        self.tail[fd] = b""
        if self.probe_fd < 0:
            self.probe_fd = fd
            self.probe_buf = bytearray()
        try:
            sock.send(masked_frame(0x1, SUBSCRIBE))
        except OSError as exc:
            self.fail(fd, type(exc).__name__)
            return
        if rest:
            self.buf[: len(rest)] = rest
            self.frames(fd, 0, len(rest), time.time())

    # -- frames ------------------------------------------------------------------------------
    def on_data(self, fd: int) -> None:
        sock = self.socks[fd]
        assert sock is not None
        tail = self.tail[fd]
        start = len(tail)
        try:
            if start:
                self.buf[:start] = tail
                got = sock.recv_into(self.view[start:READ_SIZE])
            else:
                got = sock.recv_into(self.view[:READ_SIZE])
        except BlockingIOError:
            return
        except OSError:
            got = 0
        if got == 0:
            self.closed_by_server += 1
            self.drop(fd)
            return
        self.frames(fd, start, start + got, time.time())

    def frames(self, fd: int, fresh: int, n: int, now: float) -> None:
        """Walk the frames in buf[0:n] (buf[fresh:n] just received) for socket `fd`."""
        buf = self.buf
        if fd == self.probe_fd:
            self.probe_buf += buf[fresh:n]
            self.decode_probe()
        i = 0
        texts = 0
        lat = self.lat_on
        close = -1
        s = self.skip[fd]
        if s:
            if s > n:
                self.skip[fd] = s - n
                return
            self.skip[fd] = 0
            i = s
            op = self.pend_op[fd]
            if op == 1:
                if lat:
                    self.arrived(fd, self.count[fd], now)
                texts += 1
            elif op == 8:
                close = 0  # its code was in an earlier read
                n = i
        while n - i >= 2:
            b1 = buf[i + 1] & 0x7F
            if b1 < 126:
                head = 2
            elif b1 == 126:
                if n - i < 4:
                    break
                b1 = buf[i + 2] << 8 | buf[i + 3]
                head = 4
            else:
                if n - i < 10:
                    break
                b1 = int.from_bytes(buf[i + 2 : i + 10], "big")
                head = 10
            op = buf[i] & 0x0F
            end = i + head + b1
            if end > n:
                self.skip[fd] = end - n
                self.pend_op[fd] = op
                i = n
                break
            if op == 1:
                if lat:
                    self.arrived(fd, self.count[fd] + texts, now)
                texts += 1
            elif op == 8:
                close = buf[i + head] << 8 | buf[i + head + 1] if b1 >= 2 else 1005
                i = n = end
                break
            i = end
        self.tail[fd] = bytes(buf[i:n]) if i < n else b""
        if texts:
            c = self.count[fd]
            if c < 0:  # `subscribed`: counted neither as a notification nor in the total
                texts -= 1
                self.count[fd] = c + 1
                self.subscribed += 1
                self.inflight -= 1
                if self.to_start:
                    self.start_more()
            self.count[fd] += texts
            self.total += texts
        if close >= 0:
            self.close_frame(fd, close)

    def arrived(self, fd: int, index: int, now: float) -> None:
        """Text frame `index` of socket `fd` (-1: `subscribed`) came whole at `now`; latency
        runs only (a few frames per second per socket)."""
        k = index - self.lat_base[fd]
        if 0 <= k < self.lat_k and index >= 0:
            self.lat_got[k] += 1
            if now > self.lat_last[k]:
                self.lat_last[k] = now

    def close_frame(self, fd: int, code: int) -> None:
        self.close_codes[code] += 1
        self.closed_by_server += 1
        sock = self.socks[fd]
        if sock is not None:
            try:
                sock.send(masked_frame(0x8, code.to_bytes(2, "big") if code else b""))
            except OSError:
                pass
        self.drop(fd)

    def decode_probe(self) -> None:
        """The probe socket's frames, decoded: seq and publish time of each notification."""
        data = self.probe_buf
        i = 0
        while len(data) - i >= 2:
            size = data[i + 1] & 0x7F
            head = 2
            if size == 126:
                if len(data) - i < 4:
                    break
                size, head = data[i + 2] << 8 | data[i + 3], 4
            elif size == 127:
                if len(data) - i < 10:
                    break
                size, head = int.from_bytes(data[i + 2 : i + 10], "big"), 10
            if len(data) - i < head + size:
                break
            if data[i] & 0x0F == 1:
                try:
                    message = json.loads(bytes(data[i + head : i + head + size]))
                    if message.get("type") == "notification":
                        self.probe_size = head + size
                        seq = int(message["seq"])
                        if self.probe_seq and seq != self.probe_seq + 1:
                            self.probe_gaps += 1  # every socket sees every seq, in order
                        self.probe_seq = seq
                        if self.lat_on:
                            summary = message["changes"][0]["summary"]
                            self.probe.append((seq, float(summary[2:])))
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    self.probe_errors.append(f"{type(exc).__name__}: {exc}")
            i += head + size
        del data[:i]
