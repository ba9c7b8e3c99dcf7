"""The FCM senders, with the real firebase-admin and pyfcm clients, against the emulator."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web

from daemon.clock import ManualClock
from daemon.emulator.fcm import FcmEmulator
from daemon.emulator.keys import write_service_account
from daemon.emulator.oauth import OAuthEmulator
from daemon.fcm import make_sender
from daemon.fcm_firebase import FirebaseAdminSender
from daemon.fcm_outcome import SendOutcome, classify, shorten
from daemon.fcm_pyfcm import PyFcmSender
from daemon.readiness import NotReady
from tests.fixtures import EXECUTOR_THREADS, executor  # noqa: F401

PROJECT = "mrm-push-test"
TOKEN = "dGVzdC10YWJsZXQ:APA91bFakeTokenForTheEmulator_0123456789"
CALENDAR = "room-1@resource.calendar.google.com"
DATA = {
    "type": "calendar_changed",
    "calendar_id": CALENDAR,
    "notification_id": "42",
    "seq": "17",
    "resource_state": "exists",
    "event_ids": json.dumps(["ev1", "ev2"]),
    "full_resync": "0",
}
BACKENDS = ["firebase-admin", "pyfcm"]


@dataclass
class Emulator:
    base_url: str
    project: str
    oauth: OAuthEmulator
    fcm: FcmEmulator
    key_file: str


@pytest.fixture
def start_emulator(io_loop, tmp_path):
    """Start an OAuth + FCM emulator on an unused port of this test's loop; write its key."""
    servers: list[tornado.httpserver.HTTPServer] = []

    def start(project: str = PROJECT) -> Emulator:
        oauth = OAuthEmulator()
        fcm = FcmEmulator(oauth, ManualClock(), project_id=project)
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application(oauth.routes() + fcm.routes())
        )
        server.add_sockets([sock])
        servers.append(server)
        base_url = f"http://127.0.0.1:{port}"
        key_file = str(tmp_path / f"{project}-{port}.json")
        info = write_service_account(
            key_file,
            token_uri=f"{base_url}/token",
            client_email=f"push@{project}.iam.gserviceaccount.com",
            project_id=project,
        )
        oauth.register(info)
        return Emulator(base_url, project, oauth, fcm, key_file)

    yield start
    for server in servers:
        server.stop()
        io_loop.run_sync(server.close_all_connections)


@pytest.fixture
def emu(start_emulator):
    return start_emulator()


@pytest.fixture
def senders(io_loop, executor, start_emulator):
    """Make senders aimed at an emulator; every one is closed after the test."""
    made = []

    def make(backend, emulator, *, attempt_timeout=5.0, endpoint=None, project=None, **extra):
        sender = make_sender(
            backend,
            service_account_file=emulator.key_file,
            project_id=project or emulator.project,
            endpoint=endpoint or emulator.base_url,
            attempt_timeout=attempt_timeout,
            executor=extra.pop("executor", executor),
            threads=extra.pop("threads", EXECUTOR_THREADS),
            **extra,
        )
        made.append(sender)
        return sender

    yield make
    for sender in made:
        io_loop.run_sync(sender.close)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


async def send(sender) -> SendOutcome:
    return await sender.send(TOKEN, DATA, CALENDAR, 3600)


# -- a message that gets through -----------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_send_arrives_with_exact_fields(backend, emu, senders):
    sender = senders(backend, emu)
    await sender.start()
    outcome = await send(sender)
    assert outcome.kind == "sent", outcome
    [received] = await emu.fcm.wait_for(TOKEN, 1, timeout=5)
    assert received["message"] == {
        "token": TOKEN,
        "data": DATA,
        "android": {"priority": "high", "collapse_key": CALENDAR, "ttl": "3600s"},
    }
    assert outcome.message_id == received["name"]
    assert emu.fcm.attempts(TOKEN) == 1


@pytest.mark.gen_test(timeout=15)
async def test_notification_body_goes_beside_the_same_data(backend, emu, senders):
    # fcm.notification_body: the old mrm_push's notification message, for tablet builds that
    # read getNotification(); the data message is unchanged.
    sender = senders(backend, emu, notification_body="success")
    await sender.start()
    outcome = await send(sender)
    assert outcome.kind == "sent", outcome
    [received] = await emu.fcm.wait_for(TOKEN, 1, timeout=5)
    assert received["message"] == {
        "token": TOKEN,
        "notification": {"body": "success"},
        "data": DATA,
        "android": {"priority": "high", "collapse_key": CALENDAR, "ttl": "3600s"},
    }


