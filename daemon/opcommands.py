"""The operator commands but `tail` (daemon/optail.py): one or a few API calls each.

Each prints a table for people or, with --json, one JSON document."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from daemon import optables
from daemon.client import ServiceError, UsageError, path_of
from daemon.ids import TOKEN_RULE, valid_token

if TYPE_CHECKING:
    from daemon.opcli import Context

CHANNEL_STATES = ("pending", "active", "retiring", "failed")
_WS_CLIENTS = re.compile(r"^mrm_push_websocket_clients(?:\{\})? (\S+)$", re.MULTILINE)


def emit(context: Context, document: Any, text: str) -> int:
    """One JSON document (--json), else the text for people."""
    print(json.dumps(document, indent=2, ensure_ascii=False) if context.json else text)
    return 0


# -- status ----------------------------------------------------------------------------------
async def status(context: Context) -> int:
    """Readiness (no key needed), then the figures; exit 1 when unready or a call failed."""
    api = context.api
    gathered: tuple[Any, ...] = await asyncio.gather(
        api.call("GET", "/readyz", auth=False, ok=(503,)),
        api.get("/v1/rooms"),
        api.get("/v1/channels"),
        api.get("/v1/deliveries", limit=1),
        _websocket_clients(context),
        return_exceptions=True,
    )
    ready, figures = gathered[0], gathered[1:]
    for result in gathered:
        if isinstance(result, BaseException) and not isinstance(result, ServiceError):
            raise result  # unreachable, or a bug: the one line says so
    if isinstance(ready, BaseException):
        raise ready
    results = dict(zip(("rooms", "channels", "deliveries", "websocket"), figures, strict=True))
    checks = ready.body.get("checks", {}) if isinstance(ready.body, dict) else {}
    errors = {k: str(v) for k, v in results.items() if isinstance(v, ServiceError)}
    document: dict[str, Any] = {
        "url": api.base_url,
        "ready": ready.status == 200,
        "checks": checks,
        "rooms": _or_none(results["rooms"], lambda r: len(r["rooms"])),
        "channels": _or_none(
            results["channels"], lambda c: _count(c["channels"], "state", CHANNEL_STATES)
        ),
        "deliveries": _or_none(results["deliveries"], lambda d: d["counts"]),
        "websocket_clients": _or_none(results["websocket"], lambda n: n),
        "errors": errors,
    }
    emit(context, document, _status_text(document))
    return 0 if document["ready"] and not errors else 1


def _or_none(result: Any, figure: Callable[[Any], Any]) -> Any:
    return None if isinstance(result, BaseException) else figure(result)


def _count(items: list[dict[str, Any]], key: str, order: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(order, 0)
    for item in items:
        counts[item[key]] = counts.get(item[key], 0) + 1
    return counts


async def _websocket_clients(context: Context) -> int | None:
    """From /metrics, behind auth.metrics_token when that is set (None when it refuses us, or
    when the figure is not there)."""
    token = context.metrics_token()
    answer = await context.api.call("GET", "/metrics", token=token, auth=False, ok=(401, 403))
    if answer.status != 200:
        return None  # an optional figure: shown as unknown, not an error
    found = _WS_CLIENTS.search(answer.text)
    return int(float(found.group(1))) if found else None


def _status_text(doc: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("service", doc["url"]),
        ("ready", "yes" if doc["ready"] else "no"),
    ]
    rows += [(f"  {name}", result) for name, result in doc["checks"].items()]
    figures = [  # (label, the figure's key in the document and in `errors`, shown value)
        ("rooms", "rooms", doc["rooms"]),
        ("channels", "channels", doc["channels"] and optables.by_state(doc["channels"])),
        ("outbox", "deliveries", doc["deliveries"] and optables.by_state(doc["deliveries"])),
        ("ws clients", "websocket", doc["websocket_clients"]),
    ]
    for label, key, value in figures:
        error = doc["errors"].get(key)
        if error is None and key == "websocket" and value is None:
            error = "/metrics needs auth.metrics_token: give --config"
        rows.append((label, f"unknown ({error})" if error else value))
    return optables.pairs(rows)


# -- rooms -----------------------------------------------------------------------------------
async def rooms_list(context: Context) -> int:
    answer = await context.api.get("/v1/rooms")
    return emit(context, answer, optables.rooms_table(answer["rooms"]))


async def rooms_show(context: Context) -> int:
    room = await context.api.get(path_of("v1", "rooms", context.args.calendar_id))
    return emit(context, room, optables.room_details(room))


async def rooms_add(context: Context) -> int:
    """PUT the room (its name when given), then add each token: never removes one."""
    args = context.args
    for token in args.token:  # checked before anything is written
        if not valid_token(token):
            raise UsageError(f"--token: {TOKEN_RULE}")
    api = context.api
    room_path = path_of("v1", "rooms", args.calendar_id)
    body = {} if args.name is None else {"name": args.name}
    answer = await api.call("PUT", room_path, body=body)
    room = answer.body
    for token in dict.fromkeys(args.token):
        room = (await api.call("POST", room_path + path_of("tokens", token))).body
    verb = "created" if answer.status == 201 else "updated"
    return emit(context, room, f"{verb} {args.calendar_id}\n{optables.room_details(room)}")


async def rooms_delete(context: Context) -> int:
    calendar_id = context.args.calendar_id
    await context.api.call("DELETE", path_of("v1", "rooms", calendar_id))
    return emit(context, {"deleted": calendar_id}, f"deleted {calendar_id}")


# -- channels --------------------------------------------------------------------------------
async def channels_list(context: Context) -> int:
    answer = await context.api.get("/v1/channels")
    return emit(context, answer, optables.channels_table(answer["channels"]))


async def channels_renew(context: Context) -> int:
    query = {"calendar_id": context.args.calendar_id}
    answer = (await context.api.call("POST", "/v1/channels/renew", query=query)).body
    text = f"renewed {answer['renewed']}"
    if answer["failed"]:
        text += f", failed {len(answer['failed'])}:\n" + optables.failures_table(answer["failed"])
    return emit(context, answer, text)


# -- notifications and deliveries ------------------------------------------------------------
async def notifications_list(context: Context) -> int:
    args = context.args
    answer = await context.api.get(
        "/v1/notifications", calendar_id=args.calendar, after=args.after, limit=args.limit
    )
    text = optables.notifications_table(answer["notifications"])
    if answer["notifications"]:
        text += f"\n(next page: --after {answer['next_after']})"
    return emit(context, answer, text)


async def deliveries_list(context: Context) -> int:
    args = context.args
    answer = await context.api.get(
        "/v1/deliveries",
        state=args.state,
        calendar_id=args.calendar,
        limit=args.limit,
        before=args.before,
    )
    text = optables.deliveries_table(answer["deliveries"])
    if answer.get("next_before") is not None:
        text += f"\n(next page: --before {answer['next_before']})"
    return emit(context, answer, text)


async def deliveries_retry(context: Context) -> int:
    args = context.args
    if args.ids and args.state:
        raise UsageError("deliveries retry: give delivery ids or --state, not both")
    if args.ids:
        call = context.api.call("POST", "/v1/deliveries/retry", body={"ids": args.ids})
    else:
        query = {"state": args.state or "failed"}
        call = context.api.call("POST", "/v1/deliveries/retry", query=query)
    answer = (await call).body
    text = f"retried {answer['retried']}"
    if answer["skipped"]:
        text += f", skipped {answer['skipped_total']}:\n" + optables.skipped_table(
            answer["skipped"]
        )
    return emit(context, answer, text)


COMMANDS: dict[str, Callable[[Context], Awaitable[int]]] = {
    "status": status,
    "rooms_list": rooms_list,
    "rooms_show": rooms_show,
    "rooms_add": rooms_add,
    "rooms_delete": rooms_delete,
    "channels_list": channels_list,
    "channels_renew": channels_renew,
    "notifications_list": notifications_list,
    "deliveries_list": deliveries_list,
    "deliveries_retry": deliveries_retry,
}
