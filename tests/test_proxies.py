"""server.trusted_proxies: forwarded headers count only from a trusted proxy, for every route
(legacy auth, the webhook, /ws); the caller is the rightmost untrusted X-Forwarded-For hop."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

import pytest
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.websocket import websocket_connect

from handlers.edge import UNKNOWN_CLIENT, TrustedProxies
from tests.fixtures import call, make_service  # noqa: F401
from tests.test_websocket import TOKEN
from tests.test_websocket import overrides as ws_overrides

ROOM = "room-1@resource.calendar.google.com"
ADD_ROOM = "/add_room?" + urlencode({"calendar_id": ROOM})
ALLOWED = "10.1.2.3"  # inside auth.legacy_allow_from below
OUTSIDE = "192.0.2.7"


def settings(*trusted: str) -> dict[str, Any]:
    return {
        "server": {"trusted_proxies": list(trusted)},
        "auth": {"legacy_allow_from": ["10.0.0.0/8"]},
    }


async def legacy_status(service, headers: dict[str, str]) -> int:
    status, _ = await call(service, "GET", ADD_ROOM, key=None, headers=headers)
    return status


def access_lines(caplog, path: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mrm_push.access" and r.path == path]


def headers_of(*pairs: tuple[str, str]) -> HTTPHeaders:
    headers = HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers


# -- the rule, as a function -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trusted", "remote", "pairs", "expected"),
    [
        ([], "127.0.0.1", [("X-Forwarded-For", ALLOWED), ("X-Real-Ip", ALLOWED)], "127.0.0.1"),
        (["10.9.0.0/16"], "127.0.0.1", [("X-Forwarded-For", ALLOWED)], "127.0.0.1"),
        (["127.0.0.1/32"], "127.0.0.1", [("X-Forwarded-For", ALLOWED)], ALLOWED),
        (["127.0.0.1/32"], "127.0.0.1", [("X-Forwarded-For", f"{ALLOWED}, {OUTSIDE}")], OUTSIDE),
        (["127.0.0.1/32"], "127.0.0.1", [("X-Forwarded-For", f"{OUTSIDE},{ALLOWED}")], ALLOWED),
        (
            ["127.0.0.1/32", "10.0.0.0/8"],
            "127.0.0.1",
            [("X-Forwarded-For", f"{OUTSIDE}, 10.5.5.5, 10.6.6.6")],
            OUTSIDE,
        ),
        (
            ["127.0.0.1/32", "10.0.0.0/8"],
            "127.0.0.1",
            [("X-Forwarded-For", "10.5.5.5, 10.6.6.6")],
            "10.5.5.5",  # proxies all the way: the first of them
        ),
        (
            ["127.0.0.1/32"],
            "127.0.0.1",
            [("X-Forwarded-For", OUTSIDE), ("X-Forwarded-For", ALLOWED)],
            ALLOWED,  # two headers are one list, in order
        ),
        (["127.0.0.1/32"], "127.0.0.1", [("X-Real-Ip", ALLOWED)], ALLOWED),
        (
            ["127.0.0.1/32"],
            "127.0.0.1",
            [("X-Real-Ip", ALLOWED), ("X-Forwarded-For", OUTSIDE)],
            OUTSIDE,
        ),
        (
            ["127.0.0.1/32"],
            "127.0.0.1",
            [("X-Forwarded-For", f"{ALLOWED}, nonsense")],
            UNKNOWN_CLIENT,
        ),
        (["127.0.0.1/32"], "127.0.0.1", [("X-Real-Ip", "x" * 5000)], UNKNOWN_CLIENT),
        (["127.0.0.1/32"], "127.0.0.1", [("X-Forwarded-For", ", ,")], "127.0.0.1"),
        (["127.0.0.1/32"], "::ffff:127.0.0.1", [("X-Forwarded-For", "2001:db8::5")], "2001:db8::5"),
        (["::1/128"], "::1", [("X-Forwarded-For", "::ffff:10.1.2.3")], ALLOWED),
        (["::1/128"], "127.0.0.1", [("X-Forwarded-For", ALLOWED)], "127.0.0.1"),
    ],
)
def test_the_caller_is_the_rightmost_untrusted_hop(trusted, remote, pairs, expected):
    caller, _ = TrustedProxies(trusted).client(remote, headers_of(*pairs))
    assert caller == expected


@pytest.mark.parametrize(
    ("trusted", "pairs", "expected"),
    [
        ([], [("X-Forwarded-Proto", "https")], None),
        (["127.0.0.1/32"], [("X-Forwarded-Proto", "https")], "https"),
        (["127.0.0.1/32"], [("X-Forwarded-Proto", "HTTP, https")], "https"),
        (["127.0.0.1/32"], [("X-Forwarded-Proto", "gopher")], None),
        (["127.0.0.1/32"], [], None),
    ],
)
def test_x_forwarded_proto_counts_only_from_a_trusted_proxy(trusted, pairs, expected):
    assert TrustedProxies(trusted).client("127.0.0.1", headers_of(*pairs))[1] == expected


# -- over HTTP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("trusted", [[], ["192.0.2.1/32"]], ids=["none", "someone-else"])
@pytest.mark.gen_test(timeout=20)
async def test_spoofed_headers_do_not_pass_legacy_allow_from(make_service, caplog, trusted):
    caplog.set_level(logging.INFO)
    service = await make_service(settings(*trusted))
    for headers in (
        {"X-Real-Ip": ALLOWED},
        {"X-Forwarded-For": ALLOWED},
        {"X-Forwarded-For": ALLOWED, "X-Real-Ip": ALLOWED, "X-Forwarded-Proto": "https"},
    ):
        assert await legacy_status(service, headers) == 401, headers
    assert await service.store.rooms.list() == []
    refused = [r for r in caplog.records if r.getMessage() == "legacy_call_refused"]
    assert len(refused) == 3 and {r.remote for r in refused} == {"127.0.0.1"}
    lines = access_lines(caplog, "/add_room")
    assert {(r.remote, r.scheme) for r in lines} == {("127.0.0.1", "http")}


@pytest.mark.gen_test(timeout=20)
async def test_behind_a_trusted_proxy_the_forwarded_caller_counts(make_service, caplog):
    caplog.set_level(logging.INFO)
    service = await make_service(settings("127.0.0.1/32"))
    assert await legacy_status(service, {"X-Forwarded-For": f"{OUTSIDE}, {ALLOWED}"}) == 200
    assert await legacy_status(service, {"X-Real-Ip": ALLOWED}) == 200
    # The client wrote the allowed address itself; the proxy appended the real one.
    assert await legacy_status(service, {"X-Forwarded-For": f"{ALLOWED}, {OUTSIDE}"}) == 401
    assert await legacy_status(service, {"X-Forwarded-For": OUTSIDE, "X-Real-Ip": ALLOWED}) == 401
    [refused, _] = [r for r in caplog.records if r.getMessage() == "legacy_call_refused"]
    assert refused.remote == OUTSIDE
    lines = access_lines(caplog, "/add_room")
    assert [r.remote for r in lines] == [ALLOWED, ALLOWED, OUTSIDE, OUTSIDE]
    await service.channels.drain(5)


@pytest.mark.parametrize(
    ("trusted", "remote", "scheme"),
    [([], "127.0.0.1", "http"), (["127.0.0.0/8"], OUTSIDE, "https")],
    ids=["untrusted", "trusted"],
)
@pytest.mark.gen_test(timeout=20)
async def test_every_route_sees_the_same_caller(make_service, caplog, trusted, remote, scheme):
    """The webhook, /ws and a public route take the caller from the one place."""
    caplog.set_level(logging.INFO)
    config = ws_overrides()
    config["server"] = {"trusted_proxies": trusted}
    service = await make_service(config)
    forwarded = {"X-Forwarded-For": OUTSIDE, "X-Forwarded-Proto": "https"}
    await call(service, "GET", "/healthz", key=None, headers=forwarded)
    await call(service, "POST", "/notifications", key=None, headers=forwarded)
    url = f"ws://127.0.0.1:{service.port}/ws"
    ws = await websocket_connect(
        HTTPRequest(url, headers={**forwarded, "Authorization": f"Bearer {TOKEN}"})
    )
    ws.close()
    for path in ("/healthz", "/notifications", "/ws"):
        [line] = access_lines(caplog, path)
        assert (line.remote, line.scheme) == (remote, scheme), path
