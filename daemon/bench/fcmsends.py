"""Part (d), FCM sends/s: the delivery worker sending to the FCM emulator as fast as it can.

Many published notifications times many tablet tokens, counted where they arrive.
"""

from __future__ import annotations

from typing import Any

from daemon.bench.accounting import account
from daemon.bench.context import Context, Window
from daemon.bench.load import LoadResult, run_load
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


async def run_fcm(ctx: Context) -> dict[str, Any]:
    """--fcm-rounds rounds of one change and its webhook per room; a round starts once the
    last one's notifications are published (seen at the WebSocket client), so that each round
    is a publication per room and --fcm-tokens deliveries each, and the outbox fills faster
    than FCM sends drain it."""
    args = ctx.args
    fakes = await ctx.the_fakes()
    service = ServiceProcess(
        ctx.directory / "fcm", fakes, ctx.pinning, args.log_level, "fcm", ctx.cprofile("fcm")
    )
    await service.start()
    ws = WsClient(service.port)
    changes = Changes(fakes, args.fcm_rooms, "f")
    loads: list[LoadResult] = []
    try:
        rooms = {
            room_name("fcm", i): [f"tablet-fcm-{i:03d}-{k:04d}" for k in range(args.fcm_tokens)]
            for i in range(args.fcm_rooms)
        }
        targets = await make_rooms(service.api, fakes.url, rooms)
        await ws.connect()
        warm = await warm_up(service.api, service.port, fakes, targets, "u", args.max_seconds)
        before = (await fakes.stats())["fcm_messages"]
        async with Window({"service": service.pid}, fakes, open_loop=False) as window:
            for _round in range(args.fcm_rounds):
                loads.append(
                    await run_load(
                        targets,
                        len(targets),
                        len(targets),
                        service.port,
                        WEBHOOK_PATH,
                        max_seconds=args.max_seconds,
                        before=changes,
                    )
                )
                if not await ws.wait_for(set(changes.made), args.max_seconds):
                    break
            wanted = len(ws.frames) * args.fcm_tokens
            complete = await wait_fcm(fakes, wanted, args.max_seconds)
        rows = await fakes.fcm_messages()
        settled = await settle(service.api, args.max_seconds)
        stored = await all_notifications(service.api, unpublished=True)
        published = await all_notifications(service.api, unpublished=False)
    finally:
        ws.close()
        changes.close()
        exit_code = await service.stop()
    profile = service.profile()
    ctx.note_profile("cProfile of the fcm service", profile)
    times = sorted(float(row[5]) for row in rows[before:])  # the warm-up's are not timed
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "rooms": args.fcm_rooms,
        "tokens_per_room": args.fcm_tokens,
        "publications": len(published),
        "sends": len(times),
        "first_to_last_s": round(span, 3),
        "sends_per_s": round((len(times) - 1) / span, 1) if span > 0 else None,
        "all_arrived": complete,
        "warm_up": {"webhooks": warm.load.answered_200, "settle": warm.settle},
        "settle": settled,
        "service_exit_code": exit_code,
        "cprofile": profile,
        **window.figures(),
        **account(
            answered_200=warm.load.answered_200 + sum(load.answered_200 for load in loads),
            stored=stored,
            published=published,
            changes=warm.changes + changes.made,
            room_tokens=rooms,
            fcm_rows=rows,
            ws_seqs=ws.seqs(),
        ),
    }
