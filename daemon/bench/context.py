"""What every part of a bench run is given: the options, the pinning, its directory, the fakes."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.bench.common import CpuMeter, Pinning, limit_verdict
from daemon.bench.service import Fakes

BEHIND_MS = 50.0  # an open loop's call written this late (p99): the receiver fell behind


@dataclass
class Context:
    args: argparse.Namespace
    pinning: Pinning
    directory: Path
    fakes: Fakes | None = None
    notes: list[str] = field(default_factory=list)  # printed after the table

    async def the_fakes(self) -> Fakes:
        """The emulator child, started the first time a part needs it; reset for each part."""
        if self.fakes is None:
            self.fakes = Fakes(self.directory, self.pinning)
            await self.fakes.start()
        await self.fakes.reset()
        return self.fakes

    def cprofile(self, part: str) -> Path | None:
        """Where the part's service writes its cProfile (--cprofile), or None."""
        if not self.args.cprofile:
            return None
        directory = Path(self.args.cprofile)
        directory.mkdir(parents=True, exist_ok=True)
        return directory.resolve() / f"{part}.prof"

    def note_profile(self, what: str, summary: dict[str, Any] | None) -> None:
        """A line after the table saying where a profile was written (or why it was not)."""
        if summary is None:
            return
        where = summary.get("text") or summary.get("file")
        self.notes.append(f"{what}: {where or summary.get('error')}")

    async def close(self) -> None:
        if self.fakes is not None:
            await self.fakes.stop()
            self.fakes = None


class Window:
    """One measured stretch: the CPU each process used and how late the fakes' loop ran."""

    def __init__(self, pids: dict[str, int], fakes: Fakes | None, open_loop: bool) -> None:
        self.meter = CpuMeter({**pids, "generator": os.getpid()})
        if fakes is not None:
            self.meter.pids["fakes"] = fakes.child.pid
        self.fakes = fakes
        self.open_loop = open_loop
        self.fakes_stats: dict[str, Any] | None = None

    async def __aenter__(self) -> Window:
        if self.fakes is not None:
            await self.fakes.stats(mark=True)
        self.meter.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.meter.stop()
        self.fakes_stats = await self.fakes.stats(mark=True) if self.fakes is not None else None

    def figures(self, load: dict[str, Any] | None = None) -> dict[str, Any]:
        """CPU shares, the verdict on what bounded the stretch, and the fakes' loop lag;
        `load`: the figures of the open loop run in it (did its calls wait for answers?)."""
        shares = self.meter.shares
        lag = (self.fakes_stats or {}).get("lag") or {}
        verdict = limit_verdict(shares, open_loop=self.open_loop, behind=fell_behind(load))
        if lag.get("p99_ms") is not None and lag["p99_ms"] > 20:
            verdict += f"; emulator loop late (p99 {lag['p99_ms']:.0f} ms)"
        return {"cpu": shares, "emulator_loop_lag": lag or None, "bound_by": verdict}


def fell_behind(load: dict[str, Any] | None) -> bool:
    """An open loop whose calls were sent well after they were due (a worker still waiting
    for its last answer), or that could not be answered at the rate offered."""
    if not load or not load.get("offered_per_s"):
        return False
    lag = (load.get("send_lag") or {}).get("p99_ms") or 0.0
    return lag > BEHIND_MS or load["answers_per_s"] < 0.95 * load["offered_per_s"]


async def pause(seconds: float) -> None:
    """A breath between measurements (the kernel's sockets, the service's last writes)."""
    await asyncio.sleep(seconds)
