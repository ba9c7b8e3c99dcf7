"""Retry-After as FCM and the backend send it: delta-seconds or an HTTP date, read one way."""

from __future__ import annotations

import email.utils
import time

import pytest

from daemon.backoff import retry_after_seconds

NOW = 1_000_000.0


@pytest.fixture
def away_from_utc(monkeypatch):
    """A local zone five hours from UTC: a date without a zone must still be read as GMT."""
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def http_date(when: float, zone: str = "GMT") -> str:
    text = email.utils.formatdate(when, usegmt=True)
    return text.removesuffix(" GMT") + (f" {zone}" if zone else "")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), (" 0 ", 0.0), ("120", 120.0), ("1.5", 1.5), ("-5", 0.0)],
)
def test_delta_seconds(value, seconds):
    assert retry_after_seconds(value, NOW) == seconds


@pytest.mark.parametrize("zone", ["GMT", "+0000", "-0000", "+0100"])
def test_http_date_with_a_zone(zone):
    offset = 3600.0 if zone == "+0100" else 0.0
    # "Thu, ... 12:00:00 +0100" is an hour earlier in UTC than the same text in GMT.
    assert retry_after_seconds(http_date(NOW + 30.0 + offset, zone), NOW) == 30.0


def test_http_date_without_a_zone_is_gmt(away_from_utc):
    assert retry_after_seconds(http_date(NOW + 30.0, ""), NOW) == 30.0
    assert retry_after_seconds(http_date(NOW + 30.0, "-0000"), NOW) == 30.0


@pytest.mark.parametrize("zone", ["GMT", ""])
def test_past_dates_mean_now(zone, away_from_utc):
    assert retry_after_seconds(http_date(NOW - 3600.0, zone), NOW) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "inf", "nan", "1e400", "Mon, 99 Foo 2024", "0x10"]
)
def test_garbage_is_none(value):
    assert retry_after_seconds(value, NOW) is None
