"""`mrm-push serve` as a process: what stops the start, its one line on stderr, its exit code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import write_config

ROOT = Path(__file__).resolve().parent.parent
# CLI tests run the console script the package installs; from a bare checkout, the module.
CONSOLE_SCRIPT = Path(sys.executable).parent / "mrm-push"
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "daemon.cli"]
AS_ROOT = os.geteuid() == 0


def mrm_push(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 30):
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def not_log_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines the service may have written before stopping."""
    return [line for line in stderr.splitlines() if not line.startswith('{"ts"')]


@dataclass
class Case:
    """A start that cannot work: the config (file sections and environment) and the one line."""

    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    code: int = 2
    # The line, with {config} for the config file's path, {port} for the busy port, {tmp}.
    line: str = ""
    prepare: Callable[[Path], None] | None = None


def not_json(tmp: Path) -> None:
    (tmp / "key.json").write_text("this is not JSON\n")


def not_a_service_account(tmp: Path) -> None:
    (tmp / "key.json").write_text(json.dumps({"type": "authorized_user", "client_id": "x"}))


def unreadable(tmp: Path) -> None:
    (tmp / "key.json").write_text("{}")
    (tmp / "key.json").chmod(0)


def a_directory(tmp: Path) -> None:
    (tmp / "key.json").mkdir()


CASES = {
    "mongodb port not a number (environment)": Case(
        env={"MRM_PUSH__STORAGE__URL": "mongodb://host:notaport"},
        line="mrm-push: config: storage.url (MRM_PUSH__STORAGE__URL): Port contains non-digit",
    ),
    "mongodb option with a bad value (file)": Case(
        config={"storage": {"url": "mongodb://a/?tls=maybe"}},
        line="mrm-push: config: storage.url ({config}): The value of tls must be",
    ),
    "mongodb unknown option (file)": Case(
        config={"storage": {"url": "mongodb://a/?colour=blue"}},
        line="mrm-push: config: storage.url ({config}): ",
    ),
    "sqlite file that cannot be made": Case(
        config={"storage": {"url": "sqlite:////proc/mrm-push/db.sqlite3"}},
        line="mrm-push: config: storage.url ({config}): cannot create",
    ),
    "google key file missing": Case(
        config={"google": {"service_account_file": "absent.json"}},
        line="mrm-push: config: google.service_account_file ({config}): cannot read "
        "{tmp}/absent.json (No such file or directory)",
    ),
    "google key file is a directory (environment)": Case(
        env={"MRM_PUSH__GOOGLE__SERVICE_ACCOUNT_FILE": "key.json"},
        prepare=a_directory,
        line="mrm-push: config: google.service_account_file "
        "(MRM_PUSH__GOOGLE__SERVICE_ACCOUNT_FILE): cannot read",
    ),
    "fcm key file not JSON": Case(
        config={"fcm": {"service_account_file": "key.json", "project_id": "p"}},
        prepare=not_json,
        line="mrm-push: config: fcm.service_account_file ({config}): {tmp}/key.json is not JSON",
    ),
    "fcm key file not a service-account key": Case(
        config={"fcm": {"service_account_file": "key.json", "project_id": "p"}},
        prepare=not_a_service_account,
        line="mrm-push: config: fcm.service_account_file ({config}): "
        "{tmp}/key.json is not a service-account key",
    ),
    "state directory that cannot be made (serve --emulator)": Case(
        config={"server": {"state_dir": "/proc/mrm-push-state"}},
        args=("--emulator",),
        line="mrm-push: config: server.state_dir ({config}): cannot write /proc/mrm-push-state",
    ),
    "unknown key (environment)": Case(
        env={"MRM_PUSH__SERVER__PROT": "1"},
        line="mrm-push: config: server.prot (MRM_PUSH__SERVER__PROT): unknown key",
    ),
    "port in use": Case(
        code=1, line="mrm-push: cannot listen on 127.0.0.1:{port}: address already in use"
    ),
}
if not AS_ROOT:  # root reads any file
    CASES["key file unreadable by the service's user"] = Case(
        config={"google": {"service_account_file": "key.json"}},
        prepare=unreadable,
        line="mrm-push: config: google.service_account_file ({config}): cannot read "
        "{tmp}/key.json (Permission denied)",
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_start_that_cannot_work_is_one_line_and_its_exit_code(tmp_path, case):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        config = {"server": {"port": port if case.code == 1 else 0}}
        for section, values in case.config.items():
            config.setdefault(section, {}).update(values)
        path = write_config(tmp_path, config)
        if case.prepare is not None:
            case.prepare(tmp_path)
        result = mrm_push("serve", "--config", str(path), *case.args, env=case.env, cwd=tmp_path)
    finally:
        busy.close()
    expected = case.line.format(config=path, port=port, tmp=tmp_path)
    assert result.returncode == case.code, result.stderr
    assert "Traceback" not in result.stderr
    lines = not_log_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]


def test_check_config_opens_the_key_files_as_the_service_would(tmp_path):
    not_json(tmp_path)
    path = write_config(tmp_path, {"fcm": {"service_account_file": "key.json"}})
    result = mrm_push("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: fcm.service_account_file ({path}): {tmp_path}/key.json is not JSON" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_check_config_warns_when_no_api_key_is_set(tmp_path):
    path = write_config(tmp_path, {"auth": {"api_keys": []}})
    result = mrm_push("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0
    assert "warning: auth.api_keys: no API key is set" in result.stderr
    keyed = mrm_push("check-config", "--config", str(write_config(tmp_path)), cwd=tmp_path)
    assert "auth.api_keys" not in keyed.stderr


def test_serve_logs_the_warnings_check_config_gives(tmp_path):
    path = write_config(tmp_path, {"server": {"public_url": "http://push.example.com"}})
    process = subprocess.Popen(
        [*COMMAND, "serve", "--config", str(path)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in process.stderr:
            entry = json.loads(line)
            seen.append(entry)
            if entry["event"] == "listening":
                break
        warned = [e for e in seen if e["event"] == "config_warning"]
        assert {
            "level": "warning",
            "key": "server.public_url",
        }.items() <= warned[0].items(), seen
        assert "is not https://" in warned[0]["reason"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()
