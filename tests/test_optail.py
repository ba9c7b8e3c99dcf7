"""`mrm-push notifications tail` as a process against /ws of a service on the test's loop: live
notifications, a socket closed under it (reconnect, resume without gap or duplicate), an
incomplete replay reported, the signals. Every wait is for a line the command prints."""

from __future__ import annotations

import json
import signal

import pytest

from storage.base import Notification
from tests.fixtures import API_KEY, make_service, write_config  # noqa: F401
from tests.operator_cli import line_starting, next_line, run_cli, start_cli

TOKEN = "subscriber-token-sees-all-0123456789"
ROOM_A = "room-a@resource.calendar.google.com"
ROOM_B = "room-b@resource.calendar.google.com"
LIMITED = "subscriber-token-room-a-only-0123456"
SUBSCRIBERS = {
    "auth": {
        "subscribers": [
            {"token": TOKEN, "calendars": ["*"]},
            {"token": LIMITED, "calendars": [ROOM_A]},
        ]
    }
}


async def publish(service, calendar_id: str, summary: str) -> Notification:
    """A notification published in the store and announced, as a sync does."""
    store, now = service.store, service.clock.now()
    received = await store.notifications.add(calendar_id, "poll", "exists", received_at=now)
    change = {"event_id": f"ev-{received.id}", "status": "confirmed", "summary": summary}
    published = await store.notifications.publish(received.id, [change], False, [], now)
    for listener in service.publication_listeners:
        listener(published)
    return published


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "subscriber-token"
    path.write_text(TOKEN + "\n")
    return path


async def stop(process, signum=signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(signum)
    rest = await process.stdout.read()
    return await process.wait(), rest.decode()


@pytest.mark.gen_test(timeout=60)
async def test_tail_follows_and_resumes_after_the_socket_closes(make_service, token_file):
    service = await make_service(SUBSCRIBERS)
    process = await start_cli(
        "notifications", "tail", "--json", "--url", service.base_url,
        "--subscriber-token-file", str(token_file),
    )  # fmt: skip
    try:
        assert await next_line(process.stderr) == "mrm-push: subscribed to *"
        first = await publish(service, ROOM_A, "Standup")
        line = json.loads(await next_line(process.stdout))
        assert (line["type"], line["seq"], line["id"]) == ("notification", first.seq, first.id)
        assert line["changes"][0]["summary"] == "Standup"

        # The service closes the socket and refuses new ones for a while (as while it shuts
        # down): what is published meanwhile comes by replay once it takes sockets again.
        hub = service.fanout
        hub.closing = True
        for client in list(hub.clients):
            hub.close(client, 1001, "going away")
        closed = await next_line(process.stderr)
        assert closed.startswith("mrm-push: the connection closed (1001 going away); reconnecting")
        refused = await next_line(process.stderr)
        assert refused.startswith("mrm-push: /ws answered 503 shutting_down: ")
        missed = await publish(service, ROOM_B, "Retro")
        hub.closing = False
        assert await next_line(process.stderr) == f"mrm-push: subscribed to * after seq {first.seq}"
        assert await next_line(process.stderr) == "mrm-push: replayed 1"
        live = await publish(service, ROOM_A, "Lunch")
        seqs = [json.loads(await next_line(process.stdout))["seq"] for _ in range(2)]
        assert seqs == [missed.seq, live.seq] == [first.seq + 1, first.seq + 2]
        code, rest = await stop(process)
        assert code == 0 and rest == ""  # nothing twice, nothing more
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.gen_test(timeout=60)
async def test_tail_reports_an_incomplete_replay_and_stops_on_sigint(
    make_service, tmp_path, token_file
):
    service = await make_service(SUBSCRIBERS)
    await publish(service, ROOM_A, "Standup")
    # The subscriber token from the config's first subscriber; the URL from its server.
    (tmp_path / "operator").mkdir()
    config = write_config(tmp_path / "operator", {"server": {"port": service.port}, **SUBSCRIBERS})
    process = await start_cli(
        "notifications", "tail", "--config", str(config), "--calendar", ROOM_A, "--after", "99"
    )
    try:
        said: list[str] = []
        await line_starting(process.stderr, "mrm-push: the replay is incomplete", said)
        assert said == [f"mrm-push: subscribed to {ROOM_A} after seq 99", "mrm-push: replayed 0"]
        await publish(service, ROOM_B, "elsewhere")  # not subscribed to
        second = await publish(service, ROOM_A, "Retro")
        line = await next_line(process.stdout)
        assert f"  seq {second.seq}  {ROOM_A}  poll exists  1: confirmed Retro" in line
        assert line.endswith("1: confirmed Retro") and line[:4].isdigit()  # a readable time
        code, rest = await stop(process, signal.SIGINT)
        assert (code, rest) == (0, "")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.gen_test(timeout=60)
async def test_tail_without_a_usable_subscriber_token(make_service, tmp_path, token_file):
    service = await make_service(SUBSCRIBERS)
    (tmp_path / "plain").mkdir()
    no_subscribers = write_config(tmp_path / "plain", {"server": {"port": service.port}})
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-subscriber-token-0123456789\n")
    missing = await run_cli("notifications", "tail", "--config", str(no_subscribers))
    assert missing.code == 2
    assert missing.err == (
        "mrm-push: no subscriber token: give --subscriber-token-file, or a config with "
        "auth.subscribers\n"
    )
    refused = await run_cli(
        "notifications", "tail", "--url", service.base_url, "--subscriber-token-file", str(wrong)
    )
    assert refused.code == 1
    assert refused.err == "mrm-push: 401 unauthorized: a valid subscriber token is required\n"
    limited = tmp_path / "limited-token"
    limited.write_text(LIMITED)
    forbidden = await run_cli(
        "notifications", "tail", "--url", service.base_url, "--subscriber-token-file",
        str(limited), "--calendar", ROOM_B,
    )  # fmt: skip
    assert forbidden.code == 1
    assert forbidden.err.splitlines()[-1] == (
        f"mrm-push: 403 forbidden_calendar: this token may not see that calendar: {ROOM_B}"
    )
