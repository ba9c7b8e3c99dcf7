"""The `mrm-push` command as a process: exit codes, check-config, SIGTERM, sd_notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import write_config

ROOT = Path(__file__).resolve().parent.parent
# CLI tests run the console script the package installs; from a bare checkout, the module.
CONSOLE_SCRIPT = Path(sys.executable).parent / "mrm-push"
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "daemon.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_check_config_prints_values_masked_with_sources(tmp_path):
    path = write_config(tmp_path, {"backend": {"token": "backend-secret-value"}})
    result = run_cli("check-config", "--config", str(path), env={"MRM_PUSH__SERVER__HOST": "::1"})
    assert result.returncode == 0, result.stderr
    assert "server.host = ::1  # environment (MRM_PUSH__SERVER__HOST)" in result.stdout
    assert "server.port = 0  # file" in result.stdout
    assert "backend.token = '********'  # file" in result.stdout
    assert "backend-secret-value" not in result.stdout + result.stderr
    assert "test-api-key" not in result.stdout


def test_check_config_warns_about_a_plain_http_public_url(tmp_path):
    path = write_config(tmp_path, {"server": {"public_url": "http://push.example.com"}})
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0
    assert "warning: server.public_url: http://push.example.com is not https://" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  port: 70000\n", "server.port ({file}): Input should be less than or equal"),
        ("server: {port: [\n", "not valid YAML"),
        ("server:\n  colour: blue\n", "server.colour ({file}): unknown key"),
        (
            "websocket:\n  allowed_origins: ['127.0.0.1:8765']\n",
            "websocket.allowed_origins ({file}): '127.0.0.1:8765' is not scheme://host[:port]",
        ),
        (
            "server:\n  xheaders: true\n",
            "server.xheaders ({file}): replaced by server.trusted_proxies",
        ),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    for command in ("serve", "check-config"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2
        assert expected.format(file=path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; see the /proc case below")
def test_an_unwritable_sqlite_path_is_one_line_and_exit_2(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    path = write_config(tmp_path, {"storage": {"url": f"sqlite:///{locked}/sub/db.sqlite3"}})
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert f"mrm-push: config: storage.url ({path}): cannot create" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_sqlite_path_that_cannot_be_made_is_one_line_and_exit_2(tmp_path):
    # /proc refuses new files even to root.
    path = write_config(tmp_path, {"storage": {"url": "sqlite:////proc/mrm-push/db.sqlite3"}})
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("mrm-push: config: storage.url ("), result.stderr
    assert "Traceback" not in result.stderr


def read_log_until(stream, event: str) -> dict:
    for line in stream:
        entry = json.loads(line)
        if entry["event"] == event:
            return entry
    raise AssertionError(f"the process ended before logging {event}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_a_signal_and_speaks_sd_notify(tmp_path, signum):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    path = write_config(tmp_path)
    process = subprocess.Popen(
        [*COMMAND, "serve", "--config", str(path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
    )
    try:
        listening = read_log_until(process.stderr, "listening")
        assert listening["port"] > 0
        assert notify.recv(100) == b"READY=1"
        with socket.create_connection(("127.0.0.1", listening["port"])) as client:
            client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert b"200 OK" in client.recv(1000)
        process.send_signal(signum)
        assert notify.recv(100) == b"STOPPING=1"
        read_log_until(process.stderr, "stopped")
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()
        notify.close()
