"""Part (a), webhook ingest: the ceiling and the answer time at a fixed rate, against references.

The closed-loop ceiling and the answer time at a fixed rate, for the bare and naive reference
receivers and for mrm-push with its syncs and FCM sends running, all from the same generator
in the same run.
"""

from __future__ import annotations

import email.utils
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from daemon.bench.accounting import account
from daemon.bench.common import HOST
from daemon.bench.context import Context, Window, pause
from daemon.bench.load import LoadResult, Target, run_load
from daemon.bench.procs import AsyncChild, module_argv
from daemon.bench.profile import PySpy
from daemon.bench.service import (
    Api,
    Fakes,
    ServiceProcess,
    all_notifications,
    http,
    make_rooms,
    room_name,
    settle,
    warm_up,
)

WEBHOOK_PATH = "/notifications"


def reference_targets(count: int) -> list[Target]:
    expiration = email.utils.formatdate(time.time() + 7 * 86400, usegmt=True)
    return [
        Target(
            channel_id=f"ref-channel-{i:04d}",
            token=secrets.token_urlsafe(24),
            resource_id=secrets.token_urlsafe(18)[:27],
            calendar_id=room_name("ref", i),
            expiration=expiration,
            number=1,
        )
        for i in range(count)
    ]


async def measure(
    ctx: Context,
    targets: list[Target],
    port: int,
    pids: dict[str, int],
    *,
    rate: float,
    count: int,
    fakes: Fakes | None = None,
) -> tuple[LoadResult, dict[str, Any]]:
    """One load (closed loop when `rate` is 0), with what bounded it (and how the fakes'
    loop kept up, when they run)."""
    args = ctx.args
    async with Window(pids, fakes, open_loop=bool(rate)) as window:
        result = await run_load(
            targets,
            count,
            args.connections,
            port,
            WEBHOOK_PATH,
            max_seconds=args.max_seconds,
            rate=rate,
        )
    figures = result.figures()
    figures.update(window.figures(figures))
    if result.requested > sum(result.statuses.values()):
        figures["stopped_by_max_seconds"] = True
    return result, figures


async def reference_run(ctx: Context, kind: str) -> dict[str, Any]:
    """A reference receiver in a child on the service's CPU, measured like mrm-push."""
    args = ctx.args
    directory = ctx.directory / f"ingest-{kind}"
    directory.mkdir(parents=True, exist_ok=True)
    targets = reference_targets(args.channels)
    channels = {t.channel_id: [t.token, t.resource_id] for t in targets}
    channels_file = directory / "channels.json"
    channels_file.write_text(json.dumps(channels))
    argv = module_argv(
        "daemon.bench.receivers", "--kind", kind, "--channels", str(channels_file)
    ) + (["--db", str(directory / "naive.sqlite3")] if kind == "naive" else [])
    child = AsyncChild(
        f"{kind} receiver", argv, directory / "receiver.log", ctx.pinning.for_service()
    )
    ctx.pinning.note(f"{kind} reference receiver", "service")
    port = int((await child.start())["port"])
    try:
        pids = {"service": child.pid}
        closed, closed_figures = await measure(
            ctx, targets, port, pids, rate=0, count=args.requests
        )
        await pause(0.5)
        fixed, fixed_figures = await measure(
            ctx, targets, port, pids, rate=args.rate, count=rate_count(args)
        )
        counted = await http("GET", f"http://{HOST}:{port}/count")
    finally:
        await child.stop()
    answered = closed.answered_200 + fixed.answered_200
    lost: dict[str, int] = {}
    if kind == "naive":
        lost["unstored"] = max(0, answered - int(counted["rows"] or 0))
    return {
        "closed": closed_figures,
        "rate": fixed_figures,
        "rows": counted["rows"],
        "lost": lost,
        "lost_total": sum(lost.values()),
        "duplicated_total": 0,
    }


def rate_count(args: Any) -> int:
    return max(1, int(args.rate * args.rate_seconds))


@dataclass
class Under:
    """The service measured: the bench's own, or a running one (--url)."""

    api: Api
    port: int
    pid: int | None  # None: not ours, its CPU is not read
    emulator_url: str
    fakes: Fakes | None  # the bench's emulator; None: no changes made, no FCM counted


