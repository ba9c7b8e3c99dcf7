"""The WebSocket part's load generator: many raw-socket subscribers on one epoll loop.

    python -m daemon.bench.ws_loadgen      # driven by `mrm-push bench`: JSON commands on stdin

One process, one thread, `select.epoll` directly (no asyncio: a client that decodes each frame
cannot read 100,000 frames/s on one core); the sockets are daemon/bench/ws_sockets.py's.

Commands (one JSON object a line on stdin; one JSON answer a line on stdout):
  {"cmd":"connect","port":P,"count":N,"token":T,"inflight":100,"timeout":120}
  {"cmd":"disconnect"}
  {"cmd":"latency_start","expected":K}
  {"cmd":"latency_result","wait":S}
  {"cmd":"count_start"} / {"cmd":"count_stop","expected":E,"wait":S}
  {"cmd":"stats"} / {"cmd":"quit"}
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any

from daemon.bench.ws_sockets import OPEN, SAMPLE_EVERY, UPGRADING, Sockets


class LoadGenerator(Sockets):
    """The sockets, driven by the commands on stdin."""

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
