"""Running the emulator: alone (`mrm-push emulator`) or beside the service (`serve --emulator`)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from daemon.configfile import LoadedConfig, Subscriber
from daemon.emulator.app import Emulator
from daemon.emulator.fcm import FcmEmulator

log = logging.getLogger(__name__)

PROJECT_ID = "mrm-push-emulator"


@dataclass(frozen=True)
class DemoFiles:
    """What `serve --emulator` leaves in the state directory for a newcomer."""

    key_file: Path
    api_key_file: Path
    subscriber_token_file: Path
    api_key: str
    subscriber_token: str


def start_emulator(host: str = "127.0.0.1", port: int = 0) -> Emulator:
    """The Google and FCM emulator on the running loop, with its own key-file trust."""
    emulator = Emulator()
    emulator.fcm = FcmEmulator(emulator.oauth, emulator.clock, project_id=PROJECT_ID)
    emulator.start(host, port)
    return emulator


def _secret_file(path: Path) -> str:
    """Read the secret kept in `path`, or make one there, readable by the owner only."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(value + "\n")
    return value


def write_key_file(emulator: Emulator, state_dir: Path) -> Path:
    """A new service-account key in the state directory, trusted by this emulator run only."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file = state_dir / "emulator-service-account.json"
    key_file.unlink(missing_ok=True)
    emulator.write_service_account(str(key_file), project_id=PROJECT_ID)
    return key_file


def prepare_demo(emulator: Emulator, state_dir: Path) -> DemoFiles:
    """Write the key file (trusted by this emulator run), an API key and a subscriber token."""
    key_file = write_key_file(emulator, state_dir)
    api_key_file = state_dir / "emulator-api-key"
    subscriber_file = state_dir / "emulator-subscriber-token"
    return DemoFiles(
        key_file,
        api_key_file,
        subscriber_file,
        _secret_file(api_key_file),
        _secret_file(subscriber_file),
    )


def with_emulator(loaded: LoadedConfig, emulator: Emulator, demo: DemoFiles) -> LoadedConfig:
    """The configuration pointed at the emulator, with the demo's API key and subscriber."""
    config = loaded.config
    google = config.google.model_copy(
        update={
            "service_account_file": str(demo.key_file),
            "calendar_endpoint": emulator.calendar_endpoint,
        }
    )
    fcm = config.fcm.model_copy(
        update={
            "service_account_file": str(demo.key_file),
            "project_id": PROJECT_ID,
            "endpoint": emulator.base_url,
        }
    )
    secrets_ = replace(
        loaded.secrets,
        api_keys=(*loaded.secrets.api_keys, demo.api_key),
        subscribers=(*loaded.secrets.subscribers, Subscriber(demo.subscriber_token, ("*",))),
    )
    return replace(
        loaded,
        config=config.model_copy(update={"google": google, "fcm": fcm}),
        secrets=secrets_,
    )


def demo_instructions(service_url: str, emulator: Emulator, demo: DemoFiles) -> str:
    calendar = "room-1@resource.calendar.google.com"
    key = f'"Authorization: Bearer $(cat {demo.api_key_file})"'
    return "\n".join(
        [
            "mrm-push is running against the built-in Google/FCM emulator (nothing leaves",
            "this machine). Files written, readable only by you:",
            f"  Google/FCM key file: {demo.key_file}",
            f"  API key:             {demo.api_key_file}",
            f"  subscriber token:    {demo.subscriber_token_file}",
            "Try:",
            f"  curl -X PUT -H {key} -H 'Content-Type: application/json' \\",
            '       -d \'{"firebase_tokens": ["demo-tablet-token"]}\' \\',
            f"       {service_url}/v1/rooms/{calendar}",
            f"  curl -H {key} {service_url}/v1/channels",
            "  curl -X POST -H 'Content-Type: application/json' \\",
            '       -d \'{"summary": "Standup"}\' \\',
            f"       {emulator.base_url}/emulator/google/calendars/{calendar}/events",
            f"  curl '{emulator.base_url}/emulator/fcm/messages?token=demo-tablet-token'",
            f"  curl -X POST -d '{{\"advance\": 604800}}' {emulator.base_url}/emulator/clock",
            "",
        ]
    )


async def run_emulator(host: str, port: int, loaded: LoadedConfig) -> int:
    """`mrm-push emulator`: serve only the emulator until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    emulator = start_emulator(host, port)
    key_file = write_key_file(emulator, Path(loaded.config.server.state_dir))
    print(
        f"emulator on {emulator.base_url}\n"
        f"  key file (token_uri points here): {key_file}\n"
        f"  google.calendar_endpoint: {emulator.calendar_endpoint}\n"
        f"  fcm.endpoint: {emulator.base_url}   fcm.project_id: {PROJECT_ID}",
        flush=True,
    )
    log.info("emulator_listening", extra={"url": emulator.base_url})
    await stop.wait()
    emulator.stop()
    return 0
