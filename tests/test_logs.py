"""The JSON log formatter's redactor: what it removes, what it shortens, what it leaves."""

from __future__ import annotations

import io
import json
import logging
import secrets

import pytest

from daemon import redact
from daemon.logs import SECRETS_FIELD, JsonFormatter, protect
from daemon.redact import REDACTED, Redactor, short

FCM = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx" + "Zb9Kx7Qw3Lm_Pq" * 8
PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
    "q3Jx0Qm5Zl9aXk2b\n-----END PRIVATE KEY-----\n"
)


@pytest.mark.parametrize(
    "text",
    [
        "room-a@resource.calendar.google.com",
        "c_" + "0123456789abcdef" * 4 + "@group.calendar.google.com",
        "/v1/rooms/c_" + "0123456789abcdef" * 4 + "%40group.calendar.google.com",
        "channel 862870cd-5b46-4fe5-a012-c268dcf43a69 for resource ret08u3rv24htgh289g",
        "a_rather_long_snake_case_identifier_that_is_no_secret_at_all",
        "basic checks passed; bearer of news",
        "GET /v1/notifications 200 (127.0.0.1) 0.46ms",
    ],
)
def test_what_operators_need_is_left_alone(text):
    assert Redactor(["api-key-0123456789abcdef"]).text(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/v1/rooms/r%40x/tokens/{FCM}", f"/v1/rooms/r%40x/tokens/{short(FCM)}"),
        ("/v1/rooms/r/tokens/tok-short", "/v1/rooms/r/tokens/…ok-short"),
        (f"sending to {FCM}", f"sending to dQw4w9WgXcQ:{short(FCM)}"),
        ("GET /ws?access_token=sub-0123456789&x=1", "GET /ws?access_token=…23456789&x=1"),
        ("Authorization: Bearer abc.DEF-123_456", f"Authorization: Bearer {REDACTED}"),
        (f"key={PEM!r}", f"key='{REDACTED}\\n'"),
        (f"key:\n{PEM}", f"key:\n{REDACTED}\n"),
        ("the key is api-key-0123456789abcdef.", f"the key is {REDACTED}."),
        (
            "t2 is a short token; at2b and t23 are not it",
            f"{REDACTED} is a short token; at2b and t23 are not it",
        ),
    ],
)
def test_secrets_and_tokens_are_removed_or_shortened(text, expected):
    assert Redactor(["api-key-0123456789abcdef", "t2"]).text(text) == expected


def test_random_channel_tokens_are_shortened_wherever_they_appear():
    for _ in range(50):
        token = secrets.token_urlsafe(48)  # as daemon/channels.py makes them
        assert token not in Redactor().text(f"Channel(token={token!r}, state='active')")


def test_a_records_own_tokens_and_every_field_are_redacted():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test_logs.redaction")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        protect(["configured-secret-0123456789"])
        try:
            raise ValueError("bad tok-short-01 and configured-secret-0123456789")
        except ValueError:
            logger.error(
                "failed for %s",
                "tok-short-01",
                exc_info=True,
                extra={
                    SECRETS_FIELD: ["tok-short-01"],
                    "nested": {
                        "list": ["configured-secret-0123456789", 3],
                        "error": ValueError(FCM),
                    },
                },
            )
    finally:
        root.removeHandler(handler)
    line = stream.getvalue()
    for secret in ("tok-short-01", "configured-secret-0123456789", FCM):
        assert secret not in line
    entry = json.loads(line)
    assert entry["event"] == "failed for …short-01"
    assert entry["nested"] == {"list": [REDACTED, 3], "error": f"dQw4w9WgXcQ:{short(FCM)}"}
    assert "ValueError: bad …short-01 and [redacted]" in entry["traceback"]
    assert SECRETS_FIELD not in entry


def test_the_redactor_keeps_old_secrets_and_always_learns_new_ones(monkeypatch):
    """Reloads add secrets (the old ones stay: a line logged later may still name one); past
    the bound the oldest are forgotten, never the new ones."""
    monkeypatch.setattr(redact, "SECRETS_MAX", 3)
    redactor = Redactor(["old-key-0123456789abcdef"])
    redactor.add(["second-key-0123456789abcdef", "third-key-0123456789abcdef"])
    assert "old-key" not in redactor.text("key old-key-0123456789abcdef")
    redactor.add(["newest-key-0123456789abcdef"])
    assert redactor.text("key newest-key-0123456789abcdef") == "key [redacted]"
    assert redactor.text("key third-key-0123456789abcdef") == "key [redacted]"
    assert redactor.text("key old-key-0123456789abcdef") == "key old-key-0123456789abcdef"
