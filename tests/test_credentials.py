"""systemd credentials: a `*_file` key set to `credential:NAME` names $CREDENTIALS_DIRECTORY/NAME
(what `LoadCredential=NAME:/path` puts there), resolved at load, shown by check-config."""

from __future__ import annotations

import pytest

from daemon.configfile import ConfigError, describe, load_config
from tests.test_cli import run_cli


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def credentials(tmp_path):
    """A credentials directory as systemd makes it (here: a plain directory)."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "api-keys").write_text("# rotated 2026-01\nkey-from-credential-0123456789\n")
    (directory / "subscriber").write_text("subscriber-from-credential\n")
    (directory / "metrics").write_text("metrics-from-credential\n")
    (directory / "backend").write_text("backend-from-credential\n")
    return directory


CONFIG = (
    "auth:\n"
    "  api_keys_file: credential:api-keys\n"
    "  metrics_token_file: credential:metrics\n"
    "  subscribers: [{token_file: credential:subscriber, calendars: ['*']}]\n"
    "backend: {token_file: credential:backend}\n"
)


def test_a_credential_names_a_file_in_the_credentials_directory(tmp_path, credentials):
    loaded = load_config(
        write(tmp_path, CONFIG), environ={"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    assert loaded.config.auth.api_keys_file == str(credentials / "api-keys")
    assert loaded.config.auth.subscribers[0].token_file == str(credentials / "subscriber")
    assert loaded.secrets.api_keys == ("key-from-credential-0123456789",)
    assert loaded.secrets.subscribers[0].token == "subscriber-from-credential"
    assert loaded.secrets.metrics_token == "metrics-from-credential"
    assert loaded.secrets.backend_token == "backend-from-credential"


def test_check_config_shows_where_a_credential_resolved(tmp_path, credentials):
    loaded = load_config(
        write(tmp_path, CONFIG), environ={"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    lines = describe(loaded)
    assert f"auth.api_keys_file = {credentials}/api-keys  # file, credential:api-keys" in lines


def test_a_credential_from_the_environment(tmp_path, credentials):
    loaded = load_config(
        None,
        environ={
            "CREDENTIALS_DIRECTORY": str(credentials),
            "MRM_PUSH__AUTH__API_KEYS_FILE": "credential:api-keys",
        },
    )
    assert loaded.secrets.api_keys == ("key-from-credential-0123456789",)


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            "auth: {api_keys_file: 'credential:api-keys'}\n",
            {},
            "auth.api_keys_file ({file}): credential:api-keys needs $CREDENTIALS_DIRECTORY, "
            "which is not set (systemd sets it for a unit with LoadCredential=api-keys:FILE)",
        ),
        (
            "auth: {api_keys_file: 'credential:absent'}\n",
            "credentials",
            "auth.api_keys_file ({file}): credential:absent: no such credential in "
            "{credentials} (the unit needs LoadCredential=absent:FILE)",
        ),
        (
            "auth: {subscribers: [{token_file: 'credential:absent'}]}\n",
            "credentials",
            "auth.subscribers.0.token_file ({file}): credential:absent: no such credential",
        ),
        (
            "google: {service_account_file: 'credential:../etc/passwd'}\n",
            "credentials",
            "google.service_account_file ({file}): credential:../etc/passwd: a credential "
            "name is a file name",
        ),
        (
            "server: {state_dir: 'credential:state'}\n",
            "credentials",
            "server.state_dir ({file}): credential:state: only *_file keys name credentials",
        ),
    ],
)
def test_a_credential_that_cannot_be_found_is_a_config_error(
    tmp_path, credentials, text, environ, message
):
    path = write(tmp_path, text)
    env = {"CREDENTIALS_DIRECTORY": str(credentials)} if environ == "credentials" else environ
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=env)
    assert str(caught.value).startswith(message.format(file=path, credentials=credentials))


def test_serve_stops_with_exit_2_naming_the_credential(tmp_path):
    path = write(tmp_path, "server: {port: 0}\nauth: {api_keys_file: 'credential:api-keys'}\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    result = run_cli("serve", "--config", path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mrm-push: config: auth.api_keys_file ({path}): credential:api-keys: no such "
        f"credential in {tmp_path} (the unit needs LoadCredential=api-keys:FILE)"
    )
