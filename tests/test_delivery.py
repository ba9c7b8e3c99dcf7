"""The delivery worker: a real SQLite outbox, the firebase-admin sender against the FCM emulator,
mrm_api's GraphQL endpoint for the backend, and a ManualClock that moves when the test says so."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from daemon.clock import ManualClock
from daemon.config import Backend, Config, Fcm
from daemon.delivery import IDLE_CHECK, NOTIFY_MUTATION, DeliveryWorker
from daemon.fcm import make_sender
from daemon.fcm_hold import MISMATCH_WINDOW, PROBE_INTERVAL
from daemon.fcm_message import DATA_LIMIT, fcm_data
from daemon.readiness import NotReady
from storage.base import FINAL_DELIVERY_STATES, Delivery, Notification, Target
from storage.sqlite import SqliteStore
from tests.fixtures import (  # noqa: F401
    EXECUTOR_THREADS,
    PROJECT,
    backend,
    emulator,
    executor,
    key_file,
    store,
)
from tests.mrm_api import MrmApi

CAL = "room-1@resource.calendar.google.com"
CAL_2 = "room-2@resource.calendar.google.com"
BACKEND_TOKEN = "backend-secret-token"
DAY = 86400.0


def tok(name: str) -> str:
    return f"tablet-{name}:APA91bFakeTokenForTheEmulator_{name}_0123456789"


TOKEN = tok("a")
TOKEN_B = tok("b")


def change(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "status": "confirmed", "updated": "2027-01-15T10:00:00.000Z"}


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- fixtures ------------------------------------------------------------------------------


class WatchedClock(ManualClock):
    """A ManualClock that tells the test each time something goes to sleep on it, and until
    when: the delivery loop's naps show whether it sleeps until its next work or spins."""

    def __init__(self) -> None:
        super().__init__()
        self.naps: asyncio.Queue[float] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        self.naps.put_nowait(self.now() + seconds)
        await super().sleep(seconds)


@pytest.fixture
def clock() -> WatchedClock:
    return WatchedClock()  # the emulator fixture runs on it too


@pytest.fixture
def make_worker(io_loop, store, clock, emulator, key_file, executor):
    senders = []

    def make(
        *, fcm: dict[str, Any] | None = None, backend: dict[str, Any] | None = None, **kw: Any
    ) -> DeliveryWorker:
        config = Config(
            fcm=Fcm(**{"attempt_timeout": 5, **(fcm or {})}),
            backend=Backend(**{"timeout": 5, **(backend or {})}),
        )
        sender = None
        if kw.pop("with_sender", True):
            sender = make_sender(
                kw.pop("fcm_backend", "firebase-admin"),
                service_account_file=key_file,
                project_id=PROJECT,
                endpoint=emulator.base_url,
                attempt_timeout=5.0,
                executor=kw.pop("executor", executor),
                threads=kw.pop("threads", EXECUTOR_THREADS),
                clock=clock,
            )
            senders.append(sender)
        on = kw.pop("store", store)
        return DeliveryWorker(
            on.outbox, on.notifications, on.rooms, sender, clock, config, BACKEND_TOKEN
        )

    yield make
    for sender in senders:
        io_loop.run_sync(sender.close)


def backend_settings(fake: MrmApi, **more: Any) -> dict[str, Any]:
    return {"url": fake.url, "notify": True, **more}


# -- helpers -------------------------------------------------------------------------------


async def publish(
    store,
    clock,
    tokens=(TOKEN,),
    *,
    calendar: str = CAL,
    notify: bool = False,
    changes: list[dict[str, Any]] | None = None,
    full_resync: bool = False,
) -> Notification:
    received = await store.notifications.add(calendar, "poll", "exists", clock.now())
    targets = [Target("fcm", t) for t in tokens] + ([Target("backend")] if notify else [])
    return await store.notifications.publish(
        received.id,
        [change("ev1")] if changes is None else changes,
        full_resync,
        targets,
        clock.now(),
    )


async def delivery(store, notification: Notification, token: str | None = None) -> Delivery:
    stored = await store.notifications.get(notification.id, with_deliveries=True)
    [found] = [d for d in stored.deliveries if d.target.token == token]
    return found


async def states(store, *notifications: Notification) -> list[str]:
    found = []
    for notification in notifications:
        stored = await store.notifications.get(notification.id, with_deliveries=True)
        found += [d.state for d in stored.deliveries]
    return found


async def run_until_settled(worker, store, clock, rounds: int = 30) -> None:
    """Run, then move the clock to the next due delivery, until nothing waits."""
    for _ in range(rounds):
        await worker.run_once()
        due = await store.outbox.next_due()
        if due is None:
            return
        clock.set(due)
    raise AssertionError("deliveries still waiting")


def expected_data(notification: Notification, ids: list[str], full: str = "0") -> dict[str, str]:
    return {
        "type": "calendar_changed",
        "calendar_id": notification.calendar_id,
        "notification_id": str(notification.id),
        "seq": str(notification.seq),
        "resource_state": notification.resource_state,
        "event_ids": compact(ids),
        "full_resync": full,
    }


