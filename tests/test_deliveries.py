"""GET /v1/deliveries and POST /v1/deliveries/retry over real HTTP; a retry end to end through
firebase-admin and the FCM emulator (fail first, retry, the message arrives once)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from storage.base import Target
from tests.fixtures import call, clock, emulator, make_service  # noqa: F401

ROOM = "room-1@resource.calendar.google.com"
PATH = "/v1/rooms/" + quote(ROOM)
TABLET = "tablet-token-" + "a" * 40
OTHER_TABLET = "tablet-token-" + "b" * 40
DAY = 86400


async def failed_once(service, emulator, tokens: list[str]) -> dict[str, dict]:
    """A room with `tokens`, FCM refusing the first message to each for good (a 400 that is not
    about the token); returns each token's delivery as GET /v1/deliveries shows it, by token."""
    await call(service, "PUT", PATH, {"firebase_tokens": tokens})
    await emulator.google.drain()
    for token in tokens:
        emulator.fcm.fail(token, 400)
    emulator.google.insert_event(ROOM, summary="Standup")
    for token in tokens:
        await emulator.fcm.wait_for_attempts(token, 1, 10)
    await service.syncer.drain(5)
    await service.delivery.drain(5)
    status, page = await call(service, "GET", "/v1/deliveries?state=failed")
    assert status == 200
    by_token = {d["token"]: d for d in page["deliveries"]}
    assert set(by_token) == {t[-8:] for t in tokens}
    return {t: by_token[t[-8:]] for t in tokens}


@pytest.mark.gen_test(timeout=30)
async def test_a_failed_delivery_retried_by_id_reaches_the_tablet_once(
    make_service, emulator, clock
):
    service = await make_service(clock=clock, emulator=emulator)
    failed = (await failed_once(service, emulator, [TABLET]))[TABLET]
    assert failed["target"] == "fcm" and failed["calendar_id"] == ROOM
    assert failed["attempts"] == 1 and "INVALID_ARGUMENT" in failed["last_error"]
    assert failed["next_attempt_at"] is None
    assert failed["updated_at"].endswith("Z") and failed["created_at"].endswith("Z")
    assert emulator.fcm.messages(TABLET) == []

    status, answer = await call(service, "POST", "/v1/deliveries/retry", {"ids": [failed["id"]]})
    assert (status, answer) == (200, {"retried": 1, "skipped": [], "skipped_total": 0})
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await service.delivery.drain(5)
    _, page = await call(service, "GET", "/v1/deliveries")
    [sent] = page["deliveries"]
    assert (sent["id"], sent["state"], sent["attempts"], sent["last_error"]) == (
        failed["id"],
        "sent",
        1,
        None,
    )
    # Sent now: a second retry leaves it, and the tablet has its one message.
    status, answer = await call(service, "POST", "/v1/deliveries/retry", {"ids": [failed["id"]]})
    assert answer["retried"] == 0
    assert answer["skipped"] == [{"id": failed["id"], "reason": "not_retryable", "state": "sent"}]
    assert await service.delivery.run_once() == 0
    assert len(emulator.fcm.messages(TABLET)) == 1


@pytest.mark.gen_test(timeout=30)
async def test_retry_by_state_skips_a_dropped_token_and_the_hourly_purge_keeps_the_retried(
    make_service, emulator, clock
):
    service = await make_service({"storage": {"retention_days": 2}}, clock=clock, emulator=emulator)
    failed = await failed_once(service, emulator, [TABLET, OTHER_TABLET])
    await call(service, "DELETE", f"{PATH}/tokens/{OTHER_TABLET}")
    clock.advance(3 * DAY)  # past retention: the next purge would expire anything pending
    emulator.fcm.fail(TABLET, 503)  # the retry's first attempt: try again later

    status, answer = await call(service, "POST", "/v1/deliveries/retry?state=failed")
    assert status == 200 and answer["retried"] == 1
    assert answer["skipped"] == [
        {"id": failed[OTHER_TABLET]["id"], "reason": "token_dropped", "state": "failed"}
    ]
    await emulator.fcm.wait_for_attempts(TABLET, 2, 10)
    await service.delivery.drain(5)
    assert await service.purge() == 0
    _, page = await call(service, "GET", "/v1/deliveries?state=pending")
    [waiting] = page["deliveries"]
    assert waiting["id"] == failed[TABLET]["id"] and waiting["attempts"] == 1
    assert page["counts"] == {
        "pending": 1,
        "in_flight": 0,
        "sent": 0,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
    }
    clock.advance(10)  # the backoff after a 503: 5 to 10 s
    await emulator.fcm.wait_for(TABLET, 1, 10)
    await service.delivery.drain(5)
    assert len(emulator.fcm.messages(TABLET)) == 1
    assert emulator.fcm.messages(OTHER_TABLET) == []


