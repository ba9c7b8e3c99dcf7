"""The bench's child processes: started pinned, spoken to in JSON lines, always stopped."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tornado.httpclient import AsyncHTTPClient

from daemon.bench.common import START_TIMEOUT

FD_LIMIT = 70000  # WebSocket children hold tens of thousands of sockets


class BenchError(Exception):
    """A part could not run (a child did not start, a set-up call failed): the part is
    reported as failed with this text, and the bench goes on with the next one."""


def preexec(pin: Callable[[], None] | None, fds: bool = False) -> Callable[[], None] | None:
    """The function a child runs before exec: its CPU, and a higher file descriptor limit."""
    if pin is None and not fds:
        return None

    def run() -> None:
        if pin is not None:
            pin()
        if fds:
            raise_fd_limit()

    return run


def raise_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for target in ((FD_LIMIT, max(FD_LIMIT, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            return
        except (ValueError, OSError):
            continue


def module_argv(module: str, *args: str) -> list[str]:
    """This Python running one of the bench's modules (or the service's CLI)."""
    return [sys.executable, "-m", module, *args]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("  | " + line for line in text)


class AsyncChild:
    """A child on the bench's loop: its first stdout line is a JSON `ready` object, its
    stderr goes to a file. Used for the emulator, the reference receivers and the service."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        pin: Callable[[], None] | None,
        *,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.pin = pin
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def spawn(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            preexec_fn=preexec(self.pin),
        )

    async def start(self) -> dict[str, Any]:
        """Spawn it and read its `ready` line."""
        await self.spawn()
        assert self.process is not None and self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        try:
            ready = json.loads(line) if line else {}
        except ValueError:
            ready = {}
        if not ready.get("ready"):
            await self.stop()
            raise BenchError(f"{self.name} did not start:\n{log_tail(self.log_path)}")
        return dict(ready)

    async def wait_http(self, url: str) -> None:
        """Until `url` answers 200 (the service writes no ready line); BenchError if it exits
        or does not answer within START_TIMEOUT."""
        assert self.process is not None
        client = AsyncHTTPClient()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.returncode is None:
            try:
                response = await client.fetch(url, raise_error=False, request_timeout=2)
            except OSError:
                response = None
            if response is not None and response.code == 200:
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise BenchError(f"{self.name} did not start:\n{log_tail(self.log_path)}")

    async def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; its exit code."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode


class SyncChild:
    """A child spoken to in JSON lines, one command and one answer at a time (the WebSocket
    part: its load generator and servers; nothing else runs meanwhile in the bench)."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, pin: Callable[[], None] | None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - our own Python and modules, no shell
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=preexec(pin, fds=True),
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:g} s\n{self.tail()}")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"{self.name}: exited\n{self.tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def call(self, cmd: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def tail(self) -> str:
        self._log.flush()
        return log_tail(self.log_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
