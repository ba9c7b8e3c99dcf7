"""What check-config and serve say about a configuration beyond what its schema checks.

Warnings, the key files opened as the service will open them, and the config errors that
the key files and the store's URL make at start."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from daemon.configfile import ConfigError, LoadedConfig, is_loopback_url, public_url
from storage.base import StoreConfigError

GOOGLE_CALENDAR_ENDPOINT = "https://www.googleapis.com/"


@dataclass(frozen=True)
class Problem:
    """A warning about one key: the service runs, but probably not as meant."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def warnings(loaded: LoadedConfig, port: int | None = None) -> list[Problem]:
    """What check-config prints beside the values and serve logs at start (`port`: the bound
    one, when server.port is 0)."""
    config = loaded.config
    found = []
    url = public_url(config.server, port)
    if not url.startswith("https://") and not is_loopback_url(url):
        found.append(
            Problem("server.public_url", f"{url} is not https://; Google only calls https://")
        )
    if (
        config.google.service_account_file
        and config.google.calendar_endpoint.startswith(GOOGLE_CALENDAR_ENDPOINT)
        and is_loopback_url(url)
    ):
        unset = "" if config.server.public_url else " (not set: made from host and port)"
        found.append(
            Problem(
                "server.public_url",
                f"{url}{unset} is a loopback address Google cannot call; "
                "set it to the https:// URL of the proxy in front",
            )
        )
    if not config.google.service_account_file:
        found.append(Problem("google.service_account_file", "not set; channels cannot be made"))
    if not config.fcm.service_account_file:
        found.append(Problem("fcm.service_account_file", "not set; tablets cannot be reached"))
    if not loaded.secrets.api_keys:
        found.append(
            Problem(
                "auth.api_keys",
                "no API key is set (auth.api_keys or auth.api_keys_file); "
                "nobody can call the management API",
            )
        )
    for key, path in _key_files(loaded):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # key_file_errors says so
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(
                Problem(key, f"{path} can be read by other users (mode {mode & 0o777:o}); use 0600")
            )
    return found


def _key_files(loaded: LoadedConfig) -> list[tuple[str, str]]:
    keys = []
    for section in ("google", "fcm"):
        path = getattr(loaded.config, section).service_account_file
        if path:
            keys.append((f"{section}.service_account_file", path))
    return keys


def key_file_errors(loaded: LoadedConfig) -> list[ConfigError]:
    """Every service-account key file opened, parsed and loaded by google-auth, as the
    service does at start or at its first call; each problem names the key and its origin."""
    errors = []
    for key, path in _key_files(loaded):
        try:
            info = read_service_account(key, path)
            if key == "fcm.service_account_file" and not loaded.config.fcm.project_id:
                if not isinstance(info.get("project_id"), str) or not info["project_id"]:
                    raise ConfigError(
                        "not set, and the key file names no project_id", key="fcm.project_id"
                    )
        except ConfigError as error:
            errors.append(loaded.locate(error))
    return errors


def read_service_account(key: str, path: str) -> dict[str, Any]:
    """The key file's content, checked to be a service-account key google-auth can sign with;
    ConfigError naming `key` otherwise."""
    from google.auth.exceptions import GoogleAuthError  # only when there is a key to check
    from google.oauth2 import service_account

    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as error:
        raise ConfigError(f"cannot read {path} ({error.strerror})", key=key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not JSON (not UTF-8 text)", key=key) from None
    try:
        info = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{path} is not JSON ({error})", key=key) from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"{path} is not a service-account key (type: {kind!s})", key=key)
    try:
        service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
    except (ValueError, GoogleAuthError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(
            f"{path} is not a usable service-account key ({reason})", key=key
        ) from None
    return info


def fcm_project_id(key_file: str) -> str:
    """The Firebase project of a service-account key, when fcm.project_id does not say."""
    try:
        with open(key_file, encoding="utf-8") as stream:
            project_id = json.load(stream).get("project_id")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"cannot use {key_file} ({error})", key="fcm.service_account_file"
        ) from None
    if not isinstance(project_id, str) or not project_id:
        raise ConfigError("not set, and the key file names no project_id", key="fcm.project_id")
    return project_id


def store_config_error(error: StoreConfigError) -> ConfigError:
    """A store that can never work as configured, as the config error it is: the stores say
    "storage.url: ..." (or "storage.mongo_driver: ...", or "storage: <path> ...")."""
    text = str(error)
    for key in ("storage.url", "storage.mongo_driver"):
        if text.startswith(key + ": "):
            return ConfigError(text[len(key) + 2 :], key=key)
    return ConfigError(text.removeprefix("storage: "), key="storage.url")
