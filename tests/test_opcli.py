"""The operator commands as processes (the installed console script) against a service running
on the test's loop: tables and --json, exit codes, where the URL and the API key come from."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import socket
from urllib.parse import quote

import pytest

from storage.base import Target
from tests.fixtures import API_KEY, call, clock, emulator, make_service, write_config  # noqa: F401
from tests.operator_cli import run_cli

ROOM = "room-1@resource.calendar.google.com"
ROOM_2 = "room-2@resource.calendar.google.com"
TABLET = "tablet-token-" + "a" * 40
OTHER_TABLET = "tablet-token-" + "b" * 40


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "api-key"
    path.write_text(f"# the operator's key\n{API_KEY}\n")
    return path


def at(service, key_file) -> tuple[str, ...]:
    return ("--url", service.base_url, "--api-key-file", str(key_file))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pairs_of(text: str) -> dict[str, str]:
    """The "key   value" lines of a details table, keys stripped of their indent."""
    found = {}
    for line in text.splitlines():
        key, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        found[key] = value
    return found


def one_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    return lines[0]


@pytest.mark.gen_test(timeout=60)
async def test_rooms_commands(make_service, emulator, clock, key_file):
    service = await make_service(clock=clock, emulator=emulator)
    opts = at(service, key_file)
    added = await run_cli("rooms", "add", ROOM, "--token", TABLET, "--name", "Blue", *opts)
    assert added.code == 0, added.err
    assert added.lines[0] == f"created {ROOM}"
    assert any(line.split() == ["tokens", TABLET[-8:]] for line in added.lines)
    # A second add keeps the tokens there and adds the new one; --json prints the room.
    again = await run_cli("rooms", "add", ROOM, "--token", OTHER_TABLET, "--json", *opts)
    assert again.code == 0, again.err
    assert again.json["firebase_tokens"] == [TABLET[-8:], OTHER_TABLET[-8:]]
    assert again.json["name"] == "Blue"
    await call(service, "PUT", "/v1/rooms/" + quote(ROOM_2), {"name": "Green"})

    listed, listed_json, shown, shown_json, unknown = await asyncio.gather(
        run_cli("rooms", "list", *opts),
        run_cli("rooms", "list", "--json", *opts),
        run_cli("rooms", "show", ROOM, *opts),
        run_cli("rooms", "show", ROOM, "--json", *opts),
        run_cli("rooms", "show", "nobody@resource.calendar.google.com", *opts),
    )
    header, first, second = listed.lines
    assert header.split() == ["CALENDAR", "ID", "NAME", "TOKENS", "CHANNEL", "EXPIRES"]
    assert first.split()[:3] == [ROOM, "Blue", f"{TABLET[-8:]},{OTHER_TABLET[-8:]}"]
    assert second.split()[:2] == [ROOM_2, "Green"]
    assert first.index("Blue") == second.index("Green") == header.index("NAME")  # aligned
    assert TABLET not in listed.out + listed_json.out + shown.out + shown_json.out
    _, api_rooms = await call(service, "GET", "/v1/rooms")
    assert listed_json.json == api_rooms
    assert shown_json.json == api_rooms["rooms"][0]
    details = pairs_of(shown.out)
    assert details["name"] == "Blue" and details["calendar id"] == ROOM
    assert details["created"].endswith("Z") and "T" not in details["created"]  # readable
    assert details["channel state"] in ("pending", "active")
    assert unknown.code == 1
    assert one_line(unknown) == (
        "mrm-push: 404 room_not_found: no room for calendar 'nobody@resource.calendar.google.com'"
    )

    deleted = await run_cli("rooms", "delete", ROOM_2, *opts)
    assert (deleted.code, deleted.out) == (0, f"deleted {ROOM_2}\n")
    deleted_json = await run_cli("rooms", "delete", ROOM_2, "--json", *opts)
    assert deleted_json.code == 1 and "404 room_not_found" in one_line(deleted_json)
    assert [r["calendar_id"] for r in (await call(service, "GET", "/v1/rooms"))[1]["rooms"]] == [
        ROOM
    ]


@pytest.mark.gen_test(timeout=60)
async def test_channels_commands(make_service, emulator, clock, key_file):
    service = await make_service(clock=clock, emulator=emulator)
    await call(service, "PUT", "/v1/rooms/" + quote(ROOM), {"firebase_tokens": [TABLET]})
    await emulator.google.drain()
    opts = at(service, key_file)
    listed, listed_json = await asyncio.gather(
        run_cli("channels", "list", *opts), run_cli("channels", "list", "--json", *opts)
    )
    assert listed.code == 0, listed.err
    header, row = listed.lines
    assert header.split()[:4] == ["ID", "CALENDAR", "ID", "STATE"]
    channel = listed_json.json["channels"][0]
    assert row.split()[:4] == [channel["id"], ROOM, channel["state"], "yes"]
    renewed, renewed_json, unknown = await asyncio.gather(
        run_cli("channels", "renew", ROOM, *opts),
        run_cli("channels", "renew", "--json", *opts),
        run_cli("channels", "renew", "nobody@x", *opts),
    )
    assert renewed.code == 0 and renewed.lines == ["renewed 1"], renewed.err
    assert renewed_json.json["failed"] == [] and renewed_json.json["renewed"] >= 0
    assert unknown.code == 1 and one_line(unknown).startswith("mrm-push: 404 room_not_found: ")


async def failed_deliveries(service) -> list[int]:
    """Two published notifications for ROOM, their FCM deliveries failed for good."""
    store, now = service.store, service.clock.now()
    await call(service, "PUT", "/v1/rooms/" + quote(ROOM), {"firebase_tokens": [TABLET]})
    ids = []
    for summary in ("Standup", "Retro"):
        received = await store.notifications.add(ROOM, "poll", "exists", now)
        change = {"event_id": f"ev-{received.id}", "status": "confirmed", "summary": summary}
        published = await store.notifications.publish(
            received.id, [change], False, [Target("fcm", TABLET)], now
        )
        for delivery in published.deliveries:
            await store.outbox.finish(delivery.id, "failed", now, attempts=8, last_error="gone")
            ids.append(delivery.id)
    return ids


@pytest.mark.gen_test(timeout=60)
async def test_notifications_and_deliveries_commands(make_service, emulator, clock, key_file):
    service = await make_service(clock=clock, emulator=emulator)
    first, second = await failed_deliveries(service)
    opts = at(service, key_file)
    notes, notes_json, page, deliveries, deliveries_json = await asyncio.gather(
        run_cli("notifications", "list", *opts),
        run_cli("notifications", "list", "--calendar", ROOM, "--after", "1", "--json", *opts),
        run_cli("notifications", "list", "--limit", "1", *opts),
        run_cli("deliveries", "list", "--state", "failed", *opts),
        run_cli("deliveries", "list", "--calendar", ROOM, "--limit", "1", "--json", *opts),
    )
    assert notes.code == 0, notes.err
    header, one, two, footer = notes.lines
    assert header.split()[:3] == ["SEQ", "ID", "RECEIVED"]
    assert one.split()[0] == "1" and "1: confirmed Standup" in one and "1 fcm failed" in one
    assert two.split()[0] == "2" and "1: confirmed Retro" in two
    assert footer == "(next page: --after 2)"
    assert [n["seq"] for n in notes_json.json["notifications"]] == [2]
    assert notes_json.json["next_after"] == 2 and notes_json.json["store_epoch"]
    assert len(page.lines) == 3 and page.lines[-1] == "(next page: --after 1)"

    assert deliveries.code == 0, deliveries.err
    header, newest, oldest = deliveries.lines
    assert header.split()[:6] == ["ID", "NOTIFICATION", "CALENDAR", "ID", "TARGET", "TOKEN"]
    assert newest.split()[:7] == [str(second), "2", ROOM, "fcm", TABLET[-8:], "failed", "8"]
    assert oldest.split()[0] == str(first) and newest.rstrip().endswith("gone")
    assert TABLET not in deliveries.out + deliveries_json.out
    assert [d["id"] for d in deliveries_json.json["deliveries"]] == [second]
    assert deliveries_json.json["next_before"] == second

    retried = await run_cli("deliveries", "retry", str(first), "424242", *opts)
    assert retried.code == 0, retried.err
    assert retried.lines == [
        "retried 1, skipped 1:",
        "ID      STATE  REASON",
        "424242  -      not_found",
    ]
    await emulator.fcm.wait_for(TABLET, 1, 10)  # the retried one goes out
    rest = await run_cli("deliveries", "retry", "--json", *opts)  # ?state=failed: the other
    assert rest.code == 0 and rest.json == {"retried": 1, "skipped": [], "skipped_total": 0}
    await emulator.fcm.wait_for(TABLET, 2, 10)
    both = await run_cli("deliveries", "retry", "--state", "expired", *opts)
    assert both.lines == ["retried 0"]


@pytest.mark.gen_test(timeout=60)
async def test_status_figures_and_readiness(make_service, emulator, clock, key_file, tmp_path):
    metrics = {"auth": {"metrics_token": "metrics-token-0123456789", "api_keys": [API_KEY]}}
    service = await make_service(metrics, clock=clock, emulator=emulator)
    await failed_deliveries(service)
    (tmp_path / "operator").mkdir()
    config = write_config(tmp_path / "operator", {"server": {"port": service.port}, **metrics})
    table, as_json, without_token = await asyncio.gather(
        run_cli("status", "--config", str(config)),
        run_cli("status", "--config", str(config), "--json"),
        run_cli("status", *at(service, key_file)),
    )
    assert table.code == 0, table.err
    rows = pairs_of(table.out)
    assert rows["service"] == service.base_url and rows["ready"] == "yes"
    assert rows["storage"] == rows["google"] == rows["fcm"] == "ok"
    assert rows["rooms"] == "1" and rows["channels"] in ("1 pending", "1 active")
    assert rows["outbox"] == "2 failed" and rows["ws clients"] == "0"
    doc = as_json.json
    assert doc["ready"] is True and doc["checks"] == {"storage": "ok", "google": "ok", "fcm": "ok"}
    assert doc["rooms"] == 1 and doc["deliveries"]["failed"] == 2
    assert doc["websocket_clients"] == 0 and doc["errors"] == {}
    # Without the metrics token (no config): the figure is unknown, nothing else changes.
    assert without_token.code == 0, without_token.err
    assert "ws clients  unknown (/metrics needs auth.metrics_token" in without_token.out


@pytest.mark.gen_test(timeout=60)
async def test_status_of_an_unready_service_exits_1_with_the_reasons(make_service, key_file):
    service = await make_service()  # no Google, no FCM
    result = await run_cli("status", "--json", *at(service, key_file))
    assert result.code == 1
    doc = result.json
    assert doc["ready"] is False and doc["checks"]["storage"] == "ok"
    assert doc["checks"]["fcm"].startswith("not configured")
    assert doc["rooms"] == 0 and doc["errors"] == {}


@pytest.mark.gen_test(timeout=60)
async def test_exit_codes(make_service, key_file, tmp_path):
    service = await make_service()
    port = closed_port()
    silent = socket.socket()  # takes connections (the kernel does), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    (tmp_path / "v6").mkdir()
    ipv6 = write_config(tmp_path / "v6", {"server": {"host": "::1", "port": port}})
    results = await asyncio.gather(
        run_cli(
            "rooms", "list", "--url", f"http://127.0.0.1:{port}", "--api-key-file", str(key_file)
        ),
        run_cli("rooms", "list", "--config", str(ipv6)),
        run_cli("rooms", "list", "--url", service.base_url),  # no key at all
        run_cli("rooms", "list", "--url", service.base_url, env={"MRM_PUSH_API_KEY": "wrong" * 4}),
        run_cli("rooms"),
        run_cli("deliveries", "list", "--state", "lost", "--url", service.base_url),
        run_cli("deliveries", "retry", "1", "--state", "failed", "--url", service.base_url),
        run_cli("notifications", "list", "--after", "-1", "--url", service.base_url),
        run_cli("rooms", "list", "--url", "ftp://example.com"),
        run_cli("rooms", "list", "--url", service.base_url, "--api-key-file", "/nonexistent"),
        run_cli("rooms", "list", "--config", str(tmp_path / "absent.yaml")),
        run_cli("rooms", "add", "r@x", "--token", "bad token", *at(service, key_file)),
        run_cli("--version"),
        run_cli("rooms", "list", "--url", silent_url, "--timeout", "0.5"),
    )
    silent.close()
    unreachable, unreachable_v6, no_key, wrong_key, *usage, version, timed_out = results
    assert unreachable.code == 1
    assert (
        one_line(unreachable)
        == f"mrm-push: cannot reach http://127.0.0.1:{port}: Connection refused"
    )
    assert unreachable_v6.code == 1
    assert one_line(unreachable_v6).startswith(f"mrm-push: cannot reach http://[::1]:{port}: ")
    for result in (no_key, wrong_key):
        assert result.code == 1
        assert one_line(result) == "mrm-push: 401 unauthorized: a valid API key is required"
    for result in usage:
        assert result.code == 2, result.err
        assert "Traceback" not in result.err
    assert "mrm-push: deliveries retry: give delivery ids or --state, not both" in usage[2].err
    assert one_line(usage[4]) == "mrm-push: --url: give http://host[:port] or https://host[:port]"
    assert one_line(usage[5]) == (
        "mrm-push: --api-key-file: cannot read /nonexistent (No such file or directory)"
    )
    assert one_line(usage[6]).startswith("mrm-push: config: ")
    assert (
        one_line(usage[7]) == "mrm-push: --token: a firebase token is 1-4096 of A-Z a-z 0-9 _ - : ."
    )
    assert (await call(service, "GET", "/v1/rooms"))[1] == {"rooms": []}  # nothing was made
    assert timed_out.code == 1
    assert one_line(timed_out) == f"mrm-push: cannot reach {silent_url}: no answer within 0.5 s"
    assert version.code == 0
    assert version.out == f"mrm-push {importlib.metadata.version('mrm-push')}\n"


@pytest.mark.gen_test(timeout=60)
async def test_where_the_url_and_the_key_come_from(make_service, key_file, tmp_path):
    service = await make_service()
    wrong_file = tmp_path / "wrong-key"
    wrong_file.write_text("wrong-key-0123456789abcdef\n")
    # The config names the service (a wildcard host is reached on 127.0.0.1) and its key.
    (tmp_path / "good").mkdir()
    (tmp_path / "elsewhere").mkdir()
    good = write_config(tmp_path / "good", {"server": {"host": "0.0.0.0", "port": service.port}})
    elsewhere = write_config(
        tmp_path / "elsewhere",
        {"server": {"port": closed_port()}, "auth": {"api_keys": ["wrong-key-0123456789abcdef"]}},
    )
    host_port = service.base_url.removeprefix("http://")
    wrong_env = {"MRM_PUSH_API_KEY": "wrong-key-0123456789abcdef"}
    cases = {
        "the config alone": (("--config", str(good)), None, 0),
        "--api-key-file over the config": (
            ("--config", str(good), "--api-key-file", str(wrong_file)),
            None,
            1,
        ),
        "MRM_PUSH_API_KEY over the config": (("--config", str(good)), wrong_env, 1),
        "--api-key-file over MRM_PUSH_API_KEY": (
            ("--config", str(good), "--api-key-file", str(key_file)),
            wrong_env,
            0,
        ),
        "MRM_PUSH_API_KEY alone": (
            ("--url", service.base_url),
            {"MRM_PUSH_API_KEY": API_KEY},
            0,
        ),
        "--url over the config": (
            (
                "--config",
                str(elsewhere),
                "--url",
                service.base_url,
                "--api-key-file",
                str(key_file),
            ),
            None,
            0,
        ),
        "the key in --url's user-info": (("--url", f"http://mrm:{API_KEY}@{host_port}"), None, 0),
        "MRM_PUSH_API_KEY over --url's user-info": (
            ("--url", f"http://mrm:{API_KEY}@{host_port}"),
            wrong_env,
            1,
        ),
        "the config's URL, not its key, with --api-key-file": (
            ("--config", str(elsewhere), "--api-key-file", str(key_file)),
            None,
            1,
        ),
    }
    results = await asyncio.gather(
        *(run_cli("rooms", "list", "--json", *args, env=env) for args, env, _ in cases.values())
    )
    for (name, (_, _, code)), result in zip(cases.items(), results, strict=True):
        assert result.code == code, (name, result.err)
        if code == 0:
            assert result.json == {"rooms": []}, name
        assert API_KEY not in result.err + result.out, name
    assert "cannot reach http://127.0.0.1:" in results[-1].err
    assert "401 unauthorized" in results[1].err