@pytest.mark.gen_test(timeout=15)
async def test_make_sender_picks_the_backend(emu, senders):
    assert isinstance(senders("firebase-admin", emu), FirebaseAdminSender)
    assert isinstance(senders("pyfcm", emu), PyFcmSender)
    with pytest.raises(ValueError, match=r"fcm\.backend"):
        senders("apns", emu)


# -- each outcome kind, both backends ------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_unregistered_token(backend, emu, senders):
    emu.fcm.set_state(TOKEN, "unregistered")
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.status, outcome.code) == ("unregistered", 404, "UNREGISTERED")
    assert outcome.error == "Requested entity was not found."


@pytest.mark.gen_test(timeout=15)
async def test_invalid_registration_token_counts_as_unregistered(backend, emu, senders):
    emu.fcm.set_state(TOKEN, "invalid")
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.status) == ("unregistered", 400)
    assert outcome.error == "The registration token is not a valid FCM registration token"


@pytest.mark.gen_test(timeout=15)
async def test_sender_id_mismatch(backend, emu, senders):
    emu.fcm.set_state(TOKEN, "sender_id_mismatch")
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.status, outcome.code) == (
        "sender_mismatch",
        403,
        "SENDER_ID_MISMATCH",
    )


@pytest.mark.gen_test(timeout=15)
async def test_quota_exceeded_is_retry_with_retry_after_and_one_request(backend, emu, senders):
    emu.fcm.fail(TOKEN, 429, retry_after=7)
    started = time.monotonic()
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.retry_after, outcome.code) == ("retry", 7.0, "QUOTA_EXCEEDED")
    assert emu.fcm.attempts(TOKEN) == 1
    assert time.monotonic() - started < 5  # neither library slept on the Retry-After


@pytest.mark.gen_test(timeout=15)
async def test_retry_after_as_an_http_date(backend, emu, senders):
    clock = ManualClock(start=1_800_000_000.0)
    emu.fcm.fail(TOKEN, 429, retry_after=email.utils.formatdate(clock.now() + 120, usegmt=True))
    outcome = await send(senders(backend, emu, clock=clock))
    assert (outcome.kind, outcome.retry_after) == ("retry", 120.0)


@pytest.mark.gen_test(timeout=15)
async def test_unavailable_is_retry_after_exactly_one_request(backend, emu, senders):
    # firebase-admin would retry a 503 four times on its own (with backoff): this is the
    # test of the hook that switches that off. The second send shows the 503 was used up.
    emu.fcm.fail(TOKEN, 503)
    sender = senders(backend, emu)
    outcome = await send(sender)
    assert (outcome.kind, outcome.status, outcome.code) == ("retry", 503, "UNAVAILABLE")
    assert outcome.retry_after is None
    assert emu.fcm.attempts(TOKEN) == 1
    assert emu.fcm.messages(TOKEN) == []
    assert (await send(sender)).kind == "sent"
    assert emu.fcm.attempts(TOKEN) == 2


@pytest.mark.gen_test(timeout=15)
async def test_internal_is_retry_after_one_request(backend, emu, senders):
    emu.fcm.fail(TOKEN, 500)
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.status, outcome.code) == ("retry", 500, "INTERNAL")
    assert emu.fcm.attempts(TOKEN) == 1


@pytest.mark.gen_test(timeout=15)
async def test_other_400_is_fatal_with_fcms_message(backend, emu, senders):
    # The sender does not police the size (the service does): FCM refuses it.
    too_big = {**DATA, "event_ids": "x" * 5000}
    outcome = await senders(backend, emu).send(TOKEN, too_big, CALENDAR, 3600)
    assert (outcome.kind, outcome.status) == ("fatal", 400)
    assert outcome.error == "Android message is too big"


@pytest.mark.gen_test(timeout=15)
async def test_wrong_project_is_a_project_refusal_not_a_token_drop(backend, emu, senders):
    outcome = await send(senders(backend, emu, project="not-our-project"))
    assert (outcome.kind, outcome.status, outcome.code) == (
        "project_refused",
        403,
        "PERMISSION_DENIED",
    )
    assert "cloudmessaging.messages.create" in (outcome.error or "")