@pytest.mark.gen_test(timeout=30)
async def test_the_list_pages_newest_first_and_never_shows_a_whole_token(make_service):
    # Without FCM configured nothing sends these: they stay pending.
    service = await make_service()
    store, now = service.store, service.clock.now()
    made = []
    for calendar_id in ("a@x", "b@x", "a@x"):
        received = await store.notifications.add(calendar_id, "poll", "exists", now)
        published = await store.notifications.publish(
            received.id, [], True, [Target("fcm", TABLET), Target("fcm", OTHER_TABLET)], now
        )
        made += [d.id for d in published.deliveries]
    status, page = await call(service, "GET", "/v1/deliveries?limit=4")
    assert status == 200
    assert [d["id"] for d in page["deliveries"]] == made[::-1][:4]
    assert page["next_before"] == made[2]
    _, rest = await call(service, "GET", f"/v1/deliveries?limit=4&before={page['next_before']}")
    assert [d["id"] for d in rest["deliveries"]] == made[1::-1]
    assert rest["next_before"] is None
    _, one = await call(service, "GET", "/v1/deliveries?calendar_id=b%40x")
    assert [d["id"] for d in one["deliveries"]] == made[3:1:-1]
    assert one["counts"]["pending"] == 2
    assert one["next_before"] is None
    first = page["deliveries"][0]
    assert set(first) == {
        "id",
        "notification_id",
        "calendar_id",
        "target",
        "token",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "created_at",
        "updated_at",
    }
    assert first["token"] == OTHER_TABLET[-8:] and first["next_attempt_at"].endswith("Z")
    _, raw = await call(service, "GET", "/v1/deliveries", headers={"Accept": "text/plain"})
    assert TABLET not in json.dumps(raw) and OTHER_TABLET not in json.dumps(raw)


BAD = [
    ("GET", "/v1/deliveries?state=lost", None, "invalid_state"),
    ("GET", "/v1/deliveries?limit=0", None, "invalid_limit"),
    ("GET", "/v1/deliveries?limit=501", None, "invalid_limit"),
    ("GET", "/v1/deliveries?limit=%D9%A3", None, "invalid_limit"),
    ("GET", "/v1/deliveries?before=--1", None, "invalid_before"),
    ("GET", "/v1/deliveries?calendar_id=a%00b", None, "invalid_calendar_id"),
    ("POST", "/v1/deliveries/retry", None, "invalid_body"),
    ("POST", "/v1/deliveries/retry?state=pending", None, "invalid_state"),
    ("POST", "/v1/deliveries/retry?state=failed", {"ids": [1]}, "invalid_body"),
    ("POST", "/v1/deliveries/retry?state=failed", {"colour": 1}, "unknown_field"),
    ("POST", "/v1/deliveries/retry", {"ids": []}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", {"ids": "1"}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", {"ids": [True]}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", {"ids": [0]}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", {"ids": ["1"]}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", {"ids": [2**63]}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", {"ids": list(range(1, 502))}, "invalid_ids"),
    ("POST", "/v1/deliveries/retry", [1], "invalid_json"),
]


@pytest.mark.gen_test(timeout=30)
async def test_bad_input_is_a_400_that_changes_nothing(make_service):
    service = await make_service()
    store, now = service.store, service.clock.now()
    received = await store.notifications.add("a@x", "poll", "exists", now)
    published = await store.notifications.publish(
        received.id, [], True, [Target("fcm", TABLET)], now
    )
    (delivery,) = published.deliveries
    await store.outbox.finish(delivery.id, "failed", now, attempts=1, last_error="x")
    for method, path, body, code in BAD:
        status, answer = await call(service, method, path, body)
        assert (status, answer["error"]["code"]) == (400, code), (path, body, answer)
    for method, path in [("GET", "/v1/deliveries"), ("POST", "/v1/deliveries/retry?state=failed")]:
        status, answer = await call(service, method, path, key=None)
        assert (status, answer["error"]["code"]) == (401, "unauthorized")
    assert (await store.outbox.list())[0].state == "failed"
