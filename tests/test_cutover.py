"""The cut-over: mrm_api's own calls, made with `requests` exactly as its tasks make them,
against a running service with only MRM_PUSH_URL changed; its GraphQL schema for refresh and
notify; the defaults a real backend needs."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from daemon.app import Service
from daemon.configfile import load_config
from tests import mrm_api
from tests.fixtures import (  # noqa: F401
    API_KEY,
    backend,
    call,
    clock,
    emulator,
    make_service,
    write_config,
)

ROOM = "room-1@resource.calendar.google.com"
OTHER_ROOM = "room-2@resource.calendar.google.com"
TABLET = "cGhvbmUtMQ:APA91b" + "T" * 140
NEW_TABLET = "cGhvbmUtMg:APA91b" + "N" * 140
MRM_API_CLIENT = "10.20.30.40"  # where mrm_api's workers run, behind the proxy


async def in_thread(function, *args):
    """A blocking `requests` call, off the loop the service runs on."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def run_mrm_api_tasks(service, mrm_push_url: str) -> None:
    """CreateRoom (no token yet), the token update, a second room with its token, a delete."""
    await in_thread(mrm_api.add_room, mrm_push_url, ROOM, None)
    await in_thread(mrm_api.update_room_token, mrm_push_url, ROOM, TABLET)
    await in_thread(mrm_api.add_room, mrm_push_url, OTHER_ROOM, NEW_TABLET)
    await in_thread(mrm_api.remove_room, mrm_push_url, OTHER_ROOM)


async def assert_registered(service) -> None:
    room = await service.store.rooms.get(ROOM)
    assert room is not None and room.firebase_tokens == (TABLET,)
    assert await service.store.rooms.get(OTHER_ROOM) is None
    channel = await service.channels.current_channel(ROOM)
    assert channel is not None and channel.state in ("pending", "active")


@pytest.mark.gen_test(timeout=30)
async def test_mrm_api_s_calls_work_with_the_key_in_mrm_push_url(make_service, emulator, clock):
    service = await make_service(clock=clock, emulator=emulator)
    # The only change on mrm_api's side: MRM_PUSH_URL carries the key as its password;
    # requests turns that into HTTP Basic auth (any user name).
    url = f"http://mrm:{API_KEY}@127.0.0.1:{service.port}"
    await run_mrm_api_tasks(service, url)
    await assert_registered(service)


@pytest.mark.gen_test(timeout=30)
async def test_without_the_key_mrm_api_s_calls_change_nothing_and_say_so(
    make_service, emulator, clock, caplog
):
    service = await make_service(clock=clock, emulator=emulator)
    caplog.set_level(logging.WARNING, logger="handlers.legacy")
    for url in (
        f"http://127.0.0.1:{service.port}",  # the old MRM_PUSH_URL
        f"http://mrm:not-the-key-0123456789@127.0.0.1:{service.port}",
    ):
        await run_mrm_api_tasks(service, url)
    assert await service.store.rooms.list() == []
    refused = [r for r in caplog.records if r.getMessage() == "legacy_call_refused"]
    assert len(refused) == 8 and {r.route for r in refused} == {
        "/add_room",
        "/token",
        "/delete_room",
    }


class ForwardingProxy(RequestHandler):
    """A reverse proxy in front of the service, as nginx would be: it adds X-Forwarded-For
    with the address its client came from (here a fixed private address: mrm_api's)."""

    SUPPORTED_METHODS = ("GET", "POST", "PUT", "DELETE")

    def initialize(self, upstream: str) -> None:
        self.upstream = upstream

    def check_xsrf_cookie(self) -> None:
        pass

    async def forward(self) -> None:
        headers = dict(self.request.headers)
        headers.pop("Host", None)
        headers["X-Forwarded-For"] = MRM_API_CLIENT
        response = await AsyncHTTPClient().fetch(
            HTTPRequest(
                self.upstream + self.request.uri,
                method=self.request.method,
                headers=headers,
                body=self.request.body if self.request.method in ("POST", "PUT") else None,
                allow_nonstandard_methods=True,
            ),
            raise_error=False,
        )
        self.set_status(response.code)
        self.finish(response.body or b"")

    get = post = put = delete = forward


