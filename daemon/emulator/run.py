"""Running the emulator: alone (`mrm-push emulator`) or beside the service (`serve --emulator`)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.configfile import ConfigError, LoadedConfig, Subscriber
from daemon.emulator.app import Emulator, OffsetClock
from daemon.emulator.fcm import FcmEmulator
from daemon.emulator.google import MAX_CHANNEL_TTL
from daemon.emulator.state import STATE_FILE, StateKeeper
from daemon.listen import StartError, address

if TYPE_CHECKING:
    from daemon.app import Service

log = logging.getLogger(__name__)

PROJECT_ID = "mrm-push-emulator"
KEY_FILE = "emulator-service-account.json"
RENEWAL_MARGIN = 60  # seconds past the start of the renewal window the demo's clock move lands


@dataclass(frozen=True)
class DemoFiles:
    """What `serve --emulator` leaves in the state directory for a newcomer."""

    key_file: Path
    api_key_file: Path
    subscriber_token_file: Path
    api_key: str
    subscriber_token: str


def start_emulator(
    host: str = "127.0.0.1", port: int = 0, state_dir: Path | None = None
) -> tuple[Emulator, StateKeeper | None]:
    """The Google and FCM emulator on the running loop, with its own key-file trust; with
    `state_dir`, the previous run's state loaded (and kept) and, for port 0, its port again."""
    emulator = Emulator()
    emulator.fcm = FcmEmulator(emulator.oauth, emulator.clock, project_id=PROJECT_ID)
    keeper = None
    if state_dir is not None:
        keeper = StateKeeper(emulator, state_dir / STATE_FILE)
        keeper.load()
    if port == 0 and keeper is not None and keeper.saved_port:
        try:  # the same URLs as last time, so that what was printed then still works
            emulator.start(host, keeper.saved_port)
        except OSError:
            emulator.start(host, 0)
    else:
        try:
            emulator.start(host, port)
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
            raise StartError(f"cannot listen on {address(host, port)}: {reason}") from None
    return emulator, keeper


def stop_emulator(emulator: Emulator, keeper: StateKeeper | None) -> None:
    if keeper is not None:
        keeper.close()
    emulator.stop()


def _secret_file(path: Path) -> str:
    """Read the secret kept in `path`, or make one there, readable by the owner only."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(value + "\n")
    return value


def make_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        raise ConfigError(
            f"cannot write {state_dir} ({error.strerror or error})", key="server.state_dir"
        ) from None


def key_file(emulator: Emulator, state_dir: Path) -> Path:
    """The service-account key in the state directory: the previous run's (still valid, its
    token_uri pointed at this run), else a new one; trusted by the emulator's OAuth."""
    path = state_dir / KEY_FILE
    emulator.keep_service_account(str(path), project_id=PROJECT_ID)
    return path


def prepare_demo(emulator: Emulator, state_dir: Path) -> DemoFiles:
    """The key file, an API key and a subscriber token, kept across runs."""
    try:
        key = key_file(emulator, state_dir)
        api_key_file = state_dir / "emulator-api-key"
        subscriber_file = state_dir / "emulator-subscriber-token"
        return DemoFiles(
            key,
            api_key_file,
            subscriber_file,
            _secret_file(api_key_file),
            _secret_file(subscriber_file),
        )
    except OSError as error:
        raise ConfigError(
            f"cannot write {state_dir} ({error.strerror or error})", key="server.state_dir"
        ) from None


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
    replaced = (
        "google.service_account_file",
        "google.calendar_endpoint",
        "fcm.service_account_file",
    )
    sources = {**loaded.sources, **dict.fromkeys(replaced, "serve --emulator")}
    return replace(
        loaded,
        config=config.model_copy(update={"google": google, "fcm": fcm}),
        secrets=secrets_,
        sources=sources,
    )


@dataclass
class Demo:
    """`serve --emulator`: the emulator, its files, and the configuration pointed at it."""

    emulator: Emulator
    keeper: StateKeeper | None
    files: DemoFiles
    loaded: LoadedConfig

    def started(self, service: Service) -> None:
        """The service listens: moving the emulator's clock runs its renewal check at once;
        print what a newcomer can try."""
        if isinstance(self.emulator.clock, OffsetClock):
            self.emulator.clock.listeners.append(lambda: service.run_periodic_now("renew"))
        print(
            demo_instructions(service.base_url, self.emulator, self.files, self.loaded), flush=True
        )

    def configure(self, loaded: LoadedConfig) -> LoadedConfig:
        """A configuration read again (a reload) pointed at this emulator, as at start."""
        return with_emulator(loaded, self.emulator, self.files)

    def stop(self) -> None:
        stop_emulator(self.emulator, self.keeper)