@pytest.mark.gen_test(timeout=15)
async def test_fcm_api_disabled_is_a_project_refusal_with_fcms_message(backend, emu, senders):
    emu.fcm.fail(None, 403)
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.status, outcome.code) == (
        "project_refused",
        403,
        "PERMISSION_DENIED",
    )
    assert (outcome.error or "").startswith("Firebase Cloud Messaging API has not been used")
    assert emu.fcm.attempts(TOKEN) == 1


@pytest.mark.gen_test(timeout=15)
async def test_an_unknown_endpoint_is_a_project_refusal(backend, emu, senders):
    emu.fcm.fail(None, 404)  # Google's front end: an HTML page, no FCM error at all
    outcome = await send(senders(backend, emu))
    assert (outcome.kind, outcome.status, outcome.code) == ("project_refused", 404, None)
    assert "fcm.endpoint" in (outcome.error or "")


@pytest.mark.gen_test(timeout=15)
async def test_timeout_needs_real_timeout(backend, emu, senders):
    """A real 0.2 s timeout: the emulator holds the answer past attempt_timeout."""
    sender = senders(backend, emu, attempt_timeout=0.2)
    await sender.check()  # the token first, so that the 0.2 s are the send's
    emu.fcm.hold_answers(TOKEN)
    outcome = await send(sender)
    assert outcome.kind == "retry", outcome
    assert outcome.status is None
    emu.fcm.release()
    # FCM got the request all the same: a timed-out send may still be delivered.
    await emu.fcm.wait_for(TOKEN, 1, timeout=5)


@pytest.mark.gen_test(timeout=15)
async def test_connection_refused_is_retry(backend, emu, senders):
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    sender = senders(backend, emu, endpoint=f"http://127.0.0.1:{port}")
    outcome = await send(sender)
    assert outcome.kind == "retry"
    assert outcome.status is None


# -- tokens ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_token_is_fetched_off_the_loop_before_the_first_send(backend, emu, senders):
    # The emulator is served by this very loop: a token refresh made on the loop (as
    # firebase-admin's auth flow would do) could never be answered, and this would hang
    # (until google-auth's own 120 s timeout; the loop is blocked, so gen_test's cannot fire).
    sender = senders(backend, emu)
    await sender.check()
    assert emu.oauth.tokens_issued == 1
    assert emu.fcm.requests == 0
    assert (await send(sender)).kind == "sent"
    assert (await send(sender)).kind == "sent"
    assert emu.oauth.tokens_issued == 1


@pytest.mark.gen_test(timeout=15)
async def test_first_send_without_check_gets_its_token(backend, emu, senders):
    outcome = await send(senders(backend, emu))
    assert outcome.kind == "sent"
    assert emu.oauth.tokens_issued == 1


@pytest.mark.gen_test(timeout=15)
async def test_token_near_expiry_is_refreshed_before_the_send(backend, emu, senders):
    # A margin longer than the token's life: every send finds its token about to expire.
    sender = senders(backend, emu, refresh_margin=7200)
    for expected in (1, 2):
        assert (await send(sender)).kind == "sent"
        assert emu.oauth.tokens_issued == expected


@pytest.mark.gen_test(timeout=15)
async def test_refused_token_is_retry_then_refreshed_off_the_loop(backend, emu, senders):
    sender = senders(backend, emu)
    assert (await send(sender)).kind == "sent"
    emu.oauth.expire_tokens()
    outcome = await send(sender)
    assert (outcome.kind, outcome.status) == ("retry", 401)
    assert emu.oauth.tokens_issued == 1  # no refresh inside the library, on the loop
    assert (await send(sender)).kind == "sent"
    assert emu.oauth.tokens_issued == 2


@pytest.mark.gen_test(timeout=15)
async def test_check_names_the_reason_and_send_retries(backend, start_emulator, senders, tmp_path):
    emu = start_emulator()
    stranger = str(tmp_path / "unknown-key.json")
    write_service_account(
        stranger,
        token_uri=f"{emu.base_url}/token",
        client_email="stranger@mrm-push-test.iam.gserviceaccount.com",
        project_id=PROJECT,
    )
    emu.key_file = stranger  # a key the OAuth emulator does not know
    sender = senders(backend, emu)
    with pytest.raises(NotReady, match="could not get an access token"):
        await sender.check()
    outcome = await send(sender)
    assert outcome.kind == "retry"
    assert emu.fcm.requests == 0