def made(ids: list[str], **more: Any) -> Notification:
    return Notification(
        id=42,
        calendar_id=CAL,
        source="webhook",
        channel_id="c",
        message_number=7,
        resource_state="exists",
        received_at=0.0,
        state="published",
        changes=tuple(change(i) for i in ids),
        seq=17,
        **more,
    )


# -- the message -------------------------------------------------------------------------


def test_data_fields():
    notification = made(["ev1", "ev2", "ev1"])
    assert fcm_data(notification) == {
        "type": "calendar_changed",
        "calendar_id": CAL,
        "notification_id": "42",
        "seq": "17",
        "resource_state": "exists",
        "event_ids": '["ev1","ev2"]',
        "full_resync": "0",
    }
    resync = fcm_data(made([], full_resync=True))
    assert (resync["event_ids"], resync["full_resync"]) == ("[]", "1")


def ids_of_size(target: int) -> list[str]:
    """Event ids that bring the data map (as compact JSON) to exactly `target` bytes."""
    ids: list[str] = []
    while True:
        longer = [*ids, f"{len(ids):03d}" + "v" * 37]
        if len(compact(expected_data(made(longer), longer)).encode()) > target:
            break
        ids = longer
    short = target - len(compact(expected_data(made(ids), ids)).encode())
    ids[-1] += "v" * short
    assert len(compact(expected_data(made(ids), ids)).encode()) == target
    return ids


def test_ids_that_just_fit_are_kept_and_one_byte_more_is_a_full_resync():
    fits = ids_of_size(DATA_LIMIT - 1)
    assert fcm_data(made(fits)) == expected_data(made(fits), fits)
    too_big = ids_of_size(DATA_LIMIT)
    assert fcm_data(made(too_big)) == expected_data(made(too_big), [], full="1")


@pytest.mark.gen_test(timeout=20)
async def test_message_sent_per_token_with_exact_fields(store, clock, emulator, make_worker):
    worker = make_worker()
    notification = await publish(store, clock, (TOKEN, TOKEN_B), changes=[change("ev1")])
    assert await worker.run_once() == 2
    for token in (TOKEN, TOKEN_B):
        [message] = emulator.fcm.messages(token)
        assert message["message"] == {
            "token": token,
            "data": expected_data(notification, ["ev1"]),
            "android": {"priority": "high", "collapse_key": CAL, "ttl": "3600s"},
        }
        sent = await delivery(store, notification, token)
        assert (sent.state, sent.attempts, sent.last_error) == ("sent", 1, None)
    assert (worker.sent, worker.failed, worker.retried) == (2, 0, 0)


@pytest.mark.gen_test(timeout=20)
async def test_too_many_ids_go_out_as_full_resync(store, clock, emulator, make_worker):
    worker = make_worker()
    long_ids = [f"{i:04d}" + "v" * 60 for i in range(200)]
    big = await publish(store, clock, changes=[change(i) for i in long_ids])
    fits = ids_of_size(DATA_LIMIT - 1)
    small = await publish(store, clock, (TOKEN_B,), changes=[change(i) for i in fits])
    assert await worker.run_once() == 2
    [message] = emulator.fcm.messages(TOKEN)
    assert message["message"]["data"] == expected_data(big, [], full="1")
    [message] = emulator.fcm.messages(TOKEN_B)
    assert message["message"]["data"] == expected_data(small, fits)


# -- outcomes ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    ("state", "error"),
    [
        ("unregistered", "UNREGISTERED (HTTP 404): Requested entity was not found.; token dropped"),
        (
            "invalid",
            "INVALID_ARGUMENT (HTTP 400): The registration token is not a valid FCM "
            "registration token; token dropped",
        ),
    ],
)
async def test_refused_token_is_tombstoned_and_its_other_deliveries_cancelled(
    store, clock, emulator, make_worker, caplog, state, error
):
    caplog.set_level(logging.DEBUG, logger="daemon")
    worker = make_worker()
    await store.rooms.put(CAL, "Room", [TOKEN, TOKEN_B], clock.now())
    emulator.fcm.set_state(TOKEN, state)
    first = await publish(store, clock, (TOKEN, TOKEN_B))
    later = await publish(store, clock, (TOKEN,))
    # The later one waits for a retry: it is pending, not due, when the token is refused.
    waiting = await delivery(store, later, TOKEN)
    await store.outbox.finish(waiting.id, "pending", clock.now(), next_attempt_at=clock.now() + 99)

    assert await worker.run_once() == 2
    refused = await delivery(store, first, TOKEN)
    assert (refused.state, refused.attempts, refused.last_error) == ("failed", 1, error)
    assert (await delivery(store, later, TOKEN)).state == "cancelled"
    assert (await delivery(store, first, TOKEN_B)).state == "sent"
    assert (await store.rooms.get(CAL)).firebase_tokens == (TOKEN_B,)
    assert await store.rooms.tombstoned_tokens(CAL, clock.now() + 30 * DAY - 1) == {TOKEN}
    assert await store.rooms.tombstoned_tokens(CAL, clock.now() + 30 * DAY) == set()
    assert (worker.dropped_tokens, worker.failed, worker.sent) == (1, 1, 1)
    assert not worker.breaker_open
    logged = [
        json.dumps(vars(record), default=str)
        for record in caplog.records
        if record.name.startswith("daemon")
    ]
    assert any("fcm_token_dropped" in line for line in logged)
    assert not any(TOKEN in line for line in logged)


