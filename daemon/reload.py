"""SIGHUP: `auth.*` and `logging.level` re-read from the same config file, without a restart.

The whole configuration is read and checked as at start (the same file, the same environment,
the key files opened); a reload that fails keeps every old setting and logs one ERROR line
with the reason. Only the authentication settings and the log level take effect; any other key
whose value changed is named in a WARNING ("needs a restart"). API keys, the metrics token and
`auth.legacy_allow_from` count from the next request on (open connections stay); a WebSocket
whose subscriber token is gone is closed with 1008 "token revoked", and one subscribed to a
calendar its token may no longer see with 1008 "calendars revoked" (the client reconnects and
subscribes again: the forbidden ones then get `forbidden_calendar`). The log redactor learns
the new secrets and keeps the old ones until the process ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from daemon.config import SECTIONS
from daemon.configcheck import key_file_errors
from daemon.configfile import ConfigError, LoadedConfig, Subscriber, load_config
from daemon.fanout import FanoutHub
from daemon.logs import protect
from daemon.redact import configured_secrets
from daemon.sdnotify import SdNotifier
from handlers.websocket import TOKEN_REVOKED, find_subscriber

if TYPE_CHECKING:
    from daemon.app import Service

log = logging.getLogger(__name__)

RELOADED_SECTIONS = ("auth", "logging")
CALENDARS_REVOKED = "calendars revoked"
POLICY_VIOLATION = 1008


@dataclass(frozen=True)
class Candidate:
    """A configuration read and checked for a reload, and the secrets it names."""

    loaded: LoadedConfig
    secrets: list[str]


def read_candidate(
    loaded: LoadedConfig, adapt: Callable[[LoadedConfig], LoadedConfig]
) -> Candidate:
    """The running configuration's file read again, checked as `serve` checks it at start;
    ConfigError (naming the key and its origin) when it would not start. Blocking: file reads
    and google-auth loading the key files."""
    fresh = adapt(load_config(str(loaded.path) if loaded.path else None))
    errors = key_file_errors(fresh)
    if errors:
        raise errors[0]
    return Candidate(fresh, configured_secrets(fresh))


def needs_restart(running: LoadedConfig, fresh: LoadedConfig) -> list[str]:
    """The keys outside auth.* and logging.* whose value differs from the running one."""
    changed = []
    for section in SECTIONS:
        if section in RELOADED_SECTIONS:
            continue
        old, new = getattr(running.config, section), getattr(fresh.config, section)
        changed += [
            f"{section}.{name}"
            for name in type(old).model_fields
            if getattr(old, name) != getattr(new, name)
        ]
    if running.secrets.backend_token != fresh.secrets.backend_token:
        # The same backend.token_file path with a new token in it.
        if not {"backend.token", "backend.token_file"} & set(changed):
            changed.append("backend.token_file")
    return changed


def revoke_sockets(hub: FanoutHub, subscribers: tuple[Subscriber, ...]) -> tuple[int, int]:
    """Each open socket checked against the new subscribers: closed (1008) when its token is
    gone or it holds a subscription the token may no longer see; otherwise it goes on with the
    token's new calendars. Returns (closed: token revoked, closed: calendars revoked)."""
    tokens = calendars = 0
    for client in list(hub.clients):
        if client.closing or client.subscriber is None:
            continue
        subscriber = find_subscriber(client.subscriber.token, subscribers)
        if subscriber is None:
            hub.close(client, POLICY_VIOLATION, TOKEN_REVOKED)
            tokens += 1
        elif "*" not in subscriber.calendars and (
            client.wildcard or not client.calendars <= set(subscriber.calendars)
        ):
            hub.close(client, POLICY_VIOLATION, CALENDARS_REVOKED)
            calendars += 1
        else:
            client.subscriber = subscriber
    return tokens, calendars


def apply(service: Service, candidate: Candidate) -> None:
    """Take auth.* and logging.level from the candidate; log what changed."""
    running, fresh = service.loaded, candidate.loaded
    protect(candidate.secrets)  # before any line could show a new secret
    config = running.config.model_copy(
        update={section: getattr(fresh.config, section) for section in RELOADED_SECTIONS}
    )
    secrets_ = replace(
        running.secrets,
        api_keys=fresh.secrets.api_keys,
        metrics_token=fresh.secrets.metrics_token,
        subscribers=fresh.secrets.subscribers,
    )
    stale = needs_restart(running, fresh)
    auth_sources = {
        key: source
        for key, source in fresh.sources.items()
        if key.split(".")[0] in RELOADED_SECTIONS
    }
    sources = {
        **{k: v for k, v in running.sources.items() if k.split(".")[0] not in RELOADED_SECTIONS},
        **auth_sources,
    }
    service.loaded = replace(running, config=config, secrets=secrets_, sources=sources)
    service.config = config
    service.secrets = secrets_
    revoked, narrowed = revoke_sockets(service.fanout, secrets_.subscribers)
    root = logging.getLogger()
    level = logging.getLevelName(config.logging.level.upper())
    # The line is written at the more verbose of the two levels: seen whichever way it went.
    root.setLevel(min(root.level, level))
    log.info(
        "config_reloaded",
        extra={
            "api_keys": len(secrets_.api_keys),
            "subscribers": len(secrets_.subscribers),
            "sockets_revoked": revoked,
            "sockets_calendars_revoked": narrowed,
            "logging_level": config.logging.level,
        },
    )
    root.setLevel(level)
    if stale:
        log.warning(
            "config_reload_needs_restart",
            extra={"keys": stale, "reason": "changed in the file, kept until a restart"},
        )


class Reloader:
    """Runs the reloads SIGHUP asks for, one at a time (signals during one make one more)."""

    def __init__(
        self,
        service: Service,
        notifier: SdNotifier,
        adapt: Callable[[LoadedConfig], LoadedConfig] | None = None,
        requested: asyncio.Event | None = None,
    ) -> None:
        self.service = service
        self.notifier = notifier
        # `serve --emulator` points the fresh config at its emulator again.
        self.adapt = adapt or (lambda loaded: loaded)
        self.requested = requested or asyncio.Event()

    def request(self) -> None:
        """The signal handler: only a flag; the reload runs on the loop."""
        self.requested.set()

    async def run(self) -> None:
        while True:
            await self.requested.wait()
            self.requested.clear()
            await self.reload()

    async def reload(self) -> bool:
        """One reload: RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload wants), read,
        check, apply, READY=1. False, with an ERROR line, when the old settings are kept."""
        usec = time.monotonic_ns() // 1000
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            candidate = await asyncio.to_thread(read_candidate, self.service.loaded, self.adapt)
            apply(self.service, candidate)
            return True
        except ConfigError as error:
            log.error("config_reload_failed", extra={"reason": str(error)})
            return False
        except Exception as error:  # unforeseen: the service runs on with what it had
            log.exception("config_reload_failed", extra={"reason": f"{type(error).__name__}"})
            return False
        finally:
            self.notifier.notify("READY=1")