@pytest.mark.gen_test(timeout=15)
async def test_missing_key_file(backend, emu, senders, tmp_path):
    emu.key_file = str(tmp_path / "nowhere.json")
    sender = senders(backend, emu)
    with pytest.raises(Exception):  # noqa: B017 - whatever the library raises for it
        await sender.start()
    with pytest.raises(NotReady, match="could not"):
        await sender.check()
    assert (await send(sender)).kind == "retry"


# -- several senders -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_sends_share_one_token(backend, emu, senders):
    sender = senders(backend, emu)
    tokens = [f"{TOKEN}-{n}" for n in range(8)]
    outcomes = await asyncio.gather(*(sender.send(t, DATA, CALENDAR, 60) for t in tokens))
    assert [o.kind for o in outcomes] == ["sent"] * len(tokens)
    assert emu.oauth.tokens_issued == 1
    assert all(len(emu.fcm.messages(t)) == 1 for t in tokens)


@pytest.mark.gen_test(timeout=20)
async def test_two_senders_in_one_process_keep_their_own_apps(backend, start_emulator, senders):
    first, second = start_emulator("project-one"), start_emulator("project-two")
    one, two = senders(backend, first), senders(backend, second)
    assert (await send(one)).kind == "sent"
    assert (await send(two)).kind == "sent"
    assert len(first.fcm.messages(TOKEN)) == 1
    assert len(second.fcm.messages(TOKEN)) == 1
    await one.close()
    assert (await send(two)).kind == "sent"
    assert len(second.fcm.messages(TOKEN)) == 2
    assert len(first.fcm.messages(TOKEN)) == 1


# -- pyfcm's threads ---------------------------------------------------------------


@pytest.fixture
def pools(io_loop, start_emulator):
    """Small thread pools for one sender each; shut down after the test (after the senders,
    which a later fixture closes first: the FCM and OAuth holds are released here too)."""
    made: list[ThreadPoolExecutor] = []

    def make(threads: int) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(threads)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.shutdown(wait=True)


async def idle(pool: ThreadPoolExecutor) -> None:
    """Return once every job handed to this one-thread pool so far has ended (FIFO)."""
    await asyncio.get_running_loop().run_in_executor(pool, lambda: None)


@pytest.mark.gen_test(timeout=15)
async def test_pyfcm_attempts_queued_for_a_thread_are_not_timed_meanwhile(emu, senders, pools):
    """Four attempts, two threads, FCM holding its answers past attempt_timeout: the first two
    time out on their own requests; the other two, which waited for a thread all that time,
    are sent and answered in full, not given up unsent."""
    sender = senders("pyfcm", emu, attempt_timeout=1.0, executor=pools(2), threads=2)
    await sender.check()  # the token first: the threads only send
    emu.fcm.hold_answers()
    tokens = [f"{TOKEN}-{i}" for i in range(4)]
    sends = [asyncio.ensure_future(sender.send(t, DATA, CALENDAR, 3600)) for t in tokens]
    try:
        first = await asyncio.gather(*sends[:2])
        assert [o.kind for o in first] == ["retry", "retry"]
        assert all("timed out" in (o.error or "") for o in first), first
        for token in tokens[2:]:
            await emu.fcm.wait_for_attempts(token, 1)
        emu.fcm.release()
        later = await asyncio.gather(*sends[2:])
        assert [o.kind for o in later] == ["sent", "sent"], later
    finally:
        emu.fcm.release()
    assert emu.fcm.requests == 4
    assert sender.max_in_flight == 2  # what the worker claims at once for this sender


@pytest.mark.gen_test(timeout=15)
async def test_pyfcm_never_sends_for_an_attempt_given_up(start_emulator, senders, pools):
    """The worker gives up on an attempt (its guard, or a stop) while the thread still fetches
    the token: the thread must not send it afterwards (that would be a duplicate of the
    attempt the worker makes next)."""
    emu = start_emulator()
    pool = pools(1)
    # No check(): the send fetches the token.
    sender = senders("pyfcm", emu, executor=pool, threads=1)
    emu.oauth.hold()
    try:
        sending = asyncio.ensure_future(sender.send(TOKEN, DATA, CALENDAR, 3600))
        await emu.oauth.wait_held(1)  # the thread is inside the token request
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
    finally:
        emu.oauth.release()
    await idle(pool)
    assert emu.fcm.attempts(TOKEN) == 0
    # Its thread came back: the next attempt goes as usual.
    assert (await sender.send(TOKEN, DATA, CALENDAR, 3600)).kind == "sent"
    assert emu.fcm.attempts(TOKEN) == 1


