"""A bench run: the parts asked for, one after the other, then the table and the JSON."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from daemon.bench.common import Pinning, machine, plan_pinning
from daemon.bench.context import Context
from daemon.bench.procs import BenchError
from daemon.bench.report import render, table
from daemon.client import UsageError
from daemon.opcli import API_KEY_ENV, read_secret_file

LOOPBACK = ("127.0.0.1", "localhost")
MAX_TOKENS_PER_ROOM = 1000  # what PUT /v1/rooms takes
BUSY = 0.5  # a load average above this at the start: other work shares the CPUs


def problems(args: argparse.Namespace) -> list[str]:
    found = []
    if args.url:
        host = urlsplit(args.url).hostname
        if host not in LOOPBACK:
            found.append(f"--url must be on 127.0.0.1 (the bench stays on loopback), not {host}")
        if not getattr(args, "api_key", None) or not args.emulator_url:
            found.append(
                "--url needs an API key (--api-key-file or $MRM_PUSH_API_KEY) and "
                "--emulator-url (its channels' tokens)"
            )
        elif urlsplit(args.emulator_url).hostname not in LOOPBACK:
            found.append("--emulator-url must be on 127.0.0.1")
    if args.fcm_tokens > MAX_TOKENS_PER_ROOM or args.tablets > MAX_TOKENS_PER_ROOM:
        found.append(f"a room takes at most {MAX_TOKENS_PER_ROOM} tokens")
    return found


def skipped_with_url(name: str) -> str | None:
    if name == "ingest":
        return None
    return "needs the bench's own service and emulator: run without --url"


async def run_parts(ctx: Context) -> dict[str, dict[str, Any]]:
    from daemon.bench.e2e import run_e2e
    from daemon.bench.fcmsends import run_fcm
    from daemon.bench.ingest import run_ingest
    from daemon.bench.ws_part import run_ws

    async def ws(ctx: Context) -> dict[str, Any]:
        return await asyncio.to_thread(run_ws, ctx)

    runners: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
        "ingest": run_ingest,
        "e2e": run_e2e,
        "ws": ws,
        "fcm": run_fcm,
    }
    parts: dict[str, dict[str, Any]] = {}
    for name in ctx.args.only:
        reason = skipped_with_url(name) if ctx.args.url else None
        if reason is not None:
            parts[name] = {"status": "skipped", "reason": reason}
            print(f"{name}: skipped ({reason})", flush=True)
            continue
        print(f"{name}: running ...", flush=True)
        began = time.monotonic()
        try:
            figures = await runners[name](ctx)
        except BenchError as error:
            parts[name] = {"status": "failed", "error": str(error)}
        except Exception as error:  # the other parts still run; the traceback goes in the JSON
            parts[name] = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
        else:
            parts[name] = {"status": "ok", **figures}
        parts[name]["seconds"] = round(time.monotonic() - began, 1)
        print(f"{name}: {parts[name]['status']} in {parts[name]['seconds']:.0f} s", flush=True)
        if parts[name]["status"] == "failed":
            print(f"  {parts[name]['error']}", flush=True)
    return parts


async def bench(args: argparse.Namespace, directory: Path, pinning: Pinning) -> dict[str, Any]:
    ctx = Context(args, pinning, directory)
    try:
        parts = await run_parts(ctx)
    finally:
        await ctx.close()
    return {"parts": parts, "notes": ctx.notes}


def exit_code(parts: dict[str, dict[str, Any]]) -> int:
    for part in parts.values():
        if part.get("status") == "failed":
            return 1
        if part.get("lost_total") or part.get("duplicated_total"):
            return 1
    return 0


def options(args: argparse.Namespace) -> dict[str, Any]:
    hidden = {"api_key", "api_key_file", "command"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in hidden}


def api_key(args: argparse.Namespace) -> str | None:
    """--url's key: the first line of --api-key-file, else $MRM_PUSH_API_KEY (never argv)."""
    if args.api_key_file:
        return read_secret_file("--api-key-file", args.api_key_file)
    return os.environ.get(API_KEY_ENV, "").strip() or None


def run_bench(args: argparse.Namespace) -> int:
    try:
        args.api_key = api_key(args) if args.url else None
    except UsageError as error:
        print(f"mrm-push bench: {error}", file=sys.stderr)
        return 2
    found = problems(args)
    if found:
        for problem in found:
            print(f"mrm-push bench: {problem}", file=sys.stderr)
        return 2
    host = machine()  # before pinning: the CPUs this run may use, the load before it
    if args.url:
        pinning = Pinning(False, description="none (--url: the service is not the bench's)")
    else:
        pinning = plan_pinning(not args.no_pin)
    print(
        f"mrm-push bench: parts {','.join(args.only)}; pinning: {pinning.description}", flush=True
    )
    load = host["load_average"][0]
    if load >= BUSY:
        print(f"  the machine is busy (load average {load:.2f}): the figures will be noisier")
    directory = Path(tempfile.mkdtemp(prefix="mrm-push-bench-"))
    started = time.time()
    try:
        outcome = asyncio.run(bench(args, directory, pinning))
    finally:
        if args.keep:
            print(f"kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    parts = outcome["parts"]
    rows = table(parts)
    code = exit_code(parts)
    seconds = round(time.time() - started, 1)
    print()
    print(render(rows))
    print()
    print(f"pinning: {pinning.description}")
    for line in pinning.pinned:
        print(f"  {line}")
    for note in outcome["notes"]:
        print(note)
    print(f"whole run: {seconds:.0f} s; exit status {code}")
    if args.json:
        report = {
            "version": 1,
            "mrm_push": _version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": seconds,
            "machine": host,
            "pinning": pinning.as_json(),
            "options": options(args),
            "parts": parts,
            "table": rows,
            "lost_total": sum(p.get("lost_total", 0) for p in parts.values()),
            "duplicated_total": sum(p.get("duplicated_total", 0) for p in parts.values()),
            "exit_code": code,
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return code


def _version() -> str:
    try:
        return importlib.metadata.version("mrm-push")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
