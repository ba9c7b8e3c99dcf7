"""Loading the configuration: defaults, then the YAML file, then MRM_PUSH__SECTION__KEY."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from daemon.config import REPLACED_KEYS, SECTIONS, Config, Section

ENV_PREFIX = "MRM_PUSH__"
MASK = "********"


class ConfigError(Exception):
    """One line naming the key and the reason; the start stops with exit code 2."""


@dataclass(frozen=True)
class Subscriber:
    token: str
    calendars: tuple[str, ...]


@dataclass(frozen=True)
class Secrets:
    """Secrets gathered from the config and the `*_file` keys, kept out of `Config`'s display."""

    api_keys: tuple[str, ...] = ()
    metrics_token: str | None = None
    backend_token: str | None = None
    subscribers: tuple[Subscriber, ...] = ()


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    secrets: Secrets
    path: Path | None  # the file read, None when running on defaults
    sources: dict[str, str] = field(default_factory=dict)  # "section.key" → where it came from


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, merge, check and resolve; raises ConfigError with one line on any problem."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_path = Path(path).resolve() if path else None
    if file_path is not None:
        raw = _read_yaml(file_path)
        for section, values in raw.items():
            for name in values if isinstance(values, dict) else ():
                sources[f"{section}.{name}"] = "file"
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{name}: not of the form MRM_PUSH__SECTION__KEY")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{name}: not a YAML value ({_first_line(error)})") from None
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"{parts[0]}: must be a mapping of keys")
        section[parts[1]] = value
        sources[".".join(parts)] = f"environment ({name})"
    config = _validate(raw, sources)
    base = file_path.parent if file_path else Path.cwd()
    config = _resolve_paths(config, base)
    return LoadedConfig(config, _read_secrets(config), file_path, sources)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, not {type(data).__name__}")
    for section, values in data.items():
        if section in SECTIONS and not isinstance(values, dict | None):
            raise ConfigError(f"{section}: must be a mapping of keys")
    return {section: values or {} for section, values in data.items()}


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _validate(raw: dict[str, Any], sources: dict[str, str]) -> Config:
    for dotted, replacement in REPLACED_KEYS.items():
        section, name = dotted.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            where = sources.get(dotted, "file")
            raise ConfigError(f"{dotted}: {replacement} (set in the {where})")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{where}: unknown key") from None
        got = first.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        reason = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {reason}{shown}") from None


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(value: str) -> str:
        return str(base / value) if not os.path.isabs(value) else value

    def section_paths(section: Section) -> Section:
        updates: dict[str, Any] = {}
        for name, info in type(section).model_fields.items():
            extra = info.json_schema_extra
            value = getattr(section, name)
            if isinstance(extra, dict) and extra.get("path") and isinstance(value, str):
                updates[name] = resolve(value)
        return section.model_copy(update=updates)

    updates: dict[str, Any] = {name: section_paths(getattr(config, name)) for name in SECTIONS}
    url = config.storage.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        updates["storage"] = updates["storage"].model_copy(
            update={"url": "sqlite:///" + resolve(url[len("sqlite:///") :])}
        )
    updates["auth"] = updates["auth"].model_copy(
        update={"subscribers": [section_paths(s) for s in config.auth.subscribers]}
    )
    return config.model_copy(update=updates)


def _read_secret_file(where: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{where}: cannot read {path} ({error.strerror})") from None


def _one_secret(where: str, value: str | None, path: str | None) -> str | None:
    if path is None:
        return value
    text = _read_secret_file(where, path).strip()
    if not text:
        raise ConfigError(f"{where}: {path} is empty")
    return text


def _read_secrets(config: Config) -> Secrets:
    auth = config.auth
    keys = list(auth.api_keys)
    if auth.api_keys_file:
        text = _read_secret_file("auth.api_keys_file", auth.api_keys_file)
        keys += [line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    for api_key in keys:
        if len(api_key) < 16:
            raise ConfigError("auth.api_keys: every key needs 16 characters or more")
    subscribers = []
    for index, sub in enumerate(auth.subscribers):
        where = f"auth.subscribers.{index}.token_file"
        token = _one_secret(where, sub.token, sub.token_file)
        assert token is not None  # the schema asks for exactly one of token and token_file
        subscribers.append(Subscriber(token, tuple(sub.calendars)))
    return Secrets(
        api_keys=tuple(dict.fromkeys(keys)),
        metrics_token=_one_secret(
            "auth.metrics_token_file", auth.metrics_token, auth.metrics_token_file
        ),
        backend_token=_one_secret(
            "backend.token_file", config.backend.token, config.backend.token_file
        ),
        subscribers=tuple(subscribers),
    )


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warnings(config: Config) -> list[str]:
    """What check-config says beside the values."""
    found = []
    public_url = config.server.public_url
    if not public_url.startswith("https://") and not is_loopback_url(public_url):
        found.append(
            f"server.public_url: {public_url} is not https://; Google only calls https:// webhooks"
        )
    if not config.google.service_account_file:
        found.append("google.service_account_file: not set; channels cannot be made")
    if not config.fcm.service_account_file:
        found.append("fcm.service_account_file: not set; tablets cannot be reached")
    return found


def describe(loaded: LoadedConfig) -> list[str]:
    """Every effective key, secrets masked, with where its value came from."""
    lines = []
    for section_name in SECTIONS:
        section = getattr(loaded.config, section_name)
        for name, info in type(section).model_fields.items():
            dotted = f"{section_name}.{name}"
            value = getattr(section, name)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("secret") and value:
                value = MASK if isinstance(value, str) else [MASK] * len(value)
            if dotted == "auth.subscribers":
                value = [_masked_subscriber(sub.model_dump()) for sub in value]
            if dotted in ("backend.url", "storage.url") and value:
                value = _without_userinfo(value)
            shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{dotted} = {shown}  # {loaded.sources.get(dotted, 'default')}")
    return lines


def _masked_subscriber(sub: dict[str, Any]) -> dict[str, Any]:
    return {k: (MASK if k == "token" and v else v) for k, v in sub.items() if v is not None}


def _without_userinfo(url: str) -> str:
    """A URL's user and password (a MongoDB URI may hold them) replaced by the mask."""
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}://{MASK}@{authority.rsplit('@', 1)[1]}{slash}{tail}"


def reference() -> list[str]:
    """The README's configuration table, made from the schema (a test keeps them in step)."""
    rows = ["| key | default | unit | meaning |", "|---|---|---|---|"]
    for section_name, section in SECTIONS.items():
        for name, info in section.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            default = info.default
            shown = "none" if default is None else json_dumps(default)
            rows.append(
                f"| `{section_name}.{name}` | `{shown}` | {extra.get('unit', '')} "
                f"| {info.description} |"
            )
    return rows


def json_dumps(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


if __name__ == "__main__":
    print("\n".join(reference()))