async def mrm_push_run(ctx: Context) -> dict[str, Any]:
    """mrm-push as in production: rooms with tablets, real channels through the emulator, the
    emulator's calendars changing (a new event on each in turn, at --rate in all) so that the
    syncs the webhooks cause find changes, publish them and send FCM messages."""
    args = ctx.args
    if args.url:
        port = urlsplit(args.url).port or 80
        under = Under(Api(args.url.rstrip("/"), args.api_key), port, None, args.emulator_url, None)
        return await measure_service(ctx, under)
    fakes = await ctx.the_fakes()
    service = ServiceProcess(
        ctx.directory / "ingest-mrm-push",
        fakes,
        ctx.pinning,
        args.log_level,
        "ingest",
        ctx.cprofile("ingest"),
    )
    await service.start()
    try:
        under = Under(service.api, service.port, service.pid, fakes.url, fakes)
        figures = await measure_service(ctx, under)
    finally:
        exit_code = await service.stop()
    cprofile = service.profile()
    ctx.note_profile("cProfile of the ingest service", cprofile)
    ctx.note_profile("py-spy of the ingest ceiling", figures.get("profile"))
    return {**figures, "service_exit_code": exit_code, "cprofile": cprofile}


async def measure_service(ctx: Context, under: Under) -> dict[str, Any]:
    args = ctx.args
    rooms = {
        room_name("ingest", i): [f"tablet-ingest-{i:04d}-{k}" for k in range(args.tablets)]
        for i in range(args.channels)
    }
    targets = await make_rooms(under.api, under.emulator_url, rooms)
    try:
        warm = await warm_up(under.api, under.port, under.fakes, targets, "u", args.max_seconds)
        if under.fakes is not None:
            body = {"calendars": list(rooms), "rate": args.rate, "prefix": "i"}
            await under.fakes.call("POST", "/bench/changer", body)
        pids = {"service": under.pid} if under.pid is not None else {}
        spy = PySpy(args.py_spy, "ingest-closed-loop") if args.py_spy and under.pid else None
        if spy is not None and under.pid is not None:
            spy.start(under.pid)
        try:
            closed, closed_figures = await measure(
                ctx, targets, under.port, pids, rate=0, count=args.requests, fakes=under.fakes
            )
        finally:
            profile = spy.stop() if spy is not None else None
        between = await settle(under.api, args.max_seconds)
        fixed, fixed_figures = await measure(
            ctx,
            targets,
            under.port,
            pids,
            rate=args.rate,
            count=rate_count(args),
            fakes=under.fakes,
        )
        made: list[list[str]] = []
        if under.fakes is not None:
            made = (await under.fakes.call("POST", "/bench/changer/stop", {}))["events"]
        # One more webhook per calendar after the last change, so that every change is synced.
        flush = await run_load(
            targets,
            len(targets),
            args.connections,
            under.port,
            WEBHOOK_PATH,
            max_seconds=args.max_seconds,
        )
        after = await settle(under.api, args.max_seconds)
        stored = await all_notifications(under.api, unpublished=True)
        published = await all_notifications(under.api, unpublished=False)
        fcm_rows = await under.fakes.fcm_messages() if under.fakes is not None else None
    finally:
        if under.fakes is None:  # a service that is not ours: leave it as it was
            for name in rooms:
                await under.api.call("DELETE", "/v1/rooms/" + quote(name, safe=""))
    ours = set(rooms)
    outcome = account(
        answered_200=sum(r.answered_200 for r in (warm.load, closed, fixed, flush)),
        stored=[n for n in stored if n["calendar_id"] in ours],
        published=[n for n in published if n["calendar_id"] in ours],
        changes=warm.changes + [event_id for _calendar, event_id in made]
        if under.fakes is not None
        else None,
        room_tokens=rooms,
        fcm_rows=fcm_rows,
    )
    return {
        "closed": closed_figures,
        "rate": fixed_figures,
        "warm_up": {"webhooks": warm.load.answered_200, "settle": warm.settle},
        "settle_between": between,
        "settle_after": after,
        "changes_made": len(made),
        "syncs_find_changes": under.fakes is not None,
        "profile": profile,
        **outcome,
    }


async def run_ingest(ctx: Context) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for kind in ("bare", "naive"):
        runs[kind] = await reference_run(ctx, kind)
    runs["mrm-push"] = await mrm_push_run(ctx)
    ours, naive, bare = runs["mrm-push"], runs["naive"], runs["bare"]
    ratios = {
        "closed_answers_per_s_vs_naive": _ratio(
            ours["closed"]["answers_per_s"], naive["closed"]["answers_per_s"]
        ),
        "closed_answers_per_s_vs_bare": _ratio(
            ours["closed"]["answers_per_s"], bare["closed"]["answers_per_s"]
        ),
        "rate_p99_vs_naive": _ratio(ours["rate"]["p99_ms"], naive["rate"]["p99_ms"]),
    }
    return {
        "runs": runs,
        "ratios": ratios,
        "lost": ours["lost"],
        "lost_total": sum(r["lost_total"] for r in runs.values()),
        "duplicated_total": sum(r["duplicated_total"] for r in runs.values()),
    }


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if not ours or not theirs:
        return None
    return round(ours / theirs, 3)
