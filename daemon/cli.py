"""The `mrm-push` command: serve, check-config, emulator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon.configfile import ConfigError, LoadedConfig, describe, load_config, warnings
from daemon.lease import InstanceRunning
from daemon.logs import setup_logging
from daemon.sdnotify import SdNotifier
from storage.base import StoreConfigError

log = logging.getLogger("mrm_push")

EXIT_CONFIG = 2
EXIT_FAILURE = 1  # anything else that stops the service: systemd starts it again


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrm-push", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--emulator", action="store_true", help="run the Google/FCM emulator too")
    check = commands.add_parser("check-config", help="print the effective configuration")
    emulator = commands.add_parser("emulator", help="run only the Google/FCM emulator")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8090)
    for command in (serve, check, emulator):
        command.add_argument(
            "--config",
            default=os.environ.get("MRM_PUSH_CONFIG"),
            help="config file (default: $MRM_PUSH_CONFIG, else built-in defaults)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = load_config(args.config)
    except ConfigError as error:
        print(f"mrm-push: config: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        return check_config(loaded)
    setup_logging(loaded.config.logging.level)
    if args.command == "emulator":
        from daemon.emulator.run import run_emulator

        return asyncio.run(run_emulator(args.host, args.port, loaded))
    return asyncio.run(serve(loaded, with_emulator=args.emulator))


def check_config(loaded: LoadedConfig) -> int:
    print(f"# config file: {loaded.path or 'none (built-in defaults)'}")
    for line in describe(loaded):
        print(line)
    for warning in warnings(loaded.config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


async def serve(loaded: LoadedConfig, *, with_emulator: bool = False) -> int:
    """Start, wait for SIGTERM or SIGINT, drain, exit 0 (2 when the start is impossible)."""
    from daemon.app import Service

    notifier = SdNotifier()
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The handler only sets a flag; the shutdown runs on the loop like everything else.
        loop.add_signal_handler(signum, stop_requested.set)
    emulator = None
    if with_emulator:
        from daemon.emulator import run as emulator_run
        from daemon.emulator.app import OffsetClock

        emulator = emulator_run.start_emulator()
        demo = emulator_run.prepare_demo(emulator, Path(loaded.config.server.state_dir))
        loaded = emulator_run.with_emulator(loaded, emulator, demo)
        log.warning("emulator_mode", extra={"emulator": emulator.base_url})
    try:
        service = Service(loaded, clock=emulator.clock if emulator else None)
    except ConfigError as error:
        print(f"mrm-push: config: {error}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        await service.start()
    except InstanceRunning as error:
        # Not a configuration error: once the other instance stops, this one can start.
        print(f"mrm-push: cannot start: {error}", file=sys.stderr)
        await service.store.close()
        return EXIT_FAILURE
    except (StoreConfigError, OSError) as error:
        print(f"mrm-push: cannot start: {error}", file=sys.stderr)
        await service.store.close()
        return EXIT_CONFIG
    if emulator is not None:
        if isinstance(emulator.clock, OffsetClock):
            emulator.clock.listeners.append(lambda: service.run_periodic_now("renew"))
        print(emulator_run.demo_instructions(service.base_url, emulator, demo), flush=True)
    notifier.notify("READY=1")
    watchdog = _start_watchdog(notifier)
    await _stop_or_lease_lost(stop_requested, service.lease_lost)
    log.info("shutting_down", extra={"timeout": loaded.config.server.shutdown_timeout})
    notifier.notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    try:
        await asyncio.wait_for(service.stop(), loaded.config.server.shutdown_timeout)
    except TimeoutError:
        log.error("shutdown_timed_out", extra={"timeout": loaded.config.server.shutdown_timeout})
    if emulator is not None:
        emulator.stop()
    return EXIT_FAILURE if service.lease_lost.is_set() else 0


async def _stop_or_lease_lost(stop_requested: asyncio.Event, lease_lost: asyncio.Event) -> None:
    """Until SIGTERM/SIGINT, or until another instance has taken the store's lease."""
    waits = [asyncio.ensure_future(event.wait()) for event in (stop_requested, lease_lost)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _start_watchdog(notifier: SdNotifier) -> asyncio.Task[None] | None:
    interval = notifier.watchdog_interval()
    if interval is None or not notifier.enabled:
        return None

    async def beat() -> None:
        while True:
            notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(beat())


if __name__ == "__main__":
    sys.exit(main())
