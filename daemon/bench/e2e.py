"""Part (b), webhook to tablet: the time from a webhook to its FCM message and WebSocket frame.

Each webhook follows a real change of an emulated calendar, and the time from its send to the
FCM message at the FCM emulator (and to the frame at a WebSocket client subscribed to "*") is
taken per change, at a fixed notifications/s over N calendars.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from daemon.bench.accounting import account, change_latencies
from daemon.bench.common import latency_figures
from daemon.bench.context import Context, Window
from daemon.bench.load import Target, run_load
from daemon.bench.service import (
    Changes,
    ServiceProcess,
    all_notifications,
    make_rooms,
    room_name,
    settle,
    warm_up,
)
from daemon.bench.wsclient import WsClient, wait_fcm

WEBHOOK_PATH = "/notifications"


async def run_e2e(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    fakes = await ctx.the_fakes()
    service = ServiceProcess(
        ctx.directory / "e2e", fakes, ctx.pinning, args.log_level, "e2e", ctx.cprofile("e2e")
    )
    await service.start()
    ws = WsClient(service.port)
    changes = Changes(fakes, args.connections, "e")
    try:
        rooms = {room_name("e2e", i): [f"tablet-e2e-{i:04d}"] for i in range(args.calendars)}
        targets = await make_rooms(service.api, fakes.url, rooms)
        await ws.connect()
        warm = await warm_up(service.api, service.port, fakes, targets, "u", args.max_seconds)
        sent_at: dict[str, float] = {}

        def sent(index: int, target: Target, at: float) -> None:
            sent_at[changes.by_index[index]] = at

        count = max(1, int(args.e2e_rate * args.e2e_seconds))
        async with Window({"service": service.pid}, fakes, open_loop=True) as window:
            load = await run_load(
                targets,
                count,
                args.connections,
                service.port,
                WEBHOOK_PATH,
                max_seconds=args.max_seconds,
                rate=args.e2e_rate,
                before=changes,
                on_sent=sent,
            )
            # Every change at the WebSocket client, then one FCM message per tablet for each
            # notification it saw: what the service still does is measured too.
            seen_all = await ws.wait_for(set(sent_at), args.max_seconds)
            fcm_all = await wait_fcm(fakes, len(ws.frames), args.max_seconds)
        settled = await settle(service.api, args.max_seconds)
        stored = await all_notifications(service.api, unpublished=True)
        published = await all_notifications(service.api, unpublished=False)
        rows = await fakes.fcm_messages()
    finally:
        ws.close()
        changes.close()
        exit_code = await service.stop()
    profile = service.profile()
    ctx.note_profile("cProfile of the e2e service", profile)
    fcm_arrivals: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        fcm_arrivals[str(row[1])].append(float(row[5]))
    webhook = load.figures()
    return {
        "calendars": args.calendars,
        "offered_per_s": args.e2e_rate,
        "webhooks": webhook,
        "fcm": latency_figures(change_latencies(sent_at, published, fcm_arrivals)),
        "ws": latency_figures(change_latencies(sent_at, published, ws.arrivals())),
        "publications": len(published),
        "changes_per_publication": round(len(sent_at) / len(published), 2) if published else None,
        "waited": {"ws_all_changes": seen_all, "fcm_all_messages": fcm_all},
        "warm_up": {"webhooks": warm.load.answered_200, "settle": warm.settle},
        "settle": settled,
        "service_exit_code": exit_code,
        "cprofile": profile,
        **window.figures(webhook),
        **account(
            answered_200=warm.load.answered_200 + load.answered_200,
            stored=stored,
            published=published,
            changes=warm.changes + changes.made,
            room_tokens=rooms,
            fcm_rows=rows,
            ws_seqs=ws.seqs(),
        ),
    }