@pytest.mark.gen_test(timeout=15)
async def test_pyfcm_token_refresh_is_bounded_and_never_followed_by_a_late_send(
    start_emulator, senders, pools
):
    """The token endpoint hangs: the attempt ends as a retry within attempt_timeout, and the
    thread does not send once the token comes after all."""
    emu = start_emulator()
    pool = pools(1)
    sender = senders("pyfcm", emu, attempt_timeout=0.3, executor=pool, threads=1)
    emu.oauth.hold()
    try:
        outcome = await send(sender)
        assert outcome.kind == "retry", outcome
    finally:
        emu.oauth.release()
    await idle(pool)
    assert emu.fcm.attempts(TOKEN) == 0


# -- classification without HTTP -----------------------------------------------------


def error_body(code, status, message, *details):
    return json.dumps(
        {"error": {"code": code, "status": status, "message": message, "details": list(details)}}
    )


FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def test_only_fcms_error_code_drops_a_token():
    # A bare 404 or 403 (a proxy, a wrong path, the API disabled) must not wipe tablets: it
    # holds FCM deliveries instead (pyfcm's path: classify() sees the raw answer).
    html_404 = classify(404, "<html>Not Found</html>", None, token=TOKEN, now=0)
    assert (html_404.kind, html_404.status, html_404.code) == ("project_refused", 404, None)
    assert "fcm.endpoint" in (html_404.error or "")
    bare_403 = error_body(403, "PERMISSION_DENIED", "The caller does not have permission")
    assert classify(403, bare_403, None, token=TOKEN, now=0) == SendOutcome(
        "project_refused",
        error="The caller does not have permission",
        status=403,
        code="PERMISSION_DENIED",
    )
    disabled = error_body(
        403,
        "PERMISSION_DENIED",
        "Firebase Cloud Messaging API has not been used in project 1234 before",
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED"},
    )
    assert classify(403, disabled, None, token=TOKEN, now=0).kind == "project_refused"
    json_404 = error_body(404, "NOT_FOUND", "Requested entity was not found.")
    assert classify(404, json_404, None, token=TOKEN, now=0).kind == "project_refused"
    # With FCM's own errorCode they are about the token.
    unregistered = error_body(
        404,
        "NOT_FOUND",
        "Requested entity was not found.",
        {"@type": FCM_ERROR, "errorCode": "UNREGISTERED"},
    )
    assert classify(404, unregistered, None, token=TOKEN, now=0).kind == "unregistered"
    mismatch = error_body(
        403,
        "PERMISSION_DENIED",
        "SenderId mismatch",
        {"@type": FCM_ERROR, "errorCode": "SENDER_ID_MISMATCH"},
    )
    assert classify(403, mismatch, None, token=TOKEN, now=0).kind == "sender_mismatch"
    # Another 4xx without an errorCode is still the message's fault: failed at once.
    assert classify(413, "too large", None, token=TOKEN, now=0).kind == "fatal"


def test_invalid_argument_naming_the_token_field():
    body = error_body(
        400,
        "INVALID_ARGUMENT",
        "Invalid value",
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.token", "description": "Invalid value"}],
        },
    )
    assert classify(400, body, None, token=TOKEN, now=0).kind == "unregistered"


def test_auth_answers():
    plain_401 = error_body(401, "UNAUTHENTICATED", "Request had invalid authentication")
    assert classify(401, plain_401, None, token=TOKEN, now=0).kind == "retry"
    apns = error_body(
        401,
        "UNAUTHENTICATED",
        "Auth error from APNS or Web Push Service",
        {
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": "THIRD_PARTY_AUTH_ERROR",
        },
    )
    assert classify(401, apns, None, token=TOKEN, now=0).kind == "fatal"


def test_gateway_errors_are_retried():
    assert classify(502, "Bad Gateway", "3", token=TOKEN, now=0) == SendOutcome(
        "retry", retry_after=3.0, error="HTTP 502", status=502, code=None
    )


def test_the_whole_token_never_appears_in_an_error():
    body = error_body(400, "INVALID_ARGUMENT", f"Bad token {TOKEN}")
    outcome = classify(400, body, None, token=TOKEN, now=0)
    assert TOKEN not in (outcome.error or "")
    assert TOKEN[-8:] in (outcome.error or "")
    assert shorten("abc", "abc") == "abc"
