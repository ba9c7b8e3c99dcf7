"""The FCM emulator over real HTTP: FCM's validation, error shapes, controls and waiting."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import google.auth.transport.requests
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
from google.oauth2 import service_account

from daemon.clock import ManualClock
from daemon.emulator.fcm import FCM_SCOPE, FcmEmulator
from daemon.emulator.keys import write_service_account
from daemon.emulator.oauth import OAuthEmulator

PROJECT = "mrm-push-test"
TOKEN = "dGVzdC10YWJsZXQ:APA91bFakeTokenForTheEmulator_0123456789"
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.readonly"


@dataclass
class Env:
    base_url: str
    oauth: OAuthEmulator
    fcm: FcmEmulator
    clock: ManualClock
    key_file: str
    client: tornado.httpclient.AsyncHTTPClient
    executor: ThreadPoolExecutor
    tokens: dict[str, str]

    @property
    def send_url(self) -> str:
        return f"{self.base_url}/v1/projects/{PROJECT}/messages:send"

    async def access_token(self, scope: str = FCM_SCOPE) -> str:
        """A real token from the OAuth emulator, fetched by google-auth off the loop."""
        if scope in self.tokens:
            return self.tokens[scope]
        creds = service_account.Credentials.from_service_account_file(self.key_file, scopes=[scope])
        request = google.auth.transport.requests.Request()
        await asyncio.get_running_loop().run_in_executor(self.executor, creds.refresh, request)
        self.tokens[scope] = str(creds.token)
        return self.tokens[scope]

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tornado.httpclient.HTTPResponse:
        raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        if raw is None and method in ("POST", "PUT"):
            raw = b""
        return await self.client.fetch(
            self.base_url + path,
            method=method,
            body=raw,
            headers=headers,
            raise_error=False,
        )

    async def send(
        self, body: Any, token: str | None = None, project: str = PROJECT
    ) -> tuple[int, dict[str, Any], tornado.httpclient.HTTPResponse]:
        bearer = token if token is not None else await self.access_token()
        response = await self.call(
            "POST",
            f"/v1/projects/{project}/messages:send",
            body,
            {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
        )
        return response.code, json.loads(response.body or b"{}"), response


@pytest.fixture
def env(io_loop, tmp_path):
    clock = ManualClock()
    oauth = OAuthEmulator()
    fcm = FcmEmulator(oauth, clock, project_id=PROJECT)
    app = tornado.web.Application(oauth.routes() + fcm.routes())
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    base_url = f"http://127.0.0.1:{port}"
    key_file = str(tmp_path / "fcm-key.json")
    info = write_service_account(
        key_file,
        token_uri=f"{base_url}/token",
        client_email="push@mrm-push-test.iam.gserviceaccount.com",
        project_id=PROJECT,
    )
    oauth.register(info)
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    executor = ThreadPoolExecutor(max_workers=2)
    yield Env(base_url, oauth, fcm, clock, key_file, client, executor, {})
    fcm.release()
    client.close()
    server.stop()
    io_loop.run_sync(server.close_all_connections)
    executor.shutdown(wait=True)


def message(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "token": TOKEN,
        "data": {"type": "calendar_changed", "calendar_id": "room@example.com"},
        "android": {"priority": "high", "collapse_key": "room@example.com", "ttl": "3600s"},
    }
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not None}


def fcm_error(code: int, status: str, message: str, error_code: str) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "status": status,
            "details": [
                {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": error_code,
                }
            ],
        }
    }


# -- accepted messages ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_accepted_message_is_recorded_and_named(env):
    status, body, _ = await env.send({"message": message(), "validate_only": False})
    assert status == 200
    assert body["name"].startswith(f"projects/{PROJECT}/messages/")
    received = env.fcm.messages(TOKEN)
    assert [m["name"] for m in received] == [body["name"]]
    assert received[0]["message"] == message()
    assert received[0]["received_at"] == env.clock.now()
    listed = await env.call("GET", "/emulator/fcm/messages?token=" + TOKEN)
    assert json.loads(listed.body)["messages"] == received
    assert env.fcm.attempts(TOKEN) == 1


@pytest.mark.gen_test(timeout=10)
async def test_camel_case_and_upper_case_priority_are_accepted(env):
    android = {"priority": "HIGH", "collapseKey": "c", "ttl": "0.5s", "directBootOk": True}
    status, _, _ = await env.send({"message": message(android=android), "validateOnly": False})
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_validate_only_answers_a_fake_id_and_delivers_nothing(env):
    status, body, _ = await env.send({"message": message(), "validate_only": True})
    assert status == 200
    assert body == {"name": f"projects/{PROJECT}/messages/fake_message_id"}
    assert env.fcm.messages(TOKEN) == []


@pytest.mark.gen_test(timeout=10)
async def test_topic_target_is_accepted(env):
    status, _, _ = await env.send({"message": message(token=None, topic="rooms")})
    assert status == 200
    assert env.fcm.messages()[0]["token"] is None


# -- authentication and project ---------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_missing_or_unknown_bearer_token_is_401(env):
    response = await env.call("POST", f"/v1/projects/{PROJECT}/messages:send", {"message": {}})
    assert response.code == 401
    assert json.loads(response.body)["error"]["status"] == "UNAUTHENTICATED"
    status, body, _ = await env.send({"message": message()}, token="ya29.not-issued")
    assert status == 401
    assert body["error"]["code"] == 401
    assert env.fcm.messages() == []


@pytest.mark.gen_test(timeout=10)
async def test_token_without_messaging_scope_is_refused(env):
    token = await env.access_token(CALENDAR_SCOPE)
    status, body, _ = await env.send({"message": message()}, token=token)
    assert status == 403
    assert body["error"]["status"] == "PERMISSION_DENIED"


@pytest.mark.gen_test(timeout=10)
async def test_cloud_platform_scope_is_accepted(env):
    token = await env.access_token("https://www.googleapis.com/auth/cloud-platform")
    status, _, _ = await env.send({"message": message()}, token=token)
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_other_project_is_permission_denied(env):
    status, body, _ = await env.send({"message": message()}, project="someone-else")
    assert status == 403
    assert body["error"]["status"] == "PERMISSION_DENIED"
    assert "cloudmessaging.messages.create" in body["error"]["message"]
    assert "details" not in body["error"]  # not SENDER_ID_MISMATCH: no token may be dropped


# -- validation ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_non_string_data_value_is_invalid_argument(env):
    data = {"type": "calendar_changed", "seq": 17}
    status, body, _ = await env.send({"message": message(data=data)})
    assert status == 400
    error = body["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"] == "Invalid value at 'message.data[1].value' (TYPE_STRING), 17"
    assert error["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [
                {"field": "message.data[1].value", "description": error["message"]}
            ],
        }
    ]
    assert env.fcm.messages() == []


@pytest.mark.gen_test(timeout=10)
async def test_data_over_4096_bytes_is_too_big(env):
    fits = {"k": "x" * 4095}
    status, _, _ = await env.send({"message": message(data=fits)})
    assert status == 200
    status, body, _ = await env.send({"message": message(data={"k": "x" * 4096})})
    assert status == 400
    assert body == fcm_error(
        400, "INVALID_ARGUMENT", "Android message is too big", "INVALID_ARGUMENT"
    )


@pytest.mark.gen_test(timeout=10)
async def test_unknown_fields_are_refused_where_they_are(env):
    status, body, _ = await env.send({"message": message(x=1)})
    assert status == 400
    assert body["error"]["message"] == (
        "Invalid JSON payload received. Unknown name \"x\" at 'message': Cannot find field."
    )
    android = {"priority": "high", "urgency": "now"}
    _, body, _ = await env.send({"message": message(android=android)})
    assert body["error"]["message"] == (
        'Invalid JSON payload received. Unknown name "urgency" at '
        "'message.android': Cannot find field."
    )
    _, body, _ = await env.send({"message": message(), "dry": True})
    assert body["error"]["message"] == (
        'Invalid JSON payload received. Unknown name "dry": Cannot find field.'
    )


@pytest.mark.gen_test(timeout=10)
async def test_exactly_one_target(env):
    status, body, _ = await env.send({"message": message(token=None)})
    assert status == 400
    assert body["error"]["message"] == "Recipient of the message is not set."
    status, body, _ = await env.send({"message": message(topic="rooms")})
    assert status == 400
    assert "Oneof field 'target' is already set" in body["error"]["message"]


@pytest.mark.gen_test(timeout=10)
async def test_priority_and_ttl_are_checked(env):
    status, body, _ = await env.send({"message": message(android={"priority": "urgent"})})
    assert status == 400
    assert body["error"]["message"].startswith("Invalid value at 'message.android.priority'")
    status, body, _ = await env.send({"message": message(android={"ttl": "1h"})})
    assert status == 400
    assert body["error"]["message"].startswith("Invalid value at 'message.android.ttl'")
    status, body, _ = await env.send({"message": message(android={"ttl": 3600})})
    assert status == 400


@pytest.mark.gen_test(timeout=10)
async def test_body_that_is_not_json(env):
    status, body, _ = await env.send(b"{not json")
    assert status == 400
    assert body["error"]["status"] == "INVALID_ARGUMENT"


# -- per-token behaviour ------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_unregistered_token_answers_fcm_404(env):
    env.fcm.set_state(TOKEN, "unregistered")
    status, body, _ = await env.send({"message": message()})
    assert status == 404
    assert body == fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
    env.fcm.set_state(TOKEN, "valid")
    status, _, _ = await env.send({"message": message()})
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_sender_id_mismatch_is_403(env):
    env.fcm.set_state(TOKEN, "sender_id_mismatch")
    status, body, _ = await env.send({"message": message()})
    assert status == 403
    assert body == fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")


@pytest.mark.gen_test(timeout=10)
async def test_invalid_and_malformed_tokens_are_invalid_argument(env):
    expected = fcm_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        "INVALID_ARGUMENT",
    )
    env.fcm.set_state(TOKEN, "invalid")
    status, body, _ = await env.send({"message": message()})
    assert (status, body) == (400, expected)
    status, body, _ = await env.send({"message": message(token="not a token!")})
    assert (status, body) == (400, expected)


@pytest.mark.gen_test(timeout=10)
async def test_queued_failures_then_success(env):
    env.fcm.fail(TOKEN, 429, retry_after=7)
    env.fcm.fail(TOKEN, 503, count=2)
    env.fcm.fail(TOKEN, 500)
    status, body, response = await env.send({"message": message()})
    assert status == 429
    assert response.headers["Retry-After"] == "7"
    assert body == fcm_error(
        429, "RESOURCE_EXHAUSTED", "Quota exceeded for sending messages.", "QUOTA_EXCEEDED"
    )
    for _ in range(2):
        status, body, response = await env.send({"message": message()})
        assert (status, body["error"]["status"]) == (503, "UNAVAILABLE")
        assert body["error"]["details"][0]["errorCode"] == "UNAVAILABLE"
        assert "Retry-After" not in response.headers
    status, body, _ = await env.send({"message": message()})
    assert (status, body["error"]["status"]) == (500, "INTERNAL")
    status, _, _ = await env.send({"message": message()})
    assert status == 200
    assert env.fcm.attempts(TOKEN) == 5
    assert len(env.fcm.messages(TOKEN)) == 1


@pytest.mark.gen_test(timeout=10)
async def test_failure_for_any_token(env):
    env.fcm.fail(None, 503)
    status, _, _ = await env.send({"message": message(token="other-token")})
    assert status == 503
    status, _, _ = await env.send({"message": message()})
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_delay_holds_the_answer_until_released(env):
    env.fcm.delay(TOKEN, 30)
    sending = asyncio.ensure_future(env.send({"message": message()}))
    await env.fcm.wait_for_attempts(TOKEN, 1)
    await asyncio.sleep(0)  # let the held handler park, if it were going to answer now
    assert not sending.done()
    env.fcm.release()
    status, _, _ = await sending
    assert status == 200
    assert len(env.fcm.messages(TOKEN)) == 1


@pytest.mark.gen_test(timeout=10)
async def test_api_disabled_is_a_403_without_an_fcm_error_code(env):
    env.fcm.fail(None, 403)
    status, body, _ = await env.send({"message": message()})
    assert status == 403
    error = body["error"]
    assert (error["code"], error["status"]) == (403, "PERMISSION_DENIED")
    assert error["message"].startswith(
        f"Firebase Cloud Messaging API has not been used in project {PROJECT} before"
    )
    assert [d["@type"] for d in error["details"]] == ["type.googleapis.com/google.rpc.ErrorInfo"]
    assert error["details"][0]["reason"] == "SERVICE_DISABLED"
    assert env.fcm.messages() == []
    status, _, _ = await env.send({"message": message()})  # one queued failure, then OK
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_a_wrong_endpoint_is_google_front_ends_html_404(env):
    env.fcm.fail(TOKEN, 404, count=2)
    for _ in range(2):
        response = await env.call(
            "POST",
            f"/v1/projects/{PROJECT}/messages:send",
            {"message": message()},
            {"Authorization": f"Bearer {await env.access_token()}"},
        )
        assert response.code == 404
        assert response.headers["Content-Type"].startswith("text/html")
        text = response.body.decode()
        assert "Error 404 (Not Found)" in text and "messages:send" in text
    assert env.fcm.attempts(TOKEN) == 2 and env.fcm.messages() == []
    response = await env.call("POST", "/emulator/fcm/failures", {"status": 404})
    assert response.code == 200


@pytest.mark.gen_test(timeout=10)
async def test_hold_keeps_answers_until_released_without_a_clock(env):
    env.fcm.hold_answers()
    sending = [asyncio.ensure_future(env.send({"message": message()})) for _ in range(2)]
    await env.fcm.wait_for_attempts(TOKEN, 2)
    await asyncio.sleep(0)  # let the held handlers park, if they were going to answer now
    assert not any(s.done() for s in sending) and env.fcm.held == 2
    env.fcm.release()
    assert [(await s)[0] for s in sending] == [200, 200]
    assert env.fcm.held == 0 and len(env.fcm.messages(TOKEN)) == 2
    # Over the control API, for one token.
    response = await env.call("POST", "/emulator/fcm/hold", {"token": TOKEN})
    assert response.code == 200
    status, _, _ = await env.send({"message": message(token="another-token")})
    assert status == 200
    sending = [asyncio.ensure_future(env.send({"message": message()}))]
    await env.fcm.wait_for_attempts(TOKEN, 3)
    assert (await env.call("DELETE", "/emulator/fcm/hold")).code == 204
    assert (await sending[0])[0] == 200


@pytest.mark.gen_test(timeout=10)
async def test_stop_holding_answers_new_requests_and_keeps_the_held_ones(env):
    env.fcm.hold_answers(TOKEN)
    held = asyncio.ensure_future(env.send({"message": message()}))
    await env.fcm.wait_for_attempts(TOKEN, 1)
    env.fcm.stop_holding(TOKEN)
    status, _, _ = await env.send({"message": message()})
    assert status == 200
    assert not held.done() and env.fcm.held == 1  # only release() lets the first one go
    env.fcm.release()
    assert (await held)[0] == 200
    assert env.fcm.held == 0 and len(env.fcm.messages(TOKEN)) == 2


# -- waiting -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_wait_for_returns_when_the_messages_arrive(env):
    waiting = asyncio.ensure_future(env.fcm.wait_for(TOKEN, 2, timeout=5))
    await env.send({"message": message()})
    assert not waiting.done()
    await env.send({"message": message()})
    received = await waiting
    assert len(received) == 2


@pytest.mark.gen_test(timeout=10)
async def test_wait_for_times_out_with_a_reason(env):
    with pytest.raises(TimeoutError, match="0 messages"):
        await env.fcm.wait_for(TOKEN, 1, timeout=0.05)


# -- the control API -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_control_api(env):
    response = await env.call(
        "POST", "/emulator/fcm/tokens", {"token": TOKEN, "state": "unregistered"}
    )
    assert response.code == 200
    status, _, _ = await env.send({"message": message()})
    assert status == 404
    await env.call("POST", "/emulator/fcm/tokens", {"token": TOKEN, "state": "valid"})

    response = await env.call(
        "POST",
        "/emulator/fcm/failures",
        {"token": TOKEN, "status": 429, "count": 1, "retry_after": 3},
    )
    assert response.code == 200
    status, _, raw = await env.send({"message": message()})
    assert (status, raw.headers["Retry-After"]) == (429, "3")

    status, _, _ = await env.send({"message": message()})
    assert status == 200
    attempts = await env.call("GET", "/emulator/fcm/attempts?token=" + TOKEN)
    assert json.loads(attempts.body) == {"token": TOKEN, "attempts": 3}
    listed = await env.call("GET", "/emulator/fcm/messages")
    assert len(json.loads(listed.body)["messages"]) == 1

    response = await env.call("DELETE", "/emulator/fcm/messages")
    assert response.code == 204
    assert env.fcm.messages() == [] and env.fcm.attempts(TOKEN) == 0

    response = await env.call("POST", "/emulator/fcm/delay", {"token": TOKEN, "seconds": 30})
    assert response.code == 200
    response = await env.call("POST", "/emulator/fcm/tokens", {"token": TOKEN, "state": "invalid"})
    response = await env.call("POST", "/emulator/fcm/reset")
    assert response.code == 204
    status, _, _ = await env.send({"message": message()})  # no delay, valid again
    assert status == 200


@pytest.mark.gen_test(timeout=10)
async def test_control_api_refuses_bad_input_as_json(env):
    response = await env.call("POST", "/emulator/fcm/tokens", {"token": TOKEN, "state": "gone"})
    assert response.code == 400
    assert "state" in json.loads(response.body)["error"]["message"]
    response = await env.call("POST", "/emulator/fcm/failures", {"status": 418})
    assert response.code == 400
    response = await env.call("POST", "/emulator/fcm/delay", b"[1]")
    assert response.code == 400
