"""The configuration: defaults, file, environment, checks, secrets, and the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.configcheck import warnings
from daemon.configfile import (
    ConfigError,
    describe,
    load_config,
    local_url,
    public_url,
    reference,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_contract():
    loaded = load_config(None, environ={})
    config = loaded.config
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.public_url is None
    assert public_url(config.server) == "http://127.0.0.1:8080"
    assert config.server.max_body_size == 65536 and config.server.shutdown_timeout == 10
    assert config.storage.mongo_driver == "motor" and config.storage.retention_days == 14
    assert config.storage.url == "sqlite:///" + str(Path.cwd() / "var/mrm-push.sqlite3")
    assert config.google.webhook_path == "/notifications"
    assert config.google.channel_ttl == 604800 and config.google.renew_before == 86400
    assert config.google.renew_check_interval == 600 and config.google.request_timeout == 10
    assert config.google.max_concurrency == 4 and config.google.max_retries == 8
    assert config.fcm.backend == "firebase-admin" and config.fcm.endpoint == (
        "https://fcm.googleapis.com"
    )
    assert (config.fcm.max_attempts, config.fcm.attempt_timeout) == (8, 30)
    assert (config.fcm.mismatch_breaker, config.fcm.tombstone_days) == (5, 30)
    ws = config.websocket
    assert (ws.ping_interval, ws.max_queue, ws.max_message_size) == (25, 1000, 65536)
    assert (ws.max_connections, ws.max_subscriptions, ws.allowed_origins) == (20000, 1000, [])
    assert ws.send_buffer == 131072
    assert config.backend.rooms_query == "{ allRooms { rooms { calendarId firebaseToken } } }"
    assert (config.backend.prune, config.backend.notify) == (False, True)
    assert (config.backend.refresh_interval, config.backend.timeout) == (3600, 10)
    assert config.backend.token is None and config.fcm.notification_body is None
    assert config.sync.poll_interval == 900 and config.logging.level == "info"
    assert loaded.secrets.api_keys == ()
    assert config.server.trusted_proxies == [] and config.auth.legacy_allow_from == []


def test_the_shipped_config_yaml_loads_and_keeps_the_defaults():
    loaded = load_config(str(ROOT / "config.yaml"), environ={})
    assert loaded.config.storage.url == "sqlite:///" + str(ROOT / "var/mrm-push.sqlite3")
    assert loaded.config.server.port == 8080
    assert loaded.config.server.public_url is None  # follows host and port
    assert "server.public_url = http://127.0.0.1:8080  # default: from host and port" in (
        describe(loaded)
    )


def test_file_then_environment_and_sources(tmp_path):
    path = write(tmp_path, "server:\n  port: 9000\n  host: 0.0.0.0\n")
    loaded = load_config(path, environ={"MRM_PUSH__SERVER__PORT": "9100", "OTHER": "x"})
    assert loaded.config.server.port == 9100
    assert loaded.config.server.host == "0.0.0.0"
    assert loaded.sources["server.port"] == "environment (MRM_PUSH__SERVER__PORT)"
    assert loaded.sources["server.host"] == "file"
    lines = describe(loaded)
    assert "server.port = 9100  # environment (MRM_PUSH__SERVER__PORT)" in lines
    assert "server.host = 0.0.0.0  # file" in lines
    assert "server.trusted_proxies = []  # default" in lines


def test_environment_values_are_yaml(tmp_path):
    env = {
        "MRM_PUSH__WEBSOCKET__ALLOWED_ORIGINS": "[https://a.example, https://b.example]",
        "MRM_PUSH__BACKEND__NOTIFY": "true",
    }
    config = load_config(None, environ=env).config
    assert config.websocket.allowed_origins == ["https://a.example", "https://b.example"]
    assert config.backend.notify is True


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            "server:\n  port: 70000\n",
            {},
            "server.port ({file}): Input should be less than or equal to 65535",
        ),
        ("server:\n  port: 0x\n", {}, "server.port ({file}): Input should be a valid integer"),
        ("server:\n  prot: 1\n", {}, "server.prot ({file}): unknown key"),
        ("nosuch:\n  a: 1\n", {}, "nosuch ({file}): unknown key"),
        ("server: [1, 2]\n", {}, "server ({file}): must be a mapping of keys"),
        ("- a\n- b\n", {}, "must be a mapping of sections, not list"),
        ("server: {port: [\n", {}, "not valid YAML"),
        ("", {"MRM_PUSH__SERVER__PROT": "1"}, "server.prot (MRM_PUSH__SERVER__PROT): unknown key"),
        ("", {"MRM_PUSH__PORT": "1"}, "MRM_PUSH__PORT: not of the form MRM_PUSH__SECTION__KEY"),
        ("", {"MRM_PUSH__SERVER__PORT": "[1"}, "MRM_PUSH__SERVER__PORT: not a YAML value"),
        (
            "storage:\n  url: postgres://x\n",
            {},
            "storage.url ({file}): must be sqlite:///path or mongodb",
        ),
        (
            "storage:\n  mongo_driver: other\n",
            {},
            "storage.mongo_driver ({file}): Input should be 'motor'",
        ),
        ("fcm:\n  backend: apns\n", {}, "fcm.backend ({file}): Input should be 'firebase-admin'"),
        (
            "server:\n  public_url: ftp://x\n",
            {},
            "server.public_url ({file}): must start with http://",
        ),
        ("google:\n  webhook_path: hook\n", {}, "google.webhook_path ({file}): must be a path"),
        (
            "google:\n  request_timeout: 0\n",
            {},
            "google.request_timeout ({file}): Input should be greater",
        ),
        (
            "server:\n  xheaders: true\n",
            {},
            "server.xheaders ({file}): replaced by server.trusted_proxies",
        ),
        (
            "",
            {"MRM_PUSH__SERVER__XHEADERS": "1"},
            "server.xheaders (MRM_PUSH__SERVER__XHEADERS): replaced by server.trusted",
        ),
        (
            "server:\n  trusted_proxies: [nope]\n",
            {},
            "server.trusted_proxies ({file}): 'nope' is not a",
        ),
        ("server:\n  trusted_proxies: [10.0.0.0/33]\n", {}, "'10.0.0.0/33' is not a CIDR"),
        (
            "server:\n  trusted_proxies: 10.0.0.0/8\n",
            {},
            "server.trusted_proxies ({file}): Input should",
        ),
        ("auth:\n  legacy_allow_from: [10.0.0.0/33]\n", {}, "'10.0.0.0/33' is not a CIDR"),
        ("fcm:\n  notification_body: ''\n", {}, "fcm.notification_body ({file}): must be 1-256"),
        ("fcm:\n  notification_body: " + "x" * 257 + "\n", {}, "must be 1-256 bytes"),
        ("auth:\n  subscribers: [{calendars: [a]}]\n", {}, "exactly one of token or token_file"),
        (
            "auth:\n  api_keys: [short]\n",
            {},
            "auth.api_keys ({file}): every key needs 16 characters",
        ),
        ("auth:\n  api_keys_file: nope.txt\n", {}, "auth.api_keys_file ({file}): cannot read"),
        ("logging:\n  level: loud\n", {}, "logging.level ({file}): Input should be 'debug'"),
        (
            "websocket:\n  allowed_origins: ['127.0.0.1:8765']\n",
            {},
            "websocket.allowed_origins ({file}): '127.0.0.1:8765' is not scheme://host[:port]",
        ),
        ("websocket:\n  allowed_origins: ['https://a.example/app']\n", {}, "no path"),
        ("websocket:\n  allowed_origins: ['https://a.example:99999']\n", {}, "port"),
        ("websocket:\n  allowed_origins: ['https://']\n", {}, "websocket.allowed_origins ("),
        ("websocket:\n  allowed_origins: ['https://u@a.example']\n", {}, "no user"),
        ("websocket:\n  allowed_origins: ['https://a.example?x']\n", {}, "no path"),
        ("websocket:\n  allowed_origins: ['']\n", {}, "websocket.allowed_origins ("),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, text, environ, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert message.format(file=path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_allowed_origins_are_checked_and_normalised(tmp_path):
    text = (
        "websocket:\n  allowed_origins: ['*', 'HTTPS://App.Example:443', 'http://[::1]:8080',"
        " 'capacitor://localhost', 'http://b.example:80', 'https://c.example:8443']\n"
    )
    loaded = load_config(write(tmp_path, text), environ={})
    assert loaded.config.websocket.allowed_origins == [
        "*",
        "https://app.example",
        "http://[::1]:8080",
        "capacitor://localhost",
        "http://b.example",
        "https://c.example:8443",
    ]


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"), environ={})


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "keys.txt").write_text("# comment\n\nkey-one-0123456789\nkey-two-0123456789\n")
    (tmp_path / "sub.token").write_text("subscriber-token\n")
    (tmp_path / "backend.token").write_text("backend-secret\n")
    path = write(
        tmp_path,
        "storage: {url: 'sqlite:///db/x.sqlite3'}\n"
        "google: {service_account_file: sa.json}\n"
        "auth:\n  api_keys_file: keys.txt\n  api_keys: [key-inline-0123456789]\n"
        "  subscribers: [{token_file: sub.token, calendars: [a@b]}, {token: t2}]\n"
        "backend: {token_file: backend.token}\n",
    )
    loaded = load_config(path, environ={})
    assert loaded.config.storage.url == f"sqlite:///{tmp_path}/db/x.sqlite3"
    assert loaded.config.google.service_account_file == str(tmp_path / "sa.json")
    assert loaded.config.server.state_dir == str(tmp_path / "var")
    assert loaded.secrets.api_keys == (
        "key-inline-0123456789",
        "key-one-0123456789",
        "key-two-0123456789",
    )
    assert [(s.token, s.calendars) for s in loaded.secrets.subscribers] == [
        ("subscriber-token", ("a@b",)),
        ("t2", ("*",)),
    ]
    assert loaded.secrets.backend_token == "backend-secret"


def test_absolute_sqlite_path_is_kept(tmp_path):
    path = write(tmp_path, "storage: {url: 'sqlite:////srv/mrm/db.sqlite3'}\n")
    assert load_config(path, environ={}).config.storage.url == "sqlite:////srv/mrm/db.sqlite3"


def test_secrets_are_masked_when_shown(tmp_path):
    path = write(
        tmp_path,
        "auth:\n  api_keys: [very-secret-key-0123456789]\n  metrics_token: metrics-secret\n"
        "  subscribers: [{token: sub-secret}]\n"
        "backend: {token: backend-secret, url: 'https://user:pw@api.example/graphql'}\n"
        "storage: {url: 'mongodb://admin:mongo-pw@db.example:27017/mrm'}\n",
    )
    text = "\n".join(describe(load_config(path, environ={})))
    for secret in ("very-secret-key", "metrics-secret", "sub-secret", "backend-secret", "pw"):
        assert secret not in text
    assert "storage.url = mongodb://********@db.example:27017/mrm" in text
    assert "backend.url = https://********@api.example/graphql" in text


def test_warnings_about_public_url_and_missing_credentials():
    plain = load_config(None, environ={"MRM_PUSH__SERVER__PUBLIC_URL": "http://push.example"})
    found = [str(w) for w in warnings(plain)]
    assert any("server.public_url" in w and "https" in w for w in found)
    assert "google.service_account_file: not set; channels cannot be made" in found
    loopback = load_config(None, environ={"MRM_PUSH__SERVER__PUBLIC_URL": "http://localhost:8"})
    assert not any(w.key == "server.public_url" for w in warnings(loopback))
    secure = load_config(None, environ={"MRM_PUSH__SERVER__PUBLIC_URL": "https://push.example"})
    assert not any(w.key == "server.public_url" for w in warnings(secure))


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8080, "http://127.0.0.1:8080"),
        ("0.0.0.0", 9000, "http://127.0.0.1:9000"),
        ("::", 9000, "http://127.0.0.1:9000"),
        ("", 9000, "http://127.0.0.1:9000"),
        ("::1", 8080, "http://[::1]:8080"),
        ("push.example", 80, "http://push.example:80"),
    ],
)
def test_public_url_follows_host_and_port_when_unset(host, port, url):
    assert local_url(host, port) == url
    environ = {"MRM_PUSH__SERVER__HOST": repr(host), "MRM_PUSH__SERVER__PORT": str(port)}
    server = load_config(None, environ=environ).config.server
    assert public_url(server) == url
    assert public_url(server, 4321) == url.rsplit(":", 1)[0] + ":4321"  # the port bound for 0
    set_ = load_config(None, environ={**environ, "MRM_PUSH__SERVER__PUBLIC_URL": "https://x.y/"})
    assert public_url(set_.config.server, 4321) == "https://x.y"


def test_a_loopback_public_url_with_the_real_google_is_a_warning(tmp_path):
    environ = {"MRM_PUSH__GOOGLE__SERVICE_ACCOUNT_FILE": "sa.json", "MRM_PUSH__SERVER__PORT": "0"}
    found = {w.key: w.reason for w in warnings(load_config(None, environ=environ), port=4321)}
    assert found["server.public_url"].startswith(
        "http://127.0.0.1:4321 (not set: made from host and port) is a loopback address"
    )


def test_readme_reference_is_in_step_with_the_schema():
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", readme, re.S
    )
    assert match, "README.md lacks the config-reference markers"
    assert match.group(1).splitlines() == reference(), (
        "README.md's configuration reference differs from the schema: "
        "run `python -m daemon.configfile` and paste its output between the markers"
    )


def test_a_bad_value_is_shown_but_never_a_secret_or_a_password(tmp_path):
    path = write(tmp_path, "auth:\n  metrics_token: 12345678\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "12345678" not in str(caught.value)
    environ = {"MRM_PUSH__STORAGE__URL": "postgres://admin:hunter2@db/x"}
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=environ)
    assert "hunter2" not in str(caught.value)
    assert "(got 'postgres://********@db/x')" in str(caught.value)
