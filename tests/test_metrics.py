"""/metrics and its catalogue (docs/protocol.md#metrics) in step: the same families with the same
labels both ways, every label value from its documented set whatever a caller sends, the store
gauges counted by a periodic task (mrm_push_ready with them), and an exposition promtool
accepts although a gauge and a counter share the stem `mrm_push_deliveries`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from daemon import app as app_module
from daemon import metrics, store_gauges
from storage.base import (
    CHANNEL_STATES,
    DeliveryState,
    NotificationSource,
    StoreUnavailable,
    Target,
    TargetKind,
)
from tests.fixtures import call, clock, emulator, make_service  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
ROOM = "room-1@resource.calendar.google.com"
GONE = "room-2@resource.calendar.google.com"
TABLET = "tablet-token-" + "a" * 40
SUBSCRIBER = "subscriber-token-for-metrics-0123456789"
CODE = re.compile(r"`([^`]+)`")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# -- the catalogue, read from docs/protocol.md --------------------------------------------------
def metrics_section() -> str:
    text = PROTOCOL.read_text(encoding="utf-8")
    section = text.split("\n## Metrics\n", 1)[1]
    return section.split("\n## ", 1)[0]


def table(first_header: str) -> list[list[str]]:
    """The rows (cells) of the section's table whose first header cell is `first_header`."""
    lines = metrics_section().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {first_header} |")))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def catalogue() -> dict[str, tuple[str, frozenset[str]]]:
    """Metric name -> (type, label names)."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for name, kind, labels, _meaning in table("metric"):
        [metric] = CODE.findall(name)
        assert metric not in found, f"{metric} twice in the catalogue"
        found[metric] = (kind, frozenset(CODE.findall(labels)))
    return found


def documented_values() -> dict[tuple[str, str], set[str]]:
    """(metric, label) -> the values the catalogue gives (status: every status HTTP names)."""
    values: dict[tuple[str, str], set[str]] = {}
    for label_cell, metrics_cell, values_cell in table("label"):
        [label] = CODE.findall(label_cell)
        allowed = set(CODE.findall(values_cell))
        if label == "status":
            allowed = {str(s.value) for s in HTTPStatus} | {"other"}
        for metric in CODE.findall(metrics_cell):
            assert (metric, label) not in values, (metric, label)
            values[metric, label] = allowed
    return values


# -- the exposition ---------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    type: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def label_names(self) -> frozenset[str]:
        return frozenset(k for _, labels, _ in self.samples for k in labels if k != "le")


def parse(text: str) -> dict[str, Family]:
    """Text format 0.0.4, strictly: one TYPE line per family, each sample under its own."""
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if match := TYPE_LINE.match(line):
            name, kind = match.groups()
            assert name not in families, f"family {name} twice"
            current = families[name] = Family(name, kind)
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match is not None and current is not None, line
            name, labels, value = match.groups()
            suffixes = HISTOGRAM_SUFFIXES if current.type == "histogram" else ()
            assert name in {current.name, *(current.name + s for s in suffixes)}, line
            current.samples.append((name, dict(LABEL.findall(labels or "")), float(value)))
    return families


async def scrape(service) -> tuple[str, dict[str, Family]]:
    status, text = await call(service, "GET", "/metrics", key=None)
    assert status == 200
    return text, {n: f for n, f in parse(text).items() if n.startswith("mrm_push_")}


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    family = next(f for f in families.values() if any(s[0] == name for s in f.samples))
    [found] = [v for n, got, v in family.samples if n == name and got == labels]
    return found


def subscribers() -> dict[str, Any]:
    return {"auth": {"subscribers": [{"token": SUBSCRIBER, "calendars": ["*"]}]}}


async def subscribed_client(service, calendar_ids: list[str]) -> Any:
    request = HTTPRequest(
        f"ws://127.0.0.1:{service.port}/ws", headers={"Authorization": f"Bearer {SUBSCRIBER}"}
    )
    ws = await websocket_connect(request)
    await ws.write_message(json.dumps({"type": "subscribe", "calendar_ids": calendar_ids}))
    answer = json.loads(await ws.read_message())
    assert answer["type"] == "subscribed", answer
    return ws


# -- the catalogue and /metrics -----------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_metrics_and_their_catalogue_agree(make_service, emulator, clock):
    service = await make_service(subscribers(), clock=clock, emulator=emulator)
    # A room with a tablet: events.watch (after a token), confirmed by Google's sync.
    assert (await call(service, "PUT", "/v1/rooms/" + quote(ROOM), {"firebase_tokens": [TABLET]}))[
        0
    ] == 201
    await emulator.google.drain()
    ws = await subscribed_client(service, [ROOM])
    # A change: the webhook, events.list, publication, one FCM attempt, one frame on /ws.
    emulator.google.insert_event(ROOM, summary="Standup")
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await service.delivery.drain(5)
    assert json.loads(await ws.read_message())["type"] == "notification"
    # A room made and deleted: its channel is stopped (channels.stop).
    assert (await call(service, "PUT", "/v1/rooms/" + quote(GONE), {}))[0] == 201
    await emulator.google.drain()
    assert (await call(service, "DELETE", "/v1/rooms/" + quote(GONE)))[0] == 204
    await service.channels.process_stops()
    await service.refresh_metrics()

    text, families = await scrape(service)
    documented = catalogue()
    assert set(families) == set(documented)
    for name, family in families.items():
        kind, labels = documented[name]
        assert (family.type, family.label_names()) == (kind, labels), name
        assert family.samples, f"{name} has no sample"
    # Both contract names, as two families: `mrm_push_deliveries` the outbox gauge and
    # `mrm_push_deliveries_total` the outcome counter; no `_created` series beside them.
    assert families["mrm_push_deliveries"].type == "gauge"
    assert families["mrm_push_deliveries_total"].type == "counter"
    assert not [line for line in text.splitlines() if "_created" in line]

    # The figures are the service's own.
    assert value(families, "mrm_push_deliveries", state="sent", target="fcm") == 1
    assert value(families, "mrm_push_deliveries", state="pending", target="backend") == 0
    assert value(families, "mrm_push_deliveries_total", outcome="sent") == 1
    assert value(families, "mrm_push_channels", state="active") == 1
    assert value(families, "mrm_push_rooms_without_channel") == 0
    assert value(families, "mrm_push_unsynced_notifications") == 0
    assert value(families, "mrm_push_stop_queue") == 0
    [channel] = await service.store.channels.list(ROOM)
    assert channel.expiration is not None
    expiry = value(families, "mrm_push_channel_expiry_seconds")
    assert expiry == pytest.approx(channel.expiration - clock.now())
    assert value(families, "mrm_push_ready") == 1
    assert value(families, "mrm_push_websocket_clients") == 1
    for method, at_least in (("token", 1), ("watch", 2), ("list", 2), ("stop", 1)):
        count = value(families, "mrm_push_google_request_seconds_count", method=method)
        assert count >= at_least, method
    google_calls = [c for c in emulator.google.calls if c[0] in ("watch", "stop")]
    assert value(families, "mrm_push_google_request_seconds_count", method="watch") + value(
        families, "mrm_push_google_request_seconds_count", method="stop"
    ) == len(google_calls)
    assert value(families, "mrm_push_fcm_request_seconds_count") == emulator.fcm.attempts(TABLET)
    ws.close()

    if shutil.which("promtool") is not None:  # installed by .ci/run
        checked = await asyncio.to_thread(
            subprocess.run,
            ["promtool", "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
        )
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


@pytest.mark.gen_test(timeout=10)
async def test_the_documented_label_values_are_the_code_s(make_service):
    service = await make_service()
    values = documented_values()
    routes = values["mrm_push_http_requests_total", "route"]
    assert routes == values["mrm_push_http_request_seconds", "route"]
    assert routes == set(service.route_names) | {"other"}  # a new handler needs its line
    assert values["mrm_push_http_requests_total", "method"] == set(metrics.HTTP_METHODS) | {"other"}
    assert values["mrm_push_webhook_calls_total", "outcome"] == set(metrics.WEBHOOK_OUTCOMES)
    assert values["mrm_push_deliveries_total", "outcome"] == set(metrics.DELIVERY_OUTCOMES)
    assert values["mrm_push_google_request_seconds", "method"] == set(metrics.GOOGLE_METHODS)
    assert values["mrm_push_notifications_published_total", "source"] == set(
        get_args(NotificationSource)
    )
    assert values["mrm_push_deliveries", "state"] == set(get_args(DeliveryState))
    assert values["mrm_push_deliveries", "target"] == set(get_args(TargetKind))
    assert values["mrm_push_channels", "state"] == set(CHANNEL_STATES)
    # Every label of the catalogue has its values, and only those.
    assert set(values) == {(m, label) for m, (_, labels) in catalogue().items() for label in labels}


@pytest.mark.gen_test(timeout=30)
async def test_label_values_stay_in_their_fixed_sets(make_service):
    service = await make_service(subscribers())
    client = AsyncHTTPClient()

    async def barrage(tag: str) -> None:
        """Made-up methods, paths, ids and tokens, everywhere a caller can put them."""
        for n in range(10):
            made_up = f"{tag}-{n}-\u00e9\u0000"
            for method in ("GET", "PUT", f"X{tag.upper()}{n}", "BREW"):
                await client.fetch(
                    f"{service.base_url}/{quote(made_up)}/{n}?id={quote(made_up)}",
                    method=method,
                    allow_nonstandard_methods=True,
                    raise_error=False,
                )
            room = f"{tag}-room-{n}@resource.calendar.google.com"
            await call(service, "PUT", "/v1/rooms/" + quote(room), {"firebase_tokens": [made_up]})
            await call(service, "POST", f"/v1/rooms/{quote(room)}/tokens/{quote(made_up)}x")
            await call(service, "GET", "/v1/rooms/" + quote(made_up))
            await call(service, "GET", "/v1/notifications?calendar_id=" + quote(made_up))
            await call(service, "DELETE", "/v1/rooms/" + quote(room))
            headers = {
                "X-Goog-Channel-ID": f"{tag}-channel-{n}",
                "X-Goog-Message-Number": str(n + 1),
                "X-Goog-Resource-ID": f"{tag}-resource-{n}",
                "X-Goog-Resource-State": "exists" if n % 2 else f"{tag}state",
                "X-Goog-Channel-Token": f"{tag}-token-{n}",
            }
            await call(service, "POST", "/notifications", key=None, headers=headers, raw=b"")
        ws = await subscribed_client(service, [f"{tag}-{n}@x" for n in range(10)])
        ws.close()

    await scrape(service)  # /metrics itself is then one of the series before too
    await barrage("first")
    await service.refresh_metrics()
    _, before = await scrape(service)
    await barrage("second")
    await service.refresh_metrics()
    _, after = await scrape(service)

    allowed = documented_values()
    series = {}
    for name, family in after.items():
        for sample, labels, _ in family.samples:
            for label, got in labels.items():
                if label != "le":
                    assert got in allowed[name, label], (sample, label, got)
            series.setdefault(name, set()).add((sample, tuple(sorted(labels.items()))))
    # Other made-up values, the same series: nothing a caller sent became a label value.
    for name, family in before.items():
        assert {
            (s, tuple(sorted(labels.items()))) for s, labels, _ in family.samples
        } == series.get(name, set()), name
    made_up_methods = [
        v
        for _, labels, v in after["mrm_push_http_requests_total"].samples
        if labels["method"] == "other"
    ]
    assert sum(made_up_methods) == 2 * 10 * 2


# -- the periodic task: mrm_push_ready and the store gauges --------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_ready_is_refreshed_by_a_periodic_task_not_only_by_readyz(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    task = service.periodic["metrics"]
    assert task.is_running() and task.callback_time == app_module.METRICS_INTERVAL * 1000
    assert app_module.METRICS_INTERVAL <= 10
    _, families = await scrape(service)
    assert value(families, "mrm_push_ready") == 0  # nothing has checked yet
    await service.refresh_metrics()
    _, families = await scrape(service)
    assert value(families, "mrm_push_ready") == 1
    # Nobody asked /readyz.
    routes = {
        labels.get("route") for _, labels, _ in families["mrm_push_http_requests_total"].samples
    }
    assert "ReadyHandler" not in routes

    # A check fails: the next run says so by itself.
    async def down() -> None:
        raise StoreUnavailable("connection refused by 127.0.0.1:27017")

    service.readiness_checks["storage"] = down
    await service.refresh_metrics()
    _, families = await scrape(service)
    assert value(families, "mrm_push_ready") == 0


@pytest.mark.gen_test(timeout=30)
async def test_the_store_gauges_count_the_store(make_service, clock):
    service = await make_service(clock=clock)
    store, now = service.store, clock.now()
    _, families = await scrape(service)
    assert families["mrm_push_deliveries"].samples == []  # not counted yet: no figures
    for n in range(3):
        status, _ = await call(service, "PUT", f"/v1/rooms/cal-{n}", {"firebase_tokens": ["t"]})
        assert status == 201
    published = await store.notifications.publish(
        (await store.notifications.add("cal-0", "poll", "exists", now)).id,
        [],
        False,
        [Target("fcm", "t"), Target("backend")],
        now,
    )
    await store.notifications.add("cal-1", "poll", "exists", now)
    await store.channels.enqueue_stop("ch-old", "res-old", "cal-0", now)
    [fcm] = [d for d in published.deliveries if d.target.kind == "fcm"]
    await store.outbox.finish(fcm.id, "failed", now, last_error="INVALID_ARGUMENT")
    await service.refresh_metrics()
    _, families = await scrape(service)
    assert value(families, "mrm_push_deliveries", state="failed", target="fcm") == 1
    assert value(families, "mrm_push_deliveries", state="pending", target="backend") == 1
    assert len(families["mrm_push_deliveries"].samples) == 12  # every pair, 0 included
    assert value(families, "mrm_push_unsynced_notifications") == 1
    assert value(families, "mrm_push_stop_queue") == 1
    # No Google here: every room's channel failed, and none is active.
    assert value(families, "mrm_push_rooms_without_channel") == 3
    assert value(families, "mrm_push_channels", state="failed") == 3
    assert value(families, "mrm_push_channels", state="active") == 0
    assert families["mrm_push_channel_expiry_seconds"].samples == []


@pytest.mark.gen_test(timeout=30)
async def test_a_failing_store_keeps_the_last_counts_and_makes_ready_0(
    make_service, clock, monkeypatch, caplog
):
    service = await make_service(clock=clock)

    async def fine() -> None:
        return None

    service.readiness_checks["google"] = fine
    service.readiness_checks["fcm"] = fine
    await service.store.rooms.put("cal-1", "R", [], clock.now())
    await service.refresh_metrics()
    _, families = await scrape(service)
    assert value(families, "mrm_push_ready") == 1
    assert value(families, "mrm_push_rooms_without_channel") == 1

    async def down(*args: Any) -> Any:
        raise StoreUnavailable("connection refused by 127.0.0.1:27017")

    monkeypatch.setattr(service.store.channels, "count_by_state", down)
    await service.store.rooms.put("cal-2", "R", [], clock.now())
    caplog.set_level(logging.INFO, logger="daemon.store_gauges")
    for _ in range(2):
        await service.refresh_metrics()
        _, families = await scrape(service)
        assert value(families, "mrm_push_ready") == 0
        assert value(families, "mrm_push_rooms_without_channel") == 1  # the last count
    [failed] = [r for r in caplog.records if r.getMessage() == "metrics_store_counts_failed"]
    assert failed.levelno == logging.WARNING  # once per outage, not once per count
    assert failed.reason == "connection refused by 127.0.0.1:27017"

    # A count that hangs is given up too (the store answers nothing: same as down).
    never = asyncio.Event()

    async def hangs(*args: Any) -> Any:
        await never.wait()

    monkeypatch.setattr(store_gauges, "COUNT_TIMEOUT", 0.05)
    monkeypatch.setattr(service.store.channels, "count_by_state", hangs)
    await service.refresh_metrics()
    _, families = await scrape(service)
    assert value(families, "mrm_push_ready") == 0

    monkeypatch.undo()
    await service.refresh_metrics()
    _, families = await scrape(service)
    assert value(families, "mrm_push_ready") == 1
    assert value(families, "mrm_push_rooms_without_channel") == 2
    assert "metrics_store_counts_back" in [r.getMessage() for r in caplog.records]


def test_the_readme_points_to_the_catalogue():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/protocol.md#metrics)" in readme


# -- the example alert rules ----------------------------------------------------------------------
def test_the_alert_rules_name_catalogued_metrics_and_say_what_to_do():
    rules = [
        rule
        for group in yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]
    documented = catalogue()
    for rule in rules:
        named = set(re.findall(r"\bmrm_push_[a-z_]+", json.dumps(rule)))
        assert named <= set(documented), (rule["alert"], named - set(documented))
        assert named or rule["expr"].startswith("up{"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
    assert {rule["alert"] for rule in rules} >= {
        "MrmPushDown",
        "MrmPushNotReady",
        "MrmPushRoomWithoutChannel",
        "MrmPushChannelExpiringSoon",
        "MrmPushDeliveriesFailing",
        "MrmPushOutboxGrowing",
        "MrmPushUnsyncedGrowing",
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run)")
@pytest.mark.parametrize(
    "command", [["check", "rules", "docs/alerts.yml"], ["test", "rules", "tests/alerts_test.yml"]]
)
def test_promtool_accepts_the_alert_rules(command):
    checked = subprocess.run(["promtool", *command], cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