@pytest.mark.gen_test(timeout=30)
async def test_mrm_api_s_calls_work_from_an_allowed_address_behind_a_trusted_proxy(
    make_service, emulator, clock
):
    service = await make_service(
        {
            "server": {"trusted_proxies": ["127.0.0.1/32"]},
            "auth": {"legacy_allow_from": ["10.20.30.0/24"]},
        },
        clock=clock,
        emulator=emulator,
    )
    sockets = bind_sockets(0, "127.0.0.1")
    proxy = HTTPServer(Application([(r"/.*", ForwardingProxy, {"upstream": service.base_url})]))
    proxy.add_sockets(sockets)
    try:
        # MRM_PUSH_URL names the proxy, no credentials: the address is what lets it in.
        await run_mrm_api_tasks(service, f"http://127.0.0.1:{sockets[0].getsockname()[1]}")
    finally:
        proxy.stop()
    await assert_registered(service)
    # The same calls straight to the service come from 127.0.0.1, which is not allowed.
    await in_thread(mrm_api.add_room, service.base_url, OTHER_ROOM, None)
    assert await service.store.rooms.get(OTHER_ROOM) is None


@pytest.mark.gen_test(timeout=30)
async def test_refresh_and_notify_fit_mrm_api_s_schema_without_a_token(
    make_service, emulator, clock, backend
):
    api = backend
    api.rooms = [
        {"calendarId": ROOM, "firebaseToken": TABLET, "name": "Blue"},
        {"calendarId": OTHER_ROOM, "firebaseToken": None, "name": "Red"},
    ]
    # backend.url alone: no token (mrm_api's /mrm has no auth), notify on by default.
    service = await make_service({"backend": {"url": api.url}}, clock=clock, emulator=emulator)
    status, summary = await call(service, "POST", "/v1/refresh")
    assert status == 200 and summary["added"] == 2 and summary["failed"] == []
    await emulator.google.drain()
    emulator.google.insert_event(ROOM, summary="Standup")
    await emulator.fcm.wait_for(TABLET, 1, 10)
    calls = await api.wait_for(2)
    refresh, notify = calls[:2]
    for made in (refresh, notify):
        assert made.errors == [], made  # valid against mrm_api's schema
        assert "Authorization" not in made.headers
    assert notify.variables == {"calendarId": ROOM}
    assert ROOM not in notify.query  # the id travels as a variable, never in the query text
    assert api.notified == [ROOM]
    await service.delivery.drain(5)
    _, page = await call(service, "GET", "/v1/notifications?calendar_id=" + quote(ROOM))
    states = {d["target"]: d["state"] for d in page["notifications"][0]["deliveries"]}
    assert states == {"fcm": "sent", "backend": "sent"}


@pytest.mark.parametrize(
    ("backend", "interval"),
    [
        ({"url": "http://127.0.0.1:1/mrm"}, 3600),
        ({}, None),  # nobody to ask
        ({"url": "http://127.0.0.1:1/mrm", "refresh_interval": 0}, None),
        ({"url": "http://127.0.0.1:1/mrm", "refresh_interval": 600}, 600),
    ],
)
def test_a_backend_url_turns_on_the_hourly_refresh(tmp_path, backend, interval):
    loaded = load_config(str(write_config(tmp_path, {"backend": backend})), environ={})
    assert loaded.config.backend.notify is True
    service = Service(loaded)
    try:
        periodic = service.periodic.get("refresh")
        assert (periodic.callback_time / 1000 if periodic else None) == interval
    finally:
        service.fcm_executor.shutdown()


@pytest.mark.gen_test(timeout=30)
async def test_a_schema_mismatch_is_seen_by_the_fake(backend):
    # The fake refuses what mrm_api would refuse, so the test above can fail.
    query = 'mutation { mrmNotification(calendar_id: "x") { message } }'
    answer = backend.execute({"query": query})
    assert answer["errors"]
    assert mrm_api.query_errors(query)  # what a call's `errors` record