@pytest.mark.gen_test(timeout=20)
async def test_other_400_fails_at_once_with_fcms_message(store, clock, emulator, make_worker):
    worker = make_worker()
    await store.rooms.put(CAL, "Room", [TOKEN], clock.now())
    emulator.fcm.fail(TOKEN, 400, message="Invalid data payload key: from")
    notification = await publish(store, clock)
    assert await worker.run_once() == 1
    failed = await delivery(store, notification, TOKEN)
    assert (failed.state, failed.attempts) == ("failed", 1)
    assert failed.last_error == "INVALID_ARGUMENT (HTTP 400): Invalid data payload key: from"
    assert (await store.rooms.get(CAL)).firebase_tokens == (TOKEN,)  # the token stays
    assert await store.outbox.next_due() is None


@pytest.mark.gen_test(timeout=20)
async def test_unavailable_twice_then_sent_on_the_clock(store, clock, emulator, make_worker):
    worker = make_worker()
    emulator.fcm.fail(TOKEN, 503, count=2)
    notification = await publish(store, clock)
    start = clock.now()
    assert await worker.run_once() == 1
    first = await delivery(store, notification, TOKEN)
    assert (first.state, first.attempts) == ("pending", 1)
    assert first.last_error == "UNAVAILABLE (HTTP 503): The service is currently unavailable."
    assert 5 <= first.next_attempt_at - start <= 10  # backoff with jitter, from 10 s
    assert await store.outbox.next_due() == first.next_attempt_at

    assert await worker.run_once() == 0
    clock.set(first.next_attempt_at - 0.01)
    assert await worker.run_once() == 0
    assert emulator.fcm.attempts(TOKEN) == 1

    clock.set(first.next_attempt_at)
    assert await worker.run_once() == 1
    second = await delivery(store, notification, TOKEN)
    assert (second.state, second.attempts) == ("pending", 2)
    assert 10 <= second.next_attempt_at - clock.now() <= 20
    clock.set(second.next_attempt_at - 0.01)
    assert await worker.run_once() == 0
    assert emulator.fcm.attempts(TOKEN) == 2 and emulator.fcm.messages(TOKEN) == []

    clock.set(second.next_attempt_at)
    assert await worker.run_once() == 1
    sent = await delivery(store, notification, TOKEN)
    assert (sent.state, sent.attempts) == ("sent", 3)
    assert len(emulator.fcm.messages(TOKEN)) == 1
    assert (worker.retried, worker.sent) == (2, 1)


@pytest.mark.gen_test(timeout=20)
async def test_retry_after_is_honoured(store, clock, emulator, make_worker):
    worker = make_worker()
    emulator.fcm.fail(TOKEN, 429, retry_after=120)
    notification = await publish(store, clock)
    start = clock.now()
    assert await worker.run_once() == 1
    waiting = await delivery(store, notification, TOKEN)
    assert waiting.next_attempt_at == start + 120  # Retry-After beats the 5-10 s backoff
    assert waiting.last_error.startswith("QUOTA_EXCEEDED (HTTP 429)")
    clock.set(start + 119.9)
    assert await worker.run_once() == 0
    assert emulator.fcm.attempts(TOKEN) == 1
    clock.set(start + 120)
    assert await worker.run_once() == 1
    assert (await delivery(store, notification, TOKEN)).state == "sent"


@pytest.mark.gen_test(timeout=20)
async def test_max_attempts_then_failed_with_the_last_error(store, clock, emulator, make_worker):
    worker = make_worker(fcm={"max_attempts": 3})
    emulator.fcm.fail(TOKEN, 500, count=2)
    emulator.fcm.fail(TOKEN, 503, count=5)
    notification = await publish(store, clock)
    await run_until_settled(worker, store, clock)
    failed = await delivery(store, notification, TOKEN)
    assert (failed.state, failed.attempts) == ("failed", 3)
    assert failed.last_error == (
        "UNAVAILABLE (HTTP 503): The service is currently unavailable. (gave up after 3 attempts)"
    )
    assert emulator.fcm.attempts(TOKEN) == 3
    assert (worker.retried, worker.failed, worker.sent) == (2, 1, 0)


