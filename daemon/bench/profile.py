"""`--py-spy DIR`: the service sampled by py-spy during a load, and its hottest functions."""

from __future__ import annotations

import io
import pstats
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 200  # samples per second
TOP = 25  # functions listed, by own time and by total time


class PySpy:
    """`py-spy record --gil --nonblocking` on a process: only the thread holding the GIL is
    sampled (what the interpreter is busy with: py-spy's idle detection counts threads
    waiting on a lock as busy here), and the process is not paused for each sample (that
    cost a third of the ceiling). Written as collapsed stacks (DIR/NAME.txt, which speedscope
    and flamegraph.pl read), summarised as the functions with the most samples."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        beside = Path(sys.executable).parent / "py-spy"  # pip install py-spy into this venv
        self.executable = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        self.process: subprocess.Popen[bytes] | None = None
        self.output = self.directory / f"{name}.txt"

    def start(self, pid: int) -> None:
        if self.executable is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(  # noqa: S603 - py-spy from PATH, our own arguments
            [
                self.executable,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--gil",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> dict[str, Any] | None:
        """Stop sampling (py-spy writes its file on SIGINT) and summarise what it wrote."""
        if self.executable is None:
            return {"error": "py-spy is neither on PATH nor beside python (pip install py-spy)"}
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGINT)
        try:
            _, stderr = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        if not self.output.exists():
            return {"error": stderr.decode(errors="replace")[-500:]}
        return {"file": str(self.output), **summarise(self.output)}


# Frames every stack of a thread starts with: they say nothing about where the time goes.
ROOT_FRAMES = ("(<frozen runpy>)", "(threading.py)", "(asyncio/runners.py)", "(daemon/cli.py)")


def summarise(path: Path) -> dict[str, Any]:
    """Own and total samples per function from collapsed stacks ("a;b;c 12" lines)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not frame.endswith(ROOT_FRAMES):
                total[frame] += count
    return {
        "samples": samples,
        "own": [[name, round(n / samples, 4)] for name, n in own.most_common(TOP)]
        if samples
        else [],
        "total": [[name, round(n / samples, 4)] for name, n in total.most_common(TOP)]
        if samples
        else [],
    }


def _short(frame: str) -> str:
    """`function (path/to/module.py:123)` without the line and the site-packages prefix."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "/daemon/", "/storage/", "/handlers/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker.strip("/") in ("daemon", "storage", "handlers"):
                where = marker.strip("/") + "/" + where
            break
    return f"{name} ({where})" if where else name


def cprofile_argv(path: Path) -> list[str]:
    """What runs the service under cProfile (its main thread, the event loop, only): the
    profile is written when the service exits, SIGTERM included."""
    return [sys.executable, "-m", "cProfile", "-o", str(path)]


def cprofile_summary(path: Path, top: int = 40) -> dict[str, Any]:
    """The functions with the most own time, and with the most time under them."""
    if not path.exists():
        return {"error": f"no profile at {path} (did the service exit cleanly?)"}
    text = {}
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(str(path), stream=out).strip_dirs().sort_stats(order).print_stats(top)
        text[order] = out.getvalue()
    (path.with_suffix(".txt")).write_text(text["tottime"] + "\n" + text["cumulative"])
    return {
        "file": str(path),
        "text": str(path.with_suffix(".txt")),
        "by_own_time": text["tottime"],
    }