def start_demo(loaded: LoadedConfig) -> Demo:
    state_dir = Path(loaded.config.server.state_dir)
    make_state_dir(state_dir)
    emulator, keeper = start_emulator(state_dir=state_dir)
    try:
        files = prepare_demo(emulator, state_dir)
    except ConfigError:
        stop_emulator(emulator, keeper)
        raise
    log.warning("emulator_mode", extra={"emulator": emulator.base_url})
    return Demo(emulator, keeper, files, with_emulator(loaded, emulator, files))


def renewal_advance(loaded: LoadedConfig) -> int:
    """Seconds to move the clock so that a new channel is inside its renewal window (its
    successor is made, the hand-over seen) but not yet expired."""
    google = loaded.config.google
    lifetime = min(google.channel_ttl, MAX_CHANNEL_TTL)
    margin = min(RENEWAL_MARGIN, google.renew_before // 2)
    return max(lifetime - google.renew_before + margin, 0)


def websocket_line(service_url: str, token_file: Path) -> str:
    """The operator command that follows the /ws feed (and reconnects and resumes by itself);
    the token is read from its file, never printed."""
    script = Path(sys.executable).parent / "mrm-push"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]
    command += ["notifications", "tail", "--url", service_url]
    command += ["--subscriber-token-file", str(token_file)]
    return "  " + shlex.join(command)


def demo_instructions(
    service_url: str, emulator: Emulator, demo: DemoFiles, loaded: LoadedConfig
) -> str:
    calendar = "room-1@resource.calendar.google.com"
    key = f'"Authorization: Bearer $(cat {demo.api_key_file})"'
    advance = renewal_advance(loaded)
    return "\n".join(
        [
            "mrm-push is running against the built-in Google/FCM emulator (nothing leaves",
            "this machine). Files written, readable only by you:",
            f"  Google/FCM key file: {demo.key_file}",
            f"  API key:             {demo.api_key_file}",
            f"  subscriber token:    {demo.subscriber_token_file}",
            "The emulator keeps its calendars and channels there too: stop and start again,",
            "it goes on where it was. Try:",
            f"  curl -X PUT -H {key} -H 'Content-Type: application/json' \\",
            '       -d \'{"firebase_tokens": ["demo-tablet-token"]}\' \\',
            f"       {service_url}/v1/rooms/{calendar}",
            f"  curl -H {key} {service_url}/v1/channels",
            "Follow the companion app's feed (WebSocket /ws) in another terminal:",
            websocket_line(service_url, demo.subscriber_token_file),
            "Book a meeting, then see what the tablet received:",
            "  curl -X POST -H 'Content-Type: application/json' \\",
            '       -d \'{"summary": "Standup"}\' \\',
            f"       {emulator.base_url}/emulator/google/calendars/{calendar}/events",
            f"  curl '{emulator.base_url}/emulator/fcm/messages?token=demo-tablet-token'",
            "Move the emulator's clock into the channel's renewal window, then list the",
            "channels again: a successor takes over and the old one is stopped:",
            f"  curl -X POST -d '{{\"advance\": {advance}}}' {emulator.base_url}/emulator/clock",
            "",
        ]
    )


async def run_emulator(host: str, port: int, loaded: LoadedConfig) -> int:
    """`mrm-push emulator`: serve only the emulator until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    state_dir = Path(loaded.config.server.state_dir)
    make_state_dir(state_dir)
    emulator, keeper = start_emulator(host, port, state_dir)
    try:
        key = key_file(emulator, state_dir)
    except OSError as error:
        stop_emulator(emulator, keeper)
        raise ConfigError(
            f"cannot write {state_dir} ({error.strerror or error})", key="server.state_dir"
        ) from None
    print(
        f"emulator on {emulator.base_url}\n"
        f"  key file (token_uri points here): {key}\n"
        f"  google.calendar_endpoint: {emulator.calendar_endpoint}\n"
        f"  fcm.endpoint: {emulator.base_url}   fcm.project_id: {PROJECT_ID}",
        flush=True,
    )
    log.info("emulator_listening", extra={"url": emulator.base_url})
    await stop.wait()
    stop_emulator(emulator, keeper)
    return 0
