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

from daemon.config import REPLACED_KEYS, SECTIONS, Config, Section, Server
from daemon.credentials import CredentialError, credential_path, is_credential

ENV_PREFIX = "MRM_PUSH__"
MASK = "********"


class ConfigError(Exception):
    """One line naming the key, where its value came from, and the reason; exit code 2.

    `key` is the dotted key ("storage.url"), None when the problem is the file itself;
    `origin` the file's path, the environment variable, or "default" (see `origin_of`).
    """

    def __init__(self, reason: str, *, key: str | None = None, origin: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key
        self.origin = origin

    def at(self, origin: str) -> ConfigError:
        """The same error, saying where the key's value came from."""
        return ConfigError(self.reason, key=self.key, origin=origin)

    def __str__(self) -> str:
        if self.key is None:
            return self.reason
        where = f" ({self.origin})" if self.origin else ""
        return f"{self.key}{where}: {self.reason}"


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
    # "section.key" → the `credential:NAME` it was given as (the config holds the path)
    credentials: dict[str, str] = field(default_factory=dict)

    def origin(self, key: str) -> str:
        """Where a key's value came from, for an error line (see `origin_of`)."""
        return origin_of(key, self.sources, self.path)

    def locate(self, error: ConfigError) -> ConfigError:
        """`error` naming where its key came from (unless it says so already)."""
        if error.key is None or error.origin is not None:
            return error
        return error.at(self.origin(error.key))


def origin_of(key: str, sources: Mapping[str, str], path: Path | None) -> str:
    """The environment variable that set `key`, the config file's path, or "default"; a
    sub-key (auth.subscribers.0.token) is looked up by its section.key."""
    parts = key.split(".")
    source = sources.get(".".join(parts[:2]))
    if source is None and len(parts) == 1:  # a whole section (an unknown one, say)
        source = next((s for k, s in sources.items() if k.startswith(key + ".")), None)
    if source is None:
        return "default"
    if source.startswith("environment (") and source.endswith(")"):
        return source[len("environment (") : -1]
    return str(path) if source == "file" and path is not None else source


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, merge, check and resolve; raises ConfigError with one line on any problem."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_path = Path(path).resolve() if path else None
    if file_path is not None:
        raw = _read_yaml(file_path)
        for section, values in raw.items():
            sources[section] = "file"  # an unknown section's error names the file
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
            where = str(file_path) if file_path else name
            raise ConfigError("must be a mapping of keys", key=parts[0], origin=where)
        section[parts[1]] = value
        sources[".".join(parts)] = f"environment ({name})"
    try:
        config = _validate(raw)
        base = file_path.parent if file_path else Path.cwd()
        credentials: dict[str, str] = {}
        config = _resolve_paths(config, base, environ, credentials)
        secrets_ = _read_secrets(config)
    except ConfigError as error:
        if error.key is None:
            raise
        raise error.at(origin_of(error.key, sources, file_path)) from None
    return LoadedConfig(config, secrets_, file_path, sources, credentials)


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
            raise ConfigError("must be a mapping of keys", key=section, origin=str(path))
    return {section: values or {} for section, values in data.items()}


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _validate(raw: dict[str, Any]) -> Config:
    for dotted, replacement in REPLACED_KEYS.items():
        section, name = dotted.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raise ConfigError(replacement, key=dotted)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError("unknown key", key=where) from None
        shown = _shown(where, first.get("input"))
        reason = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{reason}{shown}", key=where) from None


def _shown(where: str, got: Any) -> str:
    """The wrong value, for the error line; never a secret, never a URL's password."""
    section, _, name = where.partition(".")
    schema = SECTIONS.get(section)
    info = schema.model_fields.get(name.split(".")[0]) if schema else None
    extra = info.json_schema_extra if info and isinstance(info.json_schema_extra, dict) else {}
    if isinstance(got, dict) or extra.get("secret"):
        return ""
    if isinstance(got, str) and "@" in got:
        got = _without_userinfo(got)
    return f" (got {got!r})"


def _resolve_paths(
    config: Config, base: Path, environ: Mapping[str, str], credentials: dict[str, str]
) -> Config:
    """Relative paths made absolute (relative to the config file), and `credential:NAME` in a
    `*_file` key made $CREDENTIALS_DIRECTORY/NAME (noted in `credentials`, dotted key → value)."""

    def resolve(value: str) -> str:
        return str(base / value) if not os.path.isabs(value) else value

    def resolve_key(dotted: str, value: str) -> str:
        if not is_credential(value):
            return resolve(value)
        if not dotted.endswith("_file"):
            raise ConfigError(f"{value}: only *_file keys name credentials", key=dotted)
        try:
            path = credential_path(value, environ)
        except CredentialError as error:
            raise ConfigError(str(error), key=dotted) from None
        credentials[dotted] = value
        return path

    def section_paths(prefix: str, section: Section) -> Section:
        updates: dict[str, Any] = {}
        for name, info in type(section).model_fields.items():
            extra = info.json_schema_extra
            value = getattr(section, name)
            if isinstance(extra, dict) and extra.get("path") and isinstance(value, str):
                updates[name] = resolve_key(f"{prefix}.{name}", value)
        return section.model_copy(update=updates)

    updates: dict[str, Any] = {
        name: section_paths(name, getattr(config, name)) for name in SECTIONS
    }
    url = config.storage.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        updates["storage"] = updates["storage"].model_copy(
            update={"url": "sqlite:///" + resolve(url[len("sqlite:///") :])}
        )
    subscribers = [
        section_paths(f"auth.subscribers.{index}", subscriber)
        for index, subscriber in enumerate(config.auth.subscribers)
    ]
    updates["auth"] = updates["auth"].model_copy(update={"subscribers": subscribers})
    return config.model_copy(update=updates)


def _read_secret_file(where: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path} ({error.strerror})", key=where) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text", key=where) from None


def _one_secret(where: str, value: str | None, path: str | None) -> str | None:
    if path is None:
        return value
    text = _read_secret_file(where, path).strip()
    if not text:
        raise ConfigError(f"{path} is empty", key=where)
    return text


def _read_secrets(config: Config) -> Secrets:
    auth = config.auth
    keys = list(auth.api_keys)
    if auth.api_keys_file:
        text = _read_secret_file("auth.api_keys_file", auth.api_keys_file)
        keys += [line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    for api_key in keys:
        if len(api_key) < 16:
            where = "auth.api_keys_file" if api_key not in auth.api_keys else "auth.api_keys"
            raise ConfigError("every key needs 16 characters or more", key=where)
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


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - names, not binds


def local_url(host: str, port: int) -> str:
    """`http://<host>:<port>` to reach a server listening there from this machine: 127.0.0.1
    for a wildcard host, brackets around an IPv6 address."""
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def public_url(server: Server, port: int | None = None) -> str:
    """`server.public_url`, or when unset the service's own address (`port`: the port actually
    bound, which is what counts when server.port is 0)."""
    if server.public_url:
        return server.public_url
    return local_url(server.host, server.port if port is None else port)


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
            source = loaded.sources.get(dotted, "default")
            if dotted in loaded.credentials:
                source = f"{source}, {loaded.credentials[dotted]}"
            if dotted == "server.public_url" and value is None:
                value, source = public_url(loaded.config.server), "default: from host and port"
            shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{dotted} = {shown}  # {source}")
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
