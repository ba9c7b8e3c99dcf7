"""Health, readiness, metrics and the API's common behaviour, over real HTTP."""

from __future__ import annotations

from base64 import b64encode

import pytest
from tornado import web

from daemon.app import Service
from handlers import RouteWithoutAuth, check_auth_decisions
from handlers.base import BaseHandler
from storage.base import StoreUnavailable
from tests.fixtures import API_KEY, call, make_service  # noqa: F401  (fixture)


@pytest.mark.gen_test(timeout=10)
async def test_healthz_needs_no_key(make_service):
    service = await make_service()
    assert await call(service, "GET", "/healthz", key=None) == (200, {"status": "ok"})


@pytest.mark.gen_test(timeout=10)
async def test_readyz_reports_each_check(make_service):
    service = await make_service()
    status, body = await call(service, "GET", "/readyz", key=None)
    # No Google credentials configured: said, not hidden.
    assert status == 503
    assert body["checks"]["storage"] == "ok"
    assert body["checks"]["google"] == ("not configured: google.service_account_file is not set")
    assert body["checks"]["fcm"] == "not configured: fcm.service_account_file is not set"

    async def fine() -> None:
        return None

    service.readiness_checks["google"] = fine
    service.readiness_checks["fcm"] = fine
    status, body = await call(service, "GET", "/readyz", key=None)
    assert status == 200 and body["status"] == "ready"

    async def down() -> None:
        raise StoreUnavailable("connection refused by 127.0.0.1:27017")

    service.readiness_checks["storage"] = down
    status, body = await call(service, "GET", "/readyz", key=None)
    assert status == 503
    assert body == {
        "status": "unready",
        "checks": {
            "storage": "connection refused by 127.0.0.1:27017",
            "google": "ok",
            "fcm": "ok",
        },
    }
    assert "mrm_push_ready 0.0" in (await call(service, "GET", "/metrics"))[1]


@pytest.mark.gen_test(timeout=10)
async def test_metrics_count_requests_by_route(make_service):
    service = await make_service()
    await call(service, "GET", "/healthz?token=secret-in-query")
    status, text = await call(service, "GET", "/metrics", key=None)
    assert status == 200
    assert (
        'mrm_push_http_requests_total{method="GET",route="HealthHandler",status="200"} 1.0' in text
    )
    assert "mrm_push_http_request_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text


@pytest.mark.gen_test(timeout=10)
async def test_metrics_token_when_set(make_service):
    service = await make_service({"auth": {"metrics_token": "metrics-secret-123"}})
    status, body = await call(service, "GET", "/metrics", key=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert (await call(service, "GET", "/metrics", key="wrong"))[0] == 401
    assert (await call(service, "GET", "/metrics", key="metrics-secret-123"))[0] == 200
    # Prometheus's basic_auth works too: any user name, the token as password.
    basic = {"Authorization": "Basic " + b64encode(b"prometheus:metrics-secret-123").decode()}
    assert (await call(service, "GET", "/metrics", key=None, headers=basic))[0] == 200


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("Basic " + b64encode(f"mrm:{API_KEY}".encode()).decode(), 200),
        ("Basic " + b64encode(f":{API_KEY}".encode()).decode(), 200),  # no user name
        ("basic " + b64encode(f"any one:{API_KEY}".encode()).decode(), 200),
        ("Basic " + b64encode(f"{API_KEY}:x".encode()).decode(), 401),  # key as the user
        ("Basic " + b64encode(API_KEY.encode()).decode(), 401),  # no colon
        ("Basic " + b64encode(b"mrm:").decode(), 401),
        ("Basic !!not-base64!!", 401),
        ("Basic " + b64encode(b"mrm:\xff\xfe").decode(), 401),  # not UTF-8
        ("Basic", 401),
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_the_api_key_as_a_basic_password(make_service, authorization, status):
    service = await make_service()
    headers = {"Authorization": authorization}
    got, body = await call(service, "GET", "/v1/rooms", key=None, headers=headers)
    assert got == status, body


@pytest.mark.gen_test(timeout=10)
async def test_unknown_route_is_a_json_404(make_service):
    service = await make_service()
    status, body = await call(service, "GET", "/nope")
    assert status == 404
    assert body == {"error": {"status": 404, "code": "not_found", "message": "no such route"}}


@pytest.mark.gen_test(timeout=10)
async def test_wrong_method_is_a_json_405(make_service):
    service = await make_service()
    status, body = await call(service, "DELETE", "/healthz")
    assert status == 405 and body["error"]["status"] == 405


@pytest.mark.gen_test(timeout=10)
async def test_body_over_the_limit_is_413_before_it_is_read(make_service):
    service = await make_service({"server": {"max_body_size": 2048}})
    status, body = await call(service, "POST", "/healthz", raw=b"x" * 4096)
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_a_route_without_an_auth_decision_stops_the_start():
    class Undecided(BaseHandler):
        def get(self) -> None:
            self.write_json({})

    with pytest.raises(RouteWithoutAuth, match="/undecided"):
        check_auth_decisions([("/undecided", Undecided)])
    with pytest.raises(RouteWithoutAuth):
        check_auth_decisions([("/plain", web.RequestHandler)])


def test_every_shipped_route_has_an_auth_decision():
    from handlers import all_routes

    check_auth_decisions(all_routes())
    assert Service  # the app module imports cleanly


@pytest.mark.gen_test(timeout=30)
async def test_with_mongodb_down_the_service_runs_and_says_why_it_is_unready(make_service):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"mongodb://127.0.0.1:{port}/mrm?serverSelectionTimeoutMS=300"
    service = await make_service({"storage": {"url": url}})
    assert (await call(service, "GET", "/healthz", key=None))[0] == 200
    status, body = await call(service, "GET", "/readyz", key=None)
    assert status == 503
    assert "unreachable" in body["checks"]["storage"] or "refused" in body["checks"]["storage"]
    status, body = await call(service, "GET", "/v1/rooms")
    assert status == 503 and body["error"]["code"] == "storage_unavailable"
