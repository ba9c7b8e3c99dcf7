"""Request metrics and access lines stay bounded whatever a caller sends: made-up methods,
huge method names and made-up paths never become label values (contract 2, metrics)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from tornado.httpclient import AsyncHTTPClient

from daemon.logs import JsonFormatter
from tests.fixtures import call, make_service  # noqa: F401

STANDARD = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
SERIES = re.compile(r"^(mrm_push_http_[a-z_]+)\{([^}]*)\} ", re.MULTILINE)


async def fetch(service, method: str, path: str) -> int:
    response = await AsyncHTTPClient().fetch(
        service.base_url + path,
        method=method,
        allow_nonstandard_methods=True,
        raise_error=False,
    )
    return response.code


async def http_series(service) -> tuple[dict[str, set[str]], int]:
    """The label sets of every mrm_push_http_* series, by metric, and the /metrics size."""
    status, text = await call(service, "GET", "/metrics", key=None)
    assert status == 200
    found: dict[str, set[str]] = {}
    for name, labels in SERIES.findall(text):
        found.setdefault(name, set()).add(labels)
    return found, len(text.encode())


@pytest.mark.gen_test(timeout=30)
async def test_made_up_methods_and_paths_never_become_label_values(make_service, caplog):
    caplog.set_level(logging.INFO, logger="mrm_push.access")
    service = await make_service()
    for method in ("GET", "PUT", "DELETE"):
        await fetch(service, method, "/healthz")
        await fetch(service, method, "/no/such/path")
    baseline, _ = await http_series(service)
    names = [f"MADEUP{i:04d}" for i in range(300)] + ["X" * 30_000 + str(i) for i in range(3)]
    for start in range(0, len(names), 25):
        batch = names[start : start + 25]
        codes = await asyncio.gather(
            *(fetch(service, m, f"/healthz/{start}-{n}") for n, m in enumerate(batch)),
            *(fetch(service, m, "/healthz") for m in batch),
        )
        assert set(codes) <= {404, 405}, codes
    series, size = await http_series(service)
    # Two routes met, one "other" method, a few statuses: a handful of series, not thousands.
    requests = series["mrm_push_http_requests_total"]
    assert len(requests) <= len(baseline["mrm_push_http_requests_total"]) + 4, requests
    for labels in requests:
        parsed = dict(re.findall(r'([a-z]+)="([^"]*)"', labels))
        assert parsed["method"] in STANDARD | {"other"}, parsed
        assert re.fullmatch(r"[A-Za-z]+", parsed["route"]), parsed
        assert re.fullmatch(r"[1-5][0-9][0-9]|other", parsed["status"]), parsed
    assert 'method="other"' in " ".join(requests)
    assert size < 60_000, size  # /metrics stays small (it was megabytes)
    # The access lines say "other" too: a caller's 30 KB method is not logged either.
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "mrm_push.access"]
    assert len(lines) >= 2 * len(names)
    assert max(len(line) for line in lines) < 1000
    assert {json.loads(line)["method"] for line in lines} <= STANDARD | {"other"}
