"""Running the installed `mrm-push` console script from a test's event loop, so that the service
the test started in-process keeps serving while the command talks to it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "mrm-push"
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "daemon.cli"]
LINE_WAIT = 10.0  # seconds for an awaited line: the signal, never a sleep


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without what would change where the command goes or with which key."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MRM_PUSH_API_KEY", "MRM_PUSH_CONFIG") and not k.startswith("MRM_PUSH__")
    }
    return {**env, **(extra or {})}


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Result:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(env),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def start_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(env),
        cwd=ROOT,
    )


async def next_line(stream: asyncio.StreamReader | None, timeout: float = LINE_WAIT) -> str:  # noqa: ASYNC109
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the command closed its output"
    return line.decode().rstrip("\n")


async def line_starting(
    stream: asyncio.StreamReader | None,
    prefix: str,
    seen: list[str] | None = None,
    timeout: float = LINE_WAIT,  # noqa: ASYNC109
) -> str:
    """The next line that starts with `prefix`; the lines before it are added to `seen`."""
    while True:
        line = await next_line(stream, timeout)
        if line.startswith(prefix):
            return line
        if seen is not None:
            seen.append(line)
