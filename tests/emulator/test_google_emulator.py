"""The OAuth and Google Calendar emulator over real HTTP: Google's wire format and behaviour."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import google.auth.crypt
import google.auth.jwt
import pytest
import tornado.httpclient
import tornado.testing
import tornado.web
from cryptography.hazmat.primitives import serialization

from daemon.clock import ManualClock, SystemClock
from daemon.emulator.app import Emulator, OffsetClock
from daemon.emulator.keys import public_key_pem, write_service_account
from daemon.emulator.oauth import Grant

CAL = "room-1@resource.calendar.google.com"
SCOPE = "https://www.googleapis.com/auth/calendar.readonly"
EMAIL = "svc@emu.iam.gserviceaccount.com"
GOOGLE_AUD = "https://oauth2.googleapis.com/token"


@dataclass
class Receiver:
    """A service's webhook endpoint: records each call, answers the scripted statuses."""

    emu: Emulator
    answers: list[int] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


class ReceiverHandler(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def post(self) -> None:
        self.receiver.seen.append(
            {
                "headers": dict(self.request.headers),
                "body": self.request.body,
                "watch_in_flight": self.receiver.emu.google.in_flight,
            }
        )
        self.set_status(self.receiver.answers.pop(0) if self.receiver.answers else 200)


@pytest.fixture(scope="module")
def key_info(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "key.json"
    return write_service_account(
        path, token_uri="http://unused/token", client_email=EMAIL, project_id="emu"
    )


@pytest.fixture
def emu(io_loop, key_info):
    emulator = Emulator(ManualClock())
    emulator.start()
    emulator.oauth.register(key_info)
    yield emulator
    emulator.stop()


@pytest.fixture
def receiver(emu):
    rec = Receiver(emu)
    app = tornado.web.Application([(r"/hook", ReceiverHandler, {"receiver": rec})])
    server = app.listen(0, "127.0.0.1")
    port = next(iter(server._sockets.values())).getsockname()[1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    server.stop()


def bearer(emu: Emulator, *scopes: str) -> str:
    grant = Grant(EMAIL, frozenset(scopes or (SCOPE,)), None, time.time() + 3600)
    return "Bearer " + emu.oauth.issue(grant)


async def call(
    emu: Emulator,
    method: str,
    path: str,
    body: Any = None,
    *,
    auth: str | None = "default",
    form: dict[str, str] | None = None,
) -> tuple[int, Any, tornado.httpclient.HTTPResponse]:
    headers = {}
    if auth == "default":
        auth = bearer(emu)
    if auth:
        headers["Authorization"] = auth
    data: bytes | None = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None or method in ("POST", "PATCH", "PUT"):
        data = json.dumps(body if body is not None else {}).encode()
        headers["Content-Type"] = "application/json"
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(
        emu.base_url + path,
        method=method,
        headers=headers,
        body=data,
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    parsed = json.loads(response.body) if response.body else None
    return response.code, parsed, response


def quoted(calendar_id: str) -> str:
    return urllib.parse.quote(calendar_id, safe="")


async def watch(emu: Emulator, receiver: Receiver, channel_id: str = "chan-1", **extra: Any):
    body = {"id": channel_id, "type": "web_hook", "address": receiver.url, **extra}
    return await call(emu, "POST", f"/calendar/v3/calendars/{quoted(CAL)}/events/watch", body)


def hooks(receiver: Receiver, channel_id: str | None = None) -> list[dict[str, str]]:
    return [
        s["headers"]
        for s in receiver.seen
        if channel_id is None or s["headers"]["X-Goog-Channel-Id"] == channel_id
    ]


# -- keys -------------------------------------------------------------------------


def test_key_file_is_private_and_complete(tmp_path):
    path = tmp_path / "key.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    info = write_service_account(
        path, token_uri="http://x/token", client_email=EMAIL, project_id="p"
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == info
    assert info["type"] == "service_account"
    assert info["token_uri"] == "http://x/token"
    for name in ("project_id", "private_key_id", "client_id", "auth_uri", "client_email"):
        assert info[name]
    private = serialization.load_pem_private_key(info["private_key"].encode(), None)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_pem(info) == public.decode()


# -- OAuth --------------------------------------------------------------------------


def assertion(
    info: dict[str, Any], signer_info: dict[str, Any] | None = None, **claims: Any
) -> str:
    now = int(time.time())
    payload = {"iss": info["client_email"], "aud": GOOGLE_AUD, "iat": now, "exp": now + 3600}
    payload["scope"] = SCOPE
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    signer = google.auth.crypt.RSASigner.from_service_account_info(signer_info or info)
    if signer_info is not None:  # same kid as the real key, other private key
        signer._key_id = info["private_key_id"]
    return google.auth.jwt.encode(signer, payload).decode()


async def token_request(emu: Emulator, jwt: str, grant_type: str | None = None):
    form = {
        "grant_type": grant_type or "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": jwt,
    }
    return await call(emu, "POST", "/token", auth=None, form=form)


@pytest.mark.gen_test(timeout=10)
async def test_token_for_a_signed_assertion(emu, key_info):
    status, body, _ = await token_request(emu, assertion(key_info, sub="user@example.com"))
    assert status == 200
    assert body["expires_in"] == 3600 and body["token_type"] == "Bearer"
    header = "Bearer " + body["access_token"]
    assert emu.oauth.verify(header, SCOPE)
    assert not emu.oauth.verify(header, "https://www.googleapis.com/auth/firebase.messaging")
    assert emu.oauth.grant(header).subject == "user@example.com"
    assert emu.oauth.tokens_issued == 1
    assert not emu.oauth.verify(None, SCOPE)
    assert not emu.oauth.verify("Bearer nope", SCOPE)


@pytest.mark.gen_test(timeout=10)
async def test_cloud_platform_scope_covers_everything(emu, key_info):
    scopes = "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/firebase.messaging"
    _, body, _ = await token_request(emu, assertion(key_info, scope=scopes))
    header = "Bearer " + body["access_token"]
    assert emu.oauth.verify(header, "https://www.googleapis.com/auth/firebase.messaging")
    assert emu.oauth.verify(header, SCOPE)


@pytest.mark.gen_test(timeout=10)
async def test_own_token_url_is_a_valid_audience(emu, key_info):
    status, _, _ = await token_request(emu, assertion(key_info, aud=emu.token_url))
    assert status == 200


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unregistered", "invalid_grant"),
        ("bad_signature", "invalid_grant"),
        ("unknown_kid", "invalid_grant"),
        ("wrong_audience", "invalid_grant"),
        ("expired", "invalid_grant"),
        ("too_long", "invalid_grant"),
        ("no_scope", "invalid_scope"),
        ("garbage", "invalid_grant"),
        ("grant_type", "unsupported_grant_type"),
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_bad_assertions_are_refused_like_google(emu, key_info, tmp_path, case, error):
    now = int(time.time())
    grant_type = None
    if case in ("unregistered", "bad_signature"):
        other = write_service_account(
            tmp_path / "other.json", token_uri="x", client_email="other@x.com", project_id="p"
        )
        jwt = assertion(other) if case == "unregistered" else assertion(key_info, signer_info=other)
    elif case == "unknown_kid":
        other = dict(key_info, private_key_id="0" * 40)
        jwt = assertion(other)
    elif case == "wrong_audience":
        jwt = assertion(key_info, aud="https://example.com/token")
    elif case == "expired":
        jwt = assertion(key_info, iat=now - 4000, exp=now - 400)
    elif case == "too_long":
        jwt = assertion(key_info, exp=now + 7200)
    elif case == "no_scope":
        jwt = assertion(key_info, scope=None)
    elif case == "garbage":
        jwt = "not.a.jwt"
    else:
        jwt, grant_type = assertion(key_info), "client_credentials"
    status, body, _ = await token_request(emu, jwt, grant_type)
    assert status == 400
    assert body["error"] == error
    assert body["error_description"]
    assert emu.oauth.tokens_issued == 0


@pytest.mark.gen_test(timeout=10)
async def test_real_clock_skew_is_tolerated(emu, key_info):
    now = int(time.time())
    status, _, _ = await token_request(emu, assertion(key_info, iat=now - 3600, exp=now - 30))
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_token_endpoint_failure_injection(emu, key_info):
    emu.oauth.fail_next(1, "server_error", "try later", status=503)
    status, body, _ = await token_request(emu, assertion(key_info))
    assert (status, body["error"]) == (503, "server_error")
    status, _, _ = await token_request(emu, assertion(key_info))
    assert status == 200


# -- Calendar API: auth and error shapes -----------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_calendar_needs_a_token_with_a_calendar_scope(emu):
    path = f"/calendar/v3/calendars/{quoted(CAL)}/events"
    status, body, response = await call(emu, "GET", path, auth=None)
    assert status == 401
    assert body["error"]["status"] == "UNAUTHENTICATED"
    assert body["error"]["errors"][0]["reason"] == "authError"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await call(
        emu, "GET", path, auth=bearer(emu, "https://www.googleapis.com/auth/gmail")
    )
    assert status == 403
    assert body["error"]["errors"][0]["reason"] == "insufficientPermissions"
    status, _, _ = await call(
        emu, "GET", path, auth=bearer(emu, "https://www.googleapis.com/auth/cloud-platform")
    )
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_error_bodies_are_google_shaped(emu):
    emu.google.inject("list", status=403, reason="rateLimitExceeded")
    status, body, _ = await call(emu, "GET", f"/calendar/v3/calendars/{quoted(CAL)}/events")
    assert status == 403
    assert body == {
        "error": {
            "code": 403,
            "message": "Rate Limit Exceeded",
            "errors": [
                {
                    "domain": "usageLimits",
                    "reason": "rateLimitExceeded",
                    "message": "Rate Limit Exceeded",
                }
            ],
            "status": "PERMISSION_DENIED",
        }
    }
    status, body, _ = await call(
        emu, "GET", f"/calendar/v3/calendars/{quoted(CAL)}/events?syncToken=unknown"
    )
    assert status == 410
    message = "Sync token is no longer valid, a full sync is required."
    assert body["error"]["code"] == 410
    assert body["error"]["message"] == message
    assert body["error"]["errors"][0] == {
        "domain": "global",
        "reason": "fullSyncRequired",
        "message": message,
        "locationType": "parameter",
        "location": "syncToken",
    }


@pytest.mark.gen_test(timeout=10)
async def test_injected_failures_count_and_target_one_calendar(emu):
    emu.google.inject("list", count=2, status=500, calendar_id=CAL)
    other = f"/calendar/v3/calendars/{quoted('other@x.com')}/events"
    mine = f"/calendar/v3/calendars/{quoted(CAL)}/events"
    assert (await call(emu, "GET", other))[0] == 200
    assert (await call(emu, "GET", mine))[0] == 500
    assert (await call(emu, "GET", mine))[1]["error"]["errors"][0]["reason"] == "backendError"
    assert (await call(emu, "GET", mine))[0] == 200
    with pytest.raises(ValueError):
        emu.google.inject("delete")
    with pytest.raises(ValueError):
        emu.google.inject("list", reason="madeUp")


# -- events.list ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_pages_carry_the_sync_token_only_on_the_last(emu):
    for n in range(7):
        emu.google.insert_event(CAL, summary=f"m{n}")
    path = f"/calendar/v3/calendars/{quoted(CAL)}/events?maxResults=3"
    pages = []
    token = None
    while True:
        status, page, _ = await call(
            emu, "GET", path + (f"&pageToken={quoted(token)}" if token else "")
        )
        assert status == 200
        pages.append(page)
        token = page.get("nextPageToken")
        if not token:
            break
    assert [len(p["items"]) for p in pages] == [3, 3, 1]
    assert ["nextSyncToken" in p for p in pages] == [False, False, True]
    assert ["nextPageToken" in p for p in pages] == [True, True, False]
    assert pages[0]["kind"] == "calendar#events"
    event = pages[0]["items"][0]
    assert set(event) >= {"id", "status", "updated", "start", "end", "summary", "etag"}
    assert event["updated"] == "2027-01-15T08:00:00.000Z"  # the emulator's clock

    emu.google.page_size = 2  # a server-side page below maxResults, as Google may do
    status, page, _ = await call(emu, "GET", path)
    assert len(page["items"]) == 2 and "nextPageToken" in page


@pytest.mark.gen_test(timeout=10)
async def test_fields_select_what_a_page_carries(emu):
    """Google's partial response: only the fields named, a page without them is empty."""
    for n in range(3):
        emu.google.insert_event(CAL, summary=f"m{n}")
    base = f"/calendar/v3/calendars/{quoted(CAL)}/events?maxResults=2&fields="
    _, first, _ = await call(emu, "GET", base + quoted("nextPageToken,nextSyncToken"))
    assert list(first) == ["nextPageToken"]
    page = f"&pageToken={quoted(first['nextPageToken'])}"
    _, last, _ = await call(emu, "GET", base + quoted("nextPageToken,nextSyncToken") + page)
    assert list(last) == ["nextSyncToken"]
    _, items, _ = await call(emu, "GET", base + quoted("items(id,summary),nextPageToken"))
    assert sorted(items) == ["items", "nextPageToken"]
    assert [e["summary"] for e in items["items"]] == ["m0", "m1"]
    _, none, _ = await call(emu, "GET", base + "etag")
    assert sorted(none) == ["etag"]


@pytest.mark.gen_test(timeout=10)
async def test_list_parameters_are_checked(emu):
    base = f"/calendar/v3/calendars/{quoted(CAL)}/events"
    _, first, _ = await call(emu, "GET", base)
    sync = quoted(first["nextSyncToken"])
    assert (await call(emu, "GET", f"{base}?syncToken={sync}&timeMin=2027-01-01T00:00:00Z"))[
        0
    ] == 400
    assert (await call(emu, "GET", f"{base}?maxResults=0"))[0] == 400
    assert (await call(emu, "GET", f"{base}?pageToken=nope"))[0] == 400
    assert (await call(emu, "GET", f"{base}?maxResults=100000"))[0] == 200


@pytest.mark.gen_test(timeout=10)
async def test_full_list_shows_cancelled_only_when_asked(emu):
    kept = emu.google.insert_event(CAL, summary="kept")
    gone = emu.google.insert_event(CAL, summary="gone")
    emu.google.cancel_event(CAL, gone["id"])
    base = f"/calendar/v3/calendars/{quoted(CAL)}/events"
    _, plain, _ = await call(emu, "GET", base)
    _, deleted, _ = await call(emu, "GET", base + "?showDeleted=true")
    assert [e["id"] for e in plain["items"]] == [kept["id"]]
    assert [e["id"] for e in deleted["items"]] == [kept["id"], gone["id"]]


# -- watch and stop ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_watch_answer_and_stop(emu, receiver):
    status, channel, _ = await watch(emu, receiver, token="tok", params={"ttl": "3600"})
    assert status == 200
    assert channel == {
        "kind": "api#channel",
        "id": "chan-1",
        "resourceId": emu.google.calendar(CAL).resource_id,
        "resourceUri": f"https://www.googleapis.com/calendar/v3/calendars/{quoted(CAL)}/events?alt=json",
        "token": "tok",
        "expiration": str(int((emu.clock.now() + 3600) * 1000)),
    }
    stop = {"id": "chan-1", "resourceId": channel["resourceId"]}
    status, body, _ = await call(emu, "POST", "/calendar/v3/channels/stop", stop)
    assert (status, body) == (204, None)
    status, body, _ = await call(emu, "POST", "/calendar/v3/channels/stop", dict(stop, id="x"))
    assert status == 404 and body["error"]["errors"][0]["reason"] == "notFound"


@pytest.mark.parametrize(
    "bad",
    [
        {"id": None},
        {"id": "has space"},
        {"type": "email"},
        {"address": "ftp://x"},
        {"token": "t" * 257},
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_watch_bodies_are_checked(emu, receiver, bad):
    body = {"id": "chan-1", "type": "web_hook", "address": receiver.url, **bad}
    body = {k: v for k, v in body.items() if v is not None}
    status, answer, _ = await call(
        emu, "POST", f"/calendar/v3/calendars/{quoted(CAL)}/events/watch", body
    )
    assert status == 400
    assert answer["error"]["code"] == 400
    assert emu.google.channels() == []


@pytest.mark.gen_test(timeout=10)
async def test_late_watch_still_makes_the_channel(emu, receiver):
    release = asyncio.Event()
    held = emu.google.inject("watch", hold=release)  # held, then success: a late answer
    watching = asyncio.ensure_future(watch(emu, receiver))
    await held.taken.wait()
    assert emu.google.channels() == [] and not watching.done()  # nothing until let go
    release.set()
    status, _channel, _ = await watching
    assert status == 200
    assert emu.google.channels()[0]["state"] == "live"


@pytest.mark.gen_test(timeout=10)
async def test_a_delay_without_an_error_over_the_control_api_is_a_late_answer(emu, receiver):
    failure = {"method": "watch", "delay": 0.01}  # any delay: nothing here depends on its length
    assert (await call(emu, "POST", "/emulator/google/failures", failure, auth=None))[0] == 204
    status, _channel, _ = await watch(emu, receiver)
    assert status == 200
    assert emu.google.channels()[0]["state"] == "live"
    assert emu.google.calls == [("watch", CAL, 200)]


@pytest.mark.gen_test(timeout=10)
async def test_unknown_calendar_without_auto_create(emu, receiver):
    emu.google.auto_create = False
    status, body, _ = await watch(emu, receiver)
    assert status == 404 and body["error"]["status"] == "NOT_FOUND"
    emu.google.create_calendar(CAL)
    assert (await watch(emu, receiver))[0] == 200


# -- webhook calls -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_sync_then_exists_with_every_header(emu, receiver):
    _status, channel, _ = await watch(emu, receiver, token="tok")
    assert receiver.seen[0]["watch_in_flight"] == 1  # the sync came before the answer
    for n in range(5):
        emu.google.insert_event(CAL, summary=str(n))
    await emu.google.drain()
    seen = hooks(receiver)
    assert [h["X-Goog-Resource-State"] for h in seen] == ["sync"] + ["exists"] * 5
    numbers = [int(h["X-Goog-Message-Number"]) for h in seen]
    assert numbers[0] == 1
    assert numbers == sorted(set(numbers))
    assert any(b - a > 1 for a, b in itertools.pairwise(numbers))  # not consecutive
    expiration = email.utils.formatdate(int(channel["expiration"]) / 1000, usegmt=True)
    for h in seen:
        assert h["X-Goog-Channel-Id"] == "chan-1"
        assert h["X-Goog-Resource-Id"] == channel["resourceId"]
        assert h["X-Goog-Resource-Uri"] == channel["resourceUri"]
        assert h["X-Goog-Channel-Token"] == "tok"
        assert h["X-Goog-Channel-Expiration"] == expiration
        assert h["Content-Length"] == "0"
    assert all(s["body"] == b"" for s in receiver.seen)


@pytest.mark.gen_test(timeout=10)
async def test_sync_after_the_answer_still_comes_first(emu, receiver):
    emu.google.sync_before_answer = False
    await watch(emu, receiver)
    emu.google.insert_event(CAL)
    await emu.google.drain()
    assert receiver.seen[0]["watch_in_flight"] == 0  # the answer was written first
    assert [h["X-Goog-Resource-State"] for h in hooks(receiver)] == ["sync", "exists"]
    assert "X-Goog-Channel-Token" not in receiver.seen[0]["headers"]


@pytest.mark.gen_test(timeout=10)
async def test_each_live_channel_of_the_calendar_hears(emu, receiver):
    await watch(emu, receiver, "a")
    await watch(emu, receiver, "b")
    body = {"id": "c", "type": "web_hook", "address": receiver.url}
    await call(emu, "POST", f"/calendar/v3/calendars/{quoted('other@x.com')}/events/watch", body)
    emu.google.insert_event(CAL)
    await emu.google.drain()
    exists = [
        h["X-Goog-Channel-Id"] for h in hooks(receiver) if h["X-Goog-Resource-State"] == "exists"
    ]
    assert sorted(exists) == ["a", "b"]


@pytest.mark.gen_test(timeout=10)
async def test_retries_on_5xx_then_success(emu, receiver):
    await watch(emu, receiver)
    receiver.answers = [503, 502, 200]
    emu.google.insert_event(CAL)
    await emu.google.drain()
    attempts = [a for a in emu.google.webhooks if a.state == "exists"]
    assert [(a.attempt, a.status) for a in attempts] == [(1, 503), (2, 502), (3, 200)]
    assert len({a.message_number for a in attempts}) == 1


@pytest.mark.gen_test(timeout=10)
async def test_retries_stop_after_a_few(emu, receiver):
    await watch(emu, receiver)
    receiver.answers = [500] * 10
    emu.google.insert_event(CAL)
    await emu.google.drain()
    attempts = [a for a in emu.google.webhooks if a.state == "exists"]
    assert len(attempts) == len(emu.google.retry_delays) + 1


@pytest.mark.parametrize("status", [400, 403, 404])
@pytest.mark.gen_test(timeout=10)
async def test_no_retry_on_4xx(emu, receiver, status):
    await watch(emu, receiver)
    receiver.answers = [status]
    emu.google.insert_event(CAL)
    await emu.google.drain()
    attempts = [a for a in emu.google.webhooks if a.state == "exists"]
    assert [(a.attempt, a.status) for a in attempts] == [(1, status)]


@pytest.mark.gen_test(timeout=10)
async def test_unreachable_address_is_retried(emu, receiver):
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    body = {"id": "gone", "type": "web_hook", "address": f"http://127.0.0.1:{port}/hook"}
    status, _, _ = await call(
        emu, "POST", f"/calendar/v3/calendars/{quoted(CAL)}/events/watch", body
    )
    assert status == 200  # Google answers the watch whatever became of the sync
    await emu.google.drain()
    assert [a.status for a in emu.google.webhooks] == [None] * (len(emu.google.retry_delays) + 1)
    assert emu.google.webhooks[0].error


@pytest.mark.gen_test(timeout=10)
async def test_expired_and_stopped_channels_hear_nothing(emu, receiver):
    _, _old, _ = await watch(emu, receiver, "old", params={"ttl": "100"})
    _, stopped, _ = await watch(emu, receiver, "stopped")
    await call(
        emu,
        "POST",
        "/calendar/v3/channels/stop",
        {"id": "stopped", "resourceId": stopped["resourceId"]},
    )
    emu.clock.advance(101)
    emu.google.insert_event(CAL)
    await emu.google.drain()
    assert [h["X-Goog-Resource-State"] for h in hooks(receiver)] == ["sync", "sync"]
    states = {c["id"]: c["state"] for c in emu.google.channels()}
    assert states == {"old": "expired", "stopped": "stopped"}


@pytest.mark.gen_test(timeout=10)
async def test_deleted_calendar_says_not_exists(emu, receiver):
    await watch(emu, receiver)
    emu.google.delete_calendar(CAL)
    await emu.google.drain()
    assert hooks(receiver)[-1]["X-Goog-Resource-State"] == "not_exists"
    status, _, _ = await watch(emu, receiver, "again")
    assert status == 404  # a deleted calendar stays missing, even with auto_create


# -- control API and clock -------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_control_api(emu, receiver):
    ctl = "/emulator/google"
    assert (await call(emu, "POST", f"{ctl}/calendars", {"id": CAL}, auth=None))[0] == 201
    assert (await call(emu, "GET", f"{ctl}/calendars", auth=None))[1] == {"calendars": [CAL]}
    await watch(emu, receiver)
    events = f"{ctl}/calendars/{quoted(CAL)}/events"
    status, event, _ = await call(
        emu,
        "POST",
        events,
        {"id": "ev1", "summary": "standup", "start": 1_800_003_600.0},
        auth=None,
    )
    assert status == 201
    assert event["start"] == {"dateTime": "2027-01-15T09:00:00.000Z"}
    status, event, _ = await call(emu, "PATCH", f"{events}/ev1", {"summary": "retro"}, auth=None)
    assert (status, event["summary"]) == (200, "retro")
    status, event, _ = await call(emu, "DELETE", f"{events}/ev1", auth=None)
    assert (status, event["status"]) == (200, "cancelled")
    assert (await call(emu, "PATCH", f"{events}/nope", {}, auth=None))[0] == 404
    assert (await call(emu, "GET", events, auth=None))[1]["items"][0]["status"] == "cancelled"

    _, listed, _ = await call(emu, "GET", f"/calendar/v3/calendars/{quoted(CAL)}/events")
    expire = f"{ctl}/calendars/{quoted(CAL)}/expire-sync-tokens"
    assert (await call(emu, "POST", expire, auth=None))[0] == 204
    sync = quoted(listed["nextSyncToken"])
    assert (
        await call(emu, "GET", f"/calendar/v3/calendars/{quoted(CAL)}/events?syncToken={sync}")
    )[0] == 410

    failure = {"method": "list", "status": 403, "reason": "forbidden", "count": 1}
    assert (await call(emu, "POST", f"{ctl}/failures", failure, auth=None))[0] == 204
    assert (await call(emu, "POST", f"{ctl}/failures", {"method": "nope"}, auth=None))[0] == 400
    assert (await call(emu, "DELETE", f"{ctl}/failures", auth=None))[0] == 204
    assert (await call(emu, "GET", f"/calendar/v3/calendars/{quoted(CAL)}/events"))[0] == 200

    await emu.google.drain()
    _, channels, _ = await call(emu, "GET", f"{ctl}/channels?calendar_id={quoted(CAL)}", auth=None)
    assert [(c["id"], c["state"]) for c in channels["channels"]] == [("chan-1", "live")]
    _, log, _ = await call(emu, "GET", f"{ctl}/webhooks", auth=None)
    assert [a["state"] for a in log["attempts"]] == ["sync", "exists", "exists", "exists"]

    _, settings, _ = await call(emu, "PATCH", f"{ctl}/settings", {"page_size": 5}, auth=None)
    assert settings["page_size"] == 5 and emu.google.page_size == 5
    assert (await call(emu, "PATCH", f"{ctl}/settings", {"nope": 1}, auth=None))[0] == 400

    assert (await call(emu, "DELETE", f"{ctl}/calendars/{quoted(CAL)}", auth=None))[0] == 204
    await emu.google.drain()


@pytest.mark.gen_test(timeout=10)
async def test_clock_control_moves_the_manual_clock(emu):
    status, body, _ = await call(emu, "POST", "/emulator/clock", {"advance": 90}, auth=None)
    assert status == 200
    assert emu.clock.now() == 1_800_000_090.0
    assert body == {"now": "2027-01-15T08:01:30.000Z", "epoch": 1_800_000_090.0}
    assert (await call(emu, "POST", "/emulator/clock", {"advance": -1}, auth=None))[0] == 400


@pytest.mark.gen_test(timeout=10)
async def test_clock_control_on_the_real_clock_keeps_an_offset(io_loop):
    emulator = Emulator()
    assert isinstance(emulator.clock, OffsetClock)
    emulator.start()
    try:
        await call(emulator, "POST", "/emulator/clock", {"advance": 1000}, auth=None)
        assert abs(emulator.google.now() - (SystemClock().now() + 1000)) < 5
    finally:
        emulator.stop()
