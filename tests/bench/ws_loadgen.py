"""WebSocket load generator: many raw-socket subscribers on one epoll loop, frames counted, not
decoded.

    python tests/bench/ws_loadgen.py      # driven by ws_bench.py: JSON commands on stdin

One process, one thread, `select.epoll` directly (no asyncio, no object per socket beyond the
socket itself): each connection does the HTTP upgrade by hand, sends one masked `subscribe`
text frame, and from then on its bytes are only walked header to header over one shared
bytearray to count text frames. The first frame a socket gets is `subscribed`; the k-th after
it is the k-th notification, the same one on every socket (all subscribe to "*"), so delivery
to ALL subscribers is the latest arrival time of frame k over the sockets. One socket, the
probe, also decodes its frames (JSON) to learn each notification's seq and the publish time
the server put in `changes[0].summary` ("t=<epoch seconds>"). Times are `time.time()`
(CLOCK_REALTIME), the clock the server stamps with: same machine, same clock.

Commands (one JSON object a line on stdin; one JSON answer a line on stdout):
  {"cmd":"connect","port":P,"count":N,"token":T,"inflight":100,"timeout":120}
  {"cmd":"disconnect"}
  {"cmd":"latency_start","expected":K}
  {"cmd":"latency_result","wait":S}
  {"cmd":"count_start"} / {"cmd":"count_stop","expected":E,"wait":S}
  {"cmd":"stats"} / {"cmd":"quit"}
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
import sys
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


class LoadGenerator:
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

    # -- commands ----------------------------------------------------------------------------
    def reply(self, answer: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    def on_stdin(self) -> None:
        chunk = os.read(0, 65536)
        if not chunk:
            self.running = False
            return
        self.stdin_buf += chunk
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def command(self, cmd: dict[str, Any]) -> None:
        name = cmd["cmd"]
        if name == "connect":
            self.port = int(cmd["port"])
            self.token = str(cmd["token"])
            self.inflight_limit = int(cmd.get("inflight", 100))
            self.to_start = int(cmd["count"])
            started = time.time()
            base_subscribed = self.subscribed
            base_failed = sum(self.failures.values())
            goal = self.to_start

            def done() -> bool:
                return (
                    self.subscribed - base_subscribed + sum(self.failures.values()) - base_failed
                    >= goal
                )

            def answer() -> dict[str, Any]:
                return {
                    "subscribed": self.subscribed - base_subscribed,
                    "open": len(self.open_fds),
                    "failures": dict(self.failures),
                    "seconds": time.time() - started,
                }

            self.pending = (done, started + float(cmd.get("timeout", 120)), answer)
            self.start_more()
        elif name == "disconnect":
            for fd in list(self.open_fds):
                self.drop(fd)
            self.to_start = 0
            self.probe_seq = self.probe_gaps = 0  # the next server numbers from its own start
            self.reply({"open": len(self.open_fds)})
        elif name == "latency_start":
            k = int(cmd["expected"])
            self.lat_k = k
            self.lat_last = [0.0] * k
            self.lat_got = [0] * k
            self.lat_base = list(self.count)
            self.probe = []
            self.lat_on = True
            self.reply({"ok": True})
        elif name == "latency_result":
            k = self.lat_k
            receivers = len(self.open_fds)

            def done() -> bool:
                return all(g >= receivers for g in self.lat_got)

            def answer() -> dict[str, Any]:
                self.lat_on = False
                return {
                    "receivers": receivers,
                    "got": self.lat_got,
                    "last": self.lat_last,
                    "probe": self.probe[:k],
                    "probe_errors": self.probe_errors[:5],
                    "probe_gaps": self.probe_gaps,
                    "frame_bytes": self.probe_size,
                    "closed_by_server": self.closed_by_server,
                    "close_codes": {str(c): n for c, n in self.close_codes.items()},
                }

            self.pending = (done, time.time() + float(cmd.get("wait", 5)), answer)
        elif name == "count_start":
            self.samples = [(time.time(), self.total)]
            self.sampling = True
            self.next_sample = time.time() + SAMPLE_EVERY
            self.cpu_mark = time.process_time()
            self.reply({"ok": True, "total": self.total})
        elif name == "count_stop":
            goal = int(cmd.get("expected", 0))
            base = self.samples[0][1] if self.samples else self.total

            def done() -> bool:
                return self.total - base >= goal

            def answer() -> dict[str, Any]:
                self.sampling = False
                self.samples.append((time.time(), self.total))
                return {
                    "frames": self.total - base,
                    "samples": self.samples,
                    "cpu": time.process_time() - self.cpu_mark,
                    "probe_gaps": self.probe_gaps,
                    "frame_bytes": self.probe_size,
                    "open": len(self.open_fds),
                    "closed_by_server": self.closed_by_server,
                    "close_codes": {str(c): n for c, n in self.close_codes.items()},
                }

            self.pending = (done, time.time() + float(cmd.get("wait", 10)), answer)
        elif name == "stats":
            self.reply(
                {
                    "open": len(self.open_fds),
                    "subscribed": self.subscribed,
                    "total": self.total,
                    "failures": dict(self.failures),
                    "closed_by_server": self.closed_by_server,
                    "close_codes": {str(c): n for c, n in self.close_codes.items()},
                    "cpu": time.process_time(),
                }
            )
        elif name == "quit":
            self.running = False
            self.reply({"ok": True})
        else:
            self.reply({"error": f"unknown command {name}"})

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
        accept = base64.b64encode(hashlib.sha1(self.keys[fd] + GUID).digest())
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

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        epoll = self.epoll
        phase = self.phase
        while self.running:
            events = epoll.poll(0.05, self.max_fds)
            for fd, event in events:
                if fd == 0:
                    self.on_stdin()
                    continue
                if self.socks[fd] is None:
                    continue
                p = phase[fd]
                if p == OPEN:
                    self.on_data(fd)
                elif p == UPGRADING:
                    self.on_upgrade_data(fd)
                elif event & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                    self.on_writable(fd)
            now = time.time()
            if self.sampling and now >= self.next_sample:
                self.samples.append((now, self.total))
                self.next_sample = now + SAMPLE_EVERY
            if self.pending is not None:
                done, deadline, answer = self.pending
                if done() or now >= deadline:
                    self.pending = None
                    self.reply(answer())
            if self.to_start and self.inflight < self.inflight_limit:
                self.start_more()
        for fd in list(self.open_fds):
            self.drop(fd)


def main() -> int:
    LoadGenerator().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