@pytest.mark.gen_test(timeout=30)
async def test_every_delivery_ends_final_none_lost(store, clock, emulator, backend, make_worker):
    worker = make_worker(fcm={"max_attempts": 3}, backend=backend_settings(backend, max_attempts=2))
    tokens = [tok(f"m{i}") for i in range(8)]
    await store.rooms.put(CAL, "Room", tokens, clock.now())
    emulator.fcm.set_state(tokens[0], "unregistered")
    emulator.fcm.fail(tokens[1], 503, count=100)
    emulator.fcm.fail(tokens[2], 400, count=100)
    emulator.fcm.fail(tokens[3], 429, count=1, retry_after=30)
    emulator.fcm.fail(tokens[4], 500, count=1)
    backend.answer(500, {"errors": [{"message": "down"}]}, count=100)
    published = [await publish(store, clock, tokens, notify=True) for _ in range(3)]
    await run_until_settled(worker, store, clock)
    found = await states(store, *published)
    assert len(found) == 3 * 9 and set(found) <= FINAL_DELIVERY_STATES
    assert await store.outbox.count("pending") == await store.outbox.count("in_flight") == 0
    assert found.count("sent") == worker.sent == 3 * 5
    assert found.count("cancelled") == 3 * 9 - worker.sent - worker.failed
    assert found.count("failed") == worker.failed
    assert found.count("failed") + found.count("cancelled") == 3 * 4


# -- the SENDER_ID_MISMATCH breaker --------------------------------------------------------


def breaker_log(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "fcm_sender_id_mismatch_breaker_open"]


@pytest.mark.gen_test(timeout=20)
async def test_five_mismatching_tokens_are_dropped_breaker_stays_closed(
    store, clock, emulator, make_worker, caplog
):
    worker = make_worker()  # mismatch_breaker 5: "more than 5" opens it
    tokens = [tok(f"x{i}") for i in range(5)]
    await store.rooms.put(CAL, "Room", tokens, clock.now())
    for token in tokens:
        emulator.fcm.set_state(token, "sender_id_mismatch")
    notification = await publish(store, clock, tokens)
    assert await worker.run_once() == 5
    assert not worker.breaker_open
    await worker.check()
    assert await states(store, notification) == ["failed"] * 5
    stored = await store.notifications.get(notification.id, with_deliveries=True)
    assert all(
        d.last_error == "SENDER_ID_MISMATCH (HTTP 403): SenderId mismatch; token dropped"
        for d in stored.deliveries
    )
    assert await store.rooms.tombstoned_tokens(CAL, clock.now()) == set(tokens)
    assert worker.dropped_tokens == 5
    assert breaker_log(caplog) == []

    # A sixth token a minute later: the first five are out of the window.
    clock.advance(MISMATCH_WINDOW)
    late = tok("late")
    await store.rooms.add_tokens(CAL, [late], clock.now(), respect_tombstones=True)
    emulator.fcm.set_state(late, "sender_id_mismatch")
    await publish(store, clock, (late,))
    assert await worker.run_once() == 1
    assert not worker.breaker_open
    assert worker.dropped_tokens == 6


@pytest.mark.gen_test(timeout=30)
async def test_sixth_mismatching_token_opens_the_breaker(
    store, clock, emulator, make_worker, caplog
):
    worker = make_worker()
    bad = [tok(f"x{i}") for i in range(7)]
    good = tok("good")
    await store.rooms.put(CAL, "Room", [*bad, good], clock.now())
    for token in bad:
        emulator.fcm.set_state(token, "sender_id_mismatch")

    # Six different tokens mismatch at once: five are dropped, the sixth opens the breaker.
    first = await publish(store, clock, bad[:6])
    opened_at = clock.now()
    assert await worker.run_once() == 6
    assert worker.breaker_open
    stored = await store.notifications.get(first.id, with_deliveries=True)
    held = [d for d in stored.deliveries if d.state == "pending"]
    assert len(held) == 1 and len(await store.rooms.tombstoned_tokens(CAL, clock.now())) == 5
    [kept] = held
    assert kept.attempts == 0
    assert kept.next_attempt_at == opened_at + PROBE_INTERVAL
    assert kept.last_error.startswith("held: SENDER_ID_MISMATCH breaker open")
    assert worker.dropped_tokens == 5
    assert len(breaker_log(caplog)) == 1 and breaker_log(caplog)[0].levelno == logging.ERROR
    with pytest.raises(NotReady, match="SENDER_ID_MISMATCH breaker open"):
        await worker.check()

    # While open: FCM deliveries wait untouched (not even claimed), no token is dropped.
    second = await publish(store, clock, (bad[6], good))
    attempts_before = emulator.fcm.requests
    assert await worker.run_once() == 0
    assert emulator.fcm.requests == attempts_before
    assert await waiting_untouched(store, second)
    room = await store.rooms.get(CAL)
    assert kept.target.token in room.firebase_tokens and bad[6] in room.firebase_tokens
    assert len(breaker_log(caplog)) == 1
    assert await worker.next_due() == opened_at + PROBE_INTERVAL

    # The probe: one delivery tried alone, the oldest waiting (bad[6]'s); a mismatch keeps the
    # breaker open and that delivery goes behind the others.
    clock.set(opened_at + PROBE_INTERVAL)
    assert await worker.run_once() == 1
    assert emulator.fcm.requests == attempts_before + 1
    assert emulator.fcm.attempts(bad[6]) == 1
    assert worker.breaker_open and worker.dropped_tokens == 5
    probed_at = clock.now()
    probed = await delivery(store, second, bad[6])
    assert (probed.state, probed.attempts) == ("pending", 0)
    assert probed.next_attempt_at == probed_at + PROBE_INTERVAL
    assert probed.last_error.startswith("held: SENDER_ID_MISMATCH breaker open; probe: ")
    assert await worker.run_once() == 0  # the others: still untouched until the next probe
    assert emulator.fcm.requests == attempts_before + 1
    assert (await delivery(store, second, good)).updated_at == second.published_at
    assert await worker.next_due() == probed_at + PROBE_INTERVAL
    with pytest.raises(NotReady, match="last probe: SENDER_ID_MISMATCH"):
        await worker.check()

    # FCM accepts again (the project was put right): the next probe is sent and closes it.
    for token in bad:
        emulator.fcm.set_state(token, "valid")
    clock.set(probed_at + PROBE_INTERVAL)
    assert await worker.run_once() == 1
    assert not worker.breaker_open
    await worker.check()
    await run_until_settled(worker, store, clock)
    assert await states(store, second) == ["sent", "sent"]
    assert (await delivery(store, first, kept.target.token)).state == "sent"
    assert await store.outbox.count("pending") == 0
    assert len(await store.rooms.tombstoned_tokens(CAL, clock.now())) == 5
    assert len(breaker_log(caplog)) == 1


