"""Fixtures that run the real service on 127.0.0.1 for HTTP-level tests."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.netutil import bind_sockets

from daemon.app import Service
from daemon.clock import Clock
from daemon.configfile import load_config

API_KEY = "test-api-key-0123456789abcdef"


def write_config(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A config file in `directory`: SQLite there, one API key, plus the given sections."""
    config: dict[str, Any] = {
        "server": {"port": 0},
        "storage": {"url": "sqlite:///mrm-push.sqlite3"},
        "auth": {"api_keys": [API_KEY]},
        "logging": {"level": "debug"},
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def make_service(io_loop, tmp_path) -> Iterator[Callable[..., Awaitable[Service]]]:
    started: list[Service] = []

    async def make(overrides: dict[str, Any] | None = None, clock: Clock | None = None) -> Service:
        """Build and start a service on a free port of 127.0.0.1 (stopped after the test)."""
        loaded = load_config(str(write_config(tmp_path, overrides)), environ={})
        service = Service(loaded, clock=clock)
        await service.start(bind_sockets(0, "127.0.0.1"))
        started.append(service)
        return service

    yield make
    for service in started:
        if not service.stopping:
            io_loop.run_sync(service.stop)


async def call(
    service: Service,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = API_KEY,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One HTTP request to the service; returns (status, parsed JSON or text or None)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers.setdefault("Authorization", f"Bearer {key}")
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if payload is None and method in ("POST", "PUT", "PATCH"):
        payload = b""
    response: HTTPResponse = await AsyncHTTPClient().fetch(
        service.base_url + path,
        method=method,
        body=payload,
        headers=all_headers,
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    text = response.body.decode() if response.body else ""
    if response.headers.get("Content-Type", "").startswith("application/json") and text:
        return response.code, json.loads(text)
    return response.code, text or None
