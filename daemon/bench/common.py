"""What every part of the bench shares: constants, CPU pinning, /proc readings, percentiles."""

from __future__ import annotations

import os
import platform
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # everything the bench starts or calls is on loopback
# Made afresh by each run, for the services it starts (and shown nowhere).
API_KEY = "bench-" + secrets.token_urlsafe(24)
SUBSCRIBER_TOKEN = "bench-" + secrets.token_urlsafe(24)
PROJECT_ID = "mrm-push-emulator"
START_TIMEOUT = 60.0  # a child process to say it is ready
CALL_TIMEOUT = 30.0  # one HTTP call (webhook, API, emulator control)


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty sequence."""
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def latency_figures(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p99 and max in milliseconds (None when there is nothing to count)."""
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(ordered),
        "p50_ms": round(1000 * percentile(ordered, 0.5), 3),
        "p99_ms": round(1000 * percentile(ordered, 0.99), 3),
        "max_ms": round(1000 * ordered[-1], 3),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- /proc ------------------------------------------------------------------------------------


def process_cpu(pid: int, thread: int | None = None) -> float | None:
    """User plus system CPU seconds of a process (all its threads), or of one of its threads
    (the main one's id is the process's: its event loop); None once it is gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of proc(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


class CpuMeter:
    """CPU used by some processes between start() and stop(), as a share of one CPU; for the
    service, its main thread (the event loop) too, as `service_loop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._cpu: dict[str, float | None] = {}
        self._wall = 0.0
        self.shares: dict[str, float | None] = {}

    def _read(self) -> dict[str, float | None]:
        found = {name: process_cpu(pid) for name, pid in self.pids.items()}
        if "service" in self.pids:
            found["service_loop"] = process_cpu(self.pids["service"], self.pids["service"])
        return found

    def start(self) -> CpuMeter:
        self._cpu = self._read()
        self._wall = time.monotonic()
        return self

    def stop(self) -> dict[str, float | None]:
        wall = max(time.monotonic() - self._wall, 1e-9)
        for name, after in self._read().items():
            before = self._cpu.get(name)
            self.shares[name] = (
                None if before is None or after is None else round((after - before) / wall, 3)
            )
        return self.shares


def limit_verdict(shares: dict[str, float | None], *, open_loop: bool, behind: bool = False) -> str:
    """What bounded a measurement, from the CPU each side used (a share of one CPU each):
    the service, the load generator, the emulator, or none of them. The service's event loop
    is one thread: at 85% of a CPU it is the limit whatever the rest do. `behind`: an open
    loop whose calls waited for the answers to earlier ones (the receiver fell behind)."""
    if "service" not in shares:  # --url: not ours, its CPU is not read
        return f"not read (--url); generator CPU {shares.get('generator') or 0:.0%}"
    service = shares.get("service") or 0.0
    loop = shares.get("service_loop") or 0.0
    cpu = f"service {service:.0%}, its event loop {loop:.0%}"
    if loop >= 0.85:
        return f"service event loop CPU ({cpu})"
    if service >= 0.85:
        return f"service CPU ({cpu})"
    others = {k: v or 0.0 for k, v in shares.items() if k not in ("service", "service_loop")}
    if sum(others.values()) >= 0.85:  # the generator and the fakes share the other CPU
        name = max(others, key=lambda k: others[k])
        return f"{'emulator' if name == 'fakes' else name} CPU ({others[name]:.0%}; {cpu})"
    if open_loop and not behind:
        return f"offered rate ({cpu})"
    return f"service waits, not CPU ({cpu})"


# -- pinning ------------------------------------------------------------------------------------


@dataclass
class Pinning:
    """Which CPU the service side and the load side run on, or why nothing is pinned."""

    enabled: bool
    service_cpu: int | None = None
    load_cpu: int | None = None
    description: str = ""
    pinned: list[str] = field(default_factory=list)

    def for_service(self) -> Callable[[], None] | None:
        """A preexec_fn that pins a child to the service's CPU (None when not pinning)."""
        return _pin(self.service_cpu) if self.enabled else None

    def for_load(self) -> Callable[[], None] | None:
        return _pin(self.load_cpu) if self.enabled else None

    def note(self, what: str, side: str) -> None:
        cpu = self.service_cpu if side == "service" else self.load_cpu
        if self.enabled:
            self.pinned.append(f"{what}: CPU {cpu}")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _pin(cpu: int | None) -> Callable[[], None]:
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return pin


def plan_pinning(enabled: bool) -> Pinning:
    """The service side (the service, the reference receivers, the WebSocket servers) on the
    first CPU, this process (load generator) and the other children (emulator, WebSocket load
    generator) on the second, with os.sched_setaffinity, when at least two CPUs are usable."""
    if not enabled:
        return Pinning(False, description="none (--no-pin): every process shares the CPUs")
    if not hasattr(os, "sched_setaffinity"):
        return Pinning(False, description="none (no os.sched_setaffinity here): CPUs shared")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(False, description=f"none (only CPU {cpus} usable): every process shares it")
    service, load = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load})
    pinning = Pinning(
        True,
        service,
        load,
        f"service side on CPU {service}; load generator and emulator on CPU {load} "
        "(os.sched_setaffinity)",
    )
    pinning.note("bench process (load generator, WebSocket client, accounting)", "load")
    return pinning


# -- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        # Other work on the machine before the run (the figures depend on it).
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
    }