async def waiting_untouched(store, notification: Notification) -> bool:
    """Every delivery of the notification is still as publishing made it."""
    stored = await store.notifications.get(notification.id, with_deliveries=True)
    return all(
        (d.state, d.attempts, d.updated_at, d.next_attempt_at, d.last_error)
        == ("pending", 0, notification.published_at, notification.published_at, None)
        for d in stored.deliveries
    )


@pytest.mark.gen_test(timeout=20)
async def test_while_held_the_loop_sleeps_until_the_probe_and_rewrites_nothing(
    store, clock, emulator, make_worker
):
    worker = make_worker()
    bad = [tok(f"x{i}") for i in range(6)]
    waiting_tokens = [tok(f"w{i}") for i in range(50)]
    for token in bad + waiting_tokens:
        emulator.fcm.set_state(token, "sender_id_mismatch")  # the project is wrong for all of them
    await publish(store, clock, bad)
    assert await worker.run_once() == 6 and worker.breaker_open
    probe_at = clock.now() + PROBE_INTERVAL
    waiting = [await publish(store, clock, (token,)) for token in waiting_tokens]
    requests = emulator.fcm.requests

    runner = asyncio.ensure_future(worker.run())
    assert await asyncio.wait_for(clock.naps.get(), 5) == pytest.approx(probe_at)  # no spin
    clock.advance(PROBE_INTERVAL / 2)  # a publication meanwhile wakes it: the same nap again
    late = await publish(store, clock, (tok("late"),))
    worker.wake()
    assert await asyncio.wait_for(clock.naps.get(), 5) == pytest.approx(probe_at)
    assert emulator.fcm.requests == requests
    assert all([await waiting_untouched(store, n) for n in [*waiting, late]])

    # At the probe time, one request (the oldest waiting delivery); it mismatches again, and
    # the loop sleeps until the next probe.
    clock.set(probe_at)
    await emulator.fcm.wait_for_attempts(waiting_tokens[0], 1)
    await worker.drain(5)
    naps = [await asyncio.wait_for(clock.naps.get(), 5)]
    while naps[-1] != pytest.approx(probe_at + PROBE_INTERVAL):
        assert len(naps) < 5, naps  # the probe's answer may come before or after one nap
        naps.append(await asyncio.wait_for(clock.naps.get(), 5))
    assert emulator.fcm.requests == requests + 1
    assert all([await waiting_untouched(store, n) for n in [*waiting[1:], late]])
    await worker.stop(5)
    assert runner.done() and runner.exception() is None


@pytest.mark.gen_test(timeout=20)
async def test_a_404_without_an_error_code_holds_fcm_and_drops_no_token(
    store, clock, emulator, make_worker, caplog
):
    worker = make_worker()
    await store.rooms.put(CAL, "Room", [TOKEN, TOKEN_B], clock.now())
    emulator.fcm.fail(None, 404, count=2)  # a wrong endpoint: Google's front end, HTML
    first = await publish(store, clock, (TOKEN, TOKEN_B))
    opened_at = clock.now()
    assert await worker.run_once() == 2
    assert worker.breaker_open and worker.dropped_tokens == 0 and worker.failed == 0
    stored = await store.notifications.get(first.id, with_deliveries=True)
    assert [(d.state, d.attempts) for d in stored.deliveries] == [("pending", 0)] * 2
    assert all(d.next_attempt_at == opened_at + PROBE_INTERVAL for d in stored.deliveries)
    assert all("check fcm.endpoint" in d.last_error for d in stored.deliveries)
    assert (await store.rooms.get(CAL)).firebase_tokens == (TOKEN, TOKEN_B)
    with pytest.raises(NotReady, match=r"FCM refused the project since .*HTTP 404"):
        await worker.check()
    opened = [r for r in caplog.records if r.getMessage() == "fcm_project_refused_hold_open"]
    assert len(opened) == 1

    # The oldest waiting delivery cannot even be tried (no token): another probe goes at once.
    untriable = await publish(store, clock, (None,))
    clock.advance(PROBE_INTERVAL)
    assert await worker.run_once() == 1
    assert (await delivery(store, untriable)).state == "failed"
    assert worker.breaker_open and not worker.hold.probing
    assert await worker.run_once() == 1  # the probe proper: FCM answers again, the hold closes
    assert not worker.breaker_open
    await run_until_settled(worker, store, clock)
    assert await states(store, first) == ["sent", "sent"]
    await worker.check()


class HeldFinish:
    """An outbox whose next `finish` waits until the test lets it go (`taken` says it came)."""

    def __init__(self, outbox: Any) -> None:
        self._outbox = outbox
        self.taken = asyncio.Event()
        self.release = asyncio.Event()
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outbox, name)

    async def finish(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            self.taken.set()
            await self.release.wait()
        return await self._outbox.finish(*args, **kwargs)


@pytest.mark.gen_test(timeout=20)
async def test_a_probe_whose_record_is_slow_does_not_end_the_next_probe(
    store, clock, emulator, key_file, executor
):
    # The probe's answer came (the next one is due in PROBE_INTERVAL) but recording it takes
    # longer; the next probe goes meanwhile. The first one's end must not count as the second's:
    # that would let a third probe go beside it.
    sender = make_sender(
        "firebase-admin",
        service_account_file=key_file,
        project_id=PROJECT,
        endpoint=emulator.base_url,
        attempt_timeout=5.0,
        executor=executor,
        threads=EXECUTOR_THREADS,
        clock=clock,
    )
    outbox = HeldFinish(store.outbox)
    worker = DeliveryWorker(
        outbox, store.notifications, store.rooms, sender, clock, Config(), BACKEND_TOKEN
    )
    running: list[asyncio.Future[int]] = []
    try:
        tokens = [tok(f"h{i}") for i in range(3)]
        emulator.fcm.fail(None, 404, count=2)  # the hold opens, and the first probe fails
        await publish(store, clock, tokens[:1])
        assert await worker.run_once() == 1 and worker.breaker_open
        await publish(store, clock, tokens[1:])  # due before the held one: probed first
        clock.advance(PROBE_INTERVAL)
        outbox.armed = True
        running.append(asyncio.ensure_future(worker.run_once()))  # its record is held
        await asyncio.wait_for(outbox.taken.wait(), 5)
        clock.advance(PROBE_INTERVAL)
        emulator.fcm.hold_answers()
        running.append(asyncio.ensure_future(worker.run_once()))  # the next probe
        await emulator.fcm.wait_for_attempts(tokens[2], 1)
        assert worker.hold.probing
        outbox.release.set()
        assert await running[0] == 1
        assert worker.hold.probing  # the second probe is still under way
        assert await worker.run_once() == 0  # so no other one goes beside it
        emulator.fcm.release()
        assert await running[1] == 1
        assert not worker.breaker_open
    finally:
        outbox.release.set()
        emulator.fcm.release()
        for future in running:
            future.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await sender.close()


# -- leases, restarts, stop ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("recovery", ["release_claims", "lease_expiry"])
async def test_a_claim_survives_a_crash(clock, emulator, make_worker, tmp_path, recovery):
    path = str(tmp_path / "crash.sqlite3")
    crashed = SqliteStore(path)
    await crashed.open()
    notification = await publish(crashed, clock)
    # A worker claims the delivery and dies before recording anything.
    [claimed] = await crashed.outbox.claim(clock.now(), clock.now() + 95)
    await crashed.close()

    reopened = SqliteStore(path)
    await reopened.open()
    try:
        worker = make_worker(store=reopened)
        assert await worker.run_once() == 0  # still claimed by the dead worker
        if recovery == "release_claims":
            assert await reopened.outbox.release_claims() == 1
        else:
            assert await reopened.outbox.next_due() == claimed.lease_until
            clock.set(claimed.lease_until)
        assert await worker.run_once() == 1
        sent = await delivery(reopened, notification, TOKEN)
        assert (sent.state, sent.attempts) == ("sent", 1)
        assert len(emulator.fcm.messages(TOKEN)) == 1
    finally:
        await reopened.close()


@pytest.mark.gen_test(timeout=20)
async def test_worker_leases_cover_the_attempt(store, clock, emulator, make_worker):
    worker = make_worker()
    emulator.fcm.hold_answers(TOKEN)
    notification = await publish(store, clock)
    running = asyncio.ensure_future(worker.run_once())
    await emulator.fcm.wait_for_attempts(TOKEN, 1)
    in_flight = await delivery(store, notification, TOKEN)
    assert in_flight.state == "in_flight"
    assert in_flight.lease_until >= clock.now() + 2 * 5 + 30
    emulator.fcm.release()
    assert await running == 1


@pytest.mark.gen_test(timeout=20)
async def test_the_worker_claims_no_more_pyfcm_attempts_than_there_are_threads(
    store, clock, emulator, make_worker
):
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        worker = make_worker(fcm_backend="pyfcm", executor=pool, threads=2)
        tokens = [tok(f"p{i}") for i in range(5)]
        emulator.fcm.hold_answers()
        notification = await publish(store, clock, tokens)
        running = asyncio.ensure_future(worker.run_once())
        await emulator.fcm.wait_for_attempts(tokens[0], 1)
        await emulator.fcm.wait_for_attempts(tokens[1], 1)
        # The other three stay pending in the store, not claimed to wait for a thread (where
        # the attempt's guard would run out on them).
        assert await store.outbox.count("in_flight") == 2
        assert await store.outbox.count("pending") == 3
        emulator.fcm.release()
        assert await running == 2
        await run_until_settled(worker, store, clock)
        assert await states(store, notification) == ["sent"] * 5
    finally:
        emulator.fcm.release()
        pool.shutdown(wait=True)


@pytest.mark.gen_test(timeout=20)
async def test_run_loop_sends_and_retries_on_the_clock_then_stops(
    store, clock, emulator, make_worker
):
    worker = make_worker()
    runner = asyncio.ensure_future(worker.run())
    emulator.fcm.fail(TOKEN, 503)
    notification = await publish(store, clock)
    worker.wake()
    await emulator.fcm.wait_for_attempts(TOKEN, 1)
    await worker.drain(5)
    waiting = await delivery(store, notification, TOKEN)
    assert (waiting.state, waiting.attempts) == ("pending", 1)
    clock.set(waiting.next_attempt_at)
    await emulator.fcm.wait_for(TOKEN, 1)
    await worker.drain(5)
    assert (await delivery(store, notification, TOKEN)).state == "sent"
    await worker.stop(5)
    assert runner.done() and runner.exception() is None
    assert emulator.fcm.attempts(TOKEN) == 2


@pytest.mark.gen_test(timeout=20)
async def test_stop_leaves_an_unfinished_attempt_for_the_next_start(
    store, clock, emulator, make_worker
):
    """The one duplicate the contract allows: FCM accepts after the process gave up."""
    worker = make_worker()
    runner = asyncio.ensure_future(worker.run())
    emulator.fcm.hold_answers(TOKEN)
    notification = await publish(store, clock)
    worker.wake()
    await emulator.fcm.wait_for_attempts(TOKEN, 1)
    await worker.stop(0.2)
    assert runner.done()
    assert (await delivery(store, notification, TOKEN)).state == "in_flight"
    emulator.fcm.release()  # FCM accepts the abandoned request after all

    assert await store.outbox.release_claims() == 1
    again = make_worker()
    assert await again.run_once() == 1
    sent = await delivery(store, notification, TOKEN)
    assert (sent.state, sent.attempts) == ("sent", 1)
    assert len(await emulator.fcm.wait_for(TOKEN, 2)) == 2


@pytest.mark.gen_test(timeout=20)
async def test_without_a_sender_fcm_deliveries_are_left_untouched_and_unready(
    store, clock, emulator, backend, make_worker
):
    """FCM deliveries an older version made on a site without FCM: never claimed or rewritten
    (retention expires them); backend deliveries still go, and the loop does not spin."""
    worker = make_worker(with_sender=False, backend=backend_settings(backend))
    notification = await publish(store, clock, (TOKEN, TOKEN_B), notify=True)
    assert await worker.run_once() == 1  # the backend's
    stored = await store.notifications.get(notification.id, with_deliveries=True)
    assert sorted(d.state for d in stored.deliveries) == ["pending", "pending", "sent"]
    assert all(
        (d.updated_at, d.attempts, d.last_error) == (notification.published_at, 0, None)
        for d in stored.deliveries
        if d.target.kind == "fcm"
    )
    assert await worker.next_due() is None
    runner = asyncio.ensure_future(worker.run())
    assert await asyncio.wait_for(clock.naps.get(), 5) == clock.now() + IDLE_CHECK
    await worker.stop(5)
    assert runner.done() and runner.exception() is None
    assert emulator.fcm.requests == 0
    with pytest.raises(NotReady, match="not configured"):
        await worker.check()


@pytest.mark.gen_test(timeout=20)
async def test_retention_expires_what_never_became_final(store, clock, emulator, make_worker):
    worker = make_worker(with_sender=False)
    old = await publish(store, clock)
    clock.advance(DAY)
    recent = await publish(store, clock)
    assert await worker.expire(clock.now() - DAY / 2) == 1
    assert (await delivery(store, old, TOKEN)).state == "expired"
    assert (await delivery(store, recent, TOKEN)).state == "pending"
    assert worker.expired == 1


# -- backend notify ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_backend_notify_uses_variables_and_bearer(store, clock, backend, make_worker):
    worker = make_worker(backend=backend_settings(backend))
    notification = await publish(store, clock, (), notify=True)
    assert await worker.run_once() == 1
    [request] = backend.calls
    assert request.errors == []  # it fits mrm_api's schema
    assert request.authorization == f"Bearer {BACKEND_TOKEN}"
    assert request.content_type == "application/json"
    assert request.body == {"query": NOTIFY_MUTATION, "variables": {"calendarId": CAL}}
    assert CAL not in request.body["query"]
    sent = await delivery(store, notification)
    assert (sent.state, sent.attempts, sent.last_error) == ("sent", 1, None)


@pytest.mark.gen_test(timeout=20)
async def test_backend_deliveries_of_a_calendar_due_together_make_one_call(
    store, clock, backend, make_worker
):
    worker = make_worker(backend=backend_settings(backend))
    published = [await publish(store, clock, (), notify=True) for _ in range(3)]
    other = await publish(store, clock, (), notify=True, calendar=CAL_2)
    assert await worker.run_once() == 4
    calls = sorted(r.variables["calendarId"] for r in backend.calls)
    assert calls == [CAL, CAL_2]
    for notification in [*published, other]:
        sent = await delivery(store, notification)
        assert (sent.state, sent.attempts, sent.last_error) == ("sent", 1, None)
    assert worker.sent == 4


@pytest.mark.gen_test(timeout=20)
async def test_one_backend_call_in_flight_per_calendar_and_one_waiting(
    store, clock, backend, make_worker
):
    worker = make_worker(backend=backend_settings(backend))
    backend.gate = asyncio.Event()
    first = await publish(store, clock, (), notify=True)
    calling = asyncio.ensure_future(worker.run_once())
    await backend.wait_for(1)
    later = [await publish(store, clock, (), notify=True) for _ in range(2)]
    assert await worker.run_once() == 2  # claimed, waiting behind the call in flight
    assert len(backend.calls) == 1
    assert await states(store, *later) == ["in_flight", "in_flight"]

    backend.gate.set()
    assert await calling == 1
    assert len(backend.calls) == 2  # the two waiting ones made a single call
    assert await states(store, first, *later) == ["sent"] * 3


@pytest.mark.gen_test(timeout=20)
async def test_waiting_backend_deliveries_join_a_failed_calls_retry(
    store, clock, backend, make_worker
):
    worker = make_worker(backend=backend_settings(backend))
    backend.gate = asyncio.Event()
    backend.answer(500, {"error": "boom"})
    first = await publish(store, clock, (), notify=True)
    calling = asyncio.ensure_future(worker.run_once())
    await backend.wait_for(1)
    later = await publish(store, clock, (), notify=True)
    assert await worker.run_once() == 1
    backend.gate.set()
    await calling
    failed_call = await delivery(store, first)
    waited = await delivery(store, later)
    assert (failed_call.state, failed_call.attempts) == ("pending", 1)
    assert (waited.state, waited.attempts) == ("pending", 0)
    assert waited.next_attempt_at == failed_call.next_attempt_at
    assert len(backend.calls) == 1

    clock.set(failed_call.next_attempt_at)
    assert await worker.run_once() == 2
    assert len(backend.calls) == 2
    assert await states(store, first, later) == ["sent", "sent"]


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, {"errors": [{"message": "down"}]}, "the backend answered HTTP 500"),
        (
            200,
            {"data": None, "errors": [{"message": "Room not found"}]},
            "the backend answered GraphQL errors: Room not found",
        ),
    ],
)
async def test_backend_failure_is_retried(store, clock, backend, make_worker, status, body, error):
    worker = make_worker(backend=backend_settings(backend))
    backend.answer(status, body)
    notification = await publish(store, clock, (), notify=True)
    assert await worker.run_once() == 1
    waiting = await delivery(store, notification)
    assert (waiting.state, waiting.attempts, waiting.last_error) == ("pending", 1, error)
    clock.set(waiting.next_attempt_at - 0.01)
    assert await worker.run_once() == 0
    clock.set(waiting.next_attempt_at)
    assert await worker.run_once() == 1
    sent = await delivery(store, notification)
    assert (sent.state, sent.attempts) == ("sent", 2)
    assert len(backend.calls) == 2


@pytest.mark.gen_test(timeout=20)
async def test_backend_retry_after_and_max_attempts(store, clock, backend, make_worker):
    worker = make_worker(backend=backend_settings(backend, max_attempts=2))
    backend.answer(429, {"errors": [{"message": "slow down"}]}, Retry_After="300")
    backend.answer(503, {"errors": [{"message": "down"}]})
    notification = await publish(store, clock, (), notify=True)
    start = clock.now()
    assert await worker.run_once() == 1
    waiting = await delivery(store, notification)
    assert waiting.next_attempt_at == start + 300
    clock.set(start + 300)
    assert await worker.run_once() == 1
    failed = await delivery(store, notification)
    assert (failed.state, failed.attempts) == ("failed", 2)
    assert failed.last_error == "the backend answered HTTP 503 (gave up after 2 attempts)"
