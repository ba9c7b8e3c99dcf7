"""The `mrm-push` command line: serve, check-config, emulator, bench and the operator commands.

The operator commands call a running service."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvloop

from daemon.bench.cli import add_bench_command
from daemon.bench.cli import run as run_bench
from daemon.configcheck import key_file_errors, warnings
from daemon.configfile import ConfigError, LoadedConfig, describe, load_config
from daemon.lease import InstanceRunning
from daemon.listen import StartError, listen
from daemon.logs import setup_logging
from daemon.opcli import OPERATOR_COMMANDS, add_operator_commands
from daemon.opcli import run as run_operator
from daemon.sdnotify import SdNotifier

if TYPE_CHECKING:
    from daemon.app import Service
    from daemon.emulator.run import Demo

log = logging.getLogger("mrm_push")

EXIT_RUNTIME = 1  # systemd restarts it
EXIT_CONFIG = 2  # systemd does not (RestartPreventExitStatus=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrm-push", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mrm-push {package_version()}")
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
    add_operator_commands(commands)
    add_bench_command(commands)
    return parser


def package_version() -> str:
    try:
        return importlib.metadata.version("mrm-push")
    except importlib.metadata.PackageNotFoundError:  # a bare checkout, not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in OPERATOR_COMMANDS:
        return run_operator(args)
    if args.command == "bench":
        return run_bench(args)
    try:
        loaded = load_config(args.config)
    except ConfigError as error:
        return config_failure(error)
    if args.command == "check-config":
        return check_config(loaded)
    setup_logging(loaded.config.logging.level)
    if args.command == "emulator":
        from daemon.emulator.run import run_emulator

        try:
            return asyncio.run(run_emulator(args.host, args.port, loaded))
        except ConfigError as error:
            return config_failure(error, loaded)
        except StartError as error:
            return start_failure(error)
    # uvloop's event loop (libuv) under the service: the same asyncio API, with its scheduling,
    # futures and sockets in C (ingest ceiling 465-646 -> 861 answers/s in mrm-push bench).
    return uvloop.run(serve(loaded, with_emulator=args.emulator))


def config_failure(error: ConfigError, loaded: LoadedConfig | None = None) -> int:
    """One line naming the key and where its value came from; systemd does not restart."""
    if loaded is not None:
        error = loaded.locate(error)
    print(f"mrm-push: config: {error}", file=sys.stderr)
    return EXIT_CONFIG


def start_failure(error: StartError) -> int:
    print(f"mrm-push: {error}", file=sys.stderr)
    return EXIT_RUNTIME


def check_config(loaded: LoadedConfig) -> int:
    print(f"# config file: {loaded.path or 'none (built-in defaults)'}")
    for line in describe(loaded):
        print(line)
    for warning in warnings(loaded):
        print(f"warning: {warning}", file=sys.stderr)
    errors = key_file_errors(loaded)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return EXIT_CONFIG if errors else 0


def validate(loaded: LoadedConfig) -> None:
    """What the schema cannot see: the key files, opened as the service will open them."""
    errors = key_file_errors(loaded)
    if errors:
        raise errors[0]


def log_warnings(loaded: LoadedConfig, port: int) -> None:
    """check-config's warnings, as WARNING lines at start."""
    for warning in warnings(loaded, port):
        log.warning("config_warning", extra={"key": warning.key, "reason": warning.reason})


async def serve(loaded: LoadedConfig, *, with_emulator: bool = False) -> int:
    """Start, wait for SIGTERM or SIGINT, drain: exit 0. A configuration error stops the start
    with exit 2, anything else that stops it with exit 1; either is one line on stderr."""
    stop_requested = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The handler only sets a flag; the shutdown runs on the loop like everything else.
        loop.add_signal_handler(signum, stop_requested.set)
    # SIGHUP's default would end the process: from here on it asks for a reload, which runs on
    # the loop once the service is ready (one during the start is done then).
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    try:
        service, demo = await start(loaded, with_emulator=with_emulator)
    except ConfigError as error:
        return config_failure(error)
    except StartError as error:
        return start_failure(error)
    except InstanceRunning as error:
        # Not a configuration error: once the other instance stops, this one can start.
        return start_failure(StartError(f"cannot start: {error}"))
    except Exception as error:  # unforeseen: one line too, the traceback in a JSON log line
        log.exception("start_failed")
        return start_failure(StartError(f"cannot start: {type(error).__name__}: {error}"))
    if demo is not None:
        demo.started(service)
    return await run_until_stopped(
        service, stop_requested, loaded.config.server.shutdown_timeout, demo, reload_requested
    )


async def start(loaded: LoadedConfig, *, with_emulator: bool) -> tuple[Service, Demo | None]:
    """The start in steps: the emulator (with --emulator), the key files, the service, the
    listening sockets, the config warnings, the store and the server. A step that fails undoes
    what the earlier ones made and raises: ConfigError (naming where its key came from),
    StartError, or whatever went wrong unforeseen."""
    from daemon.app import Service

    demo: Demo | None = None
    service: Service | None = None
    sockets: list[socket.socket] = []
    try:
        if with_emulator:
            demo = start_demo(loaded)
            loaded = demo.loaded
        validate(loaded)
        service = Service(loaded, clock=demo.emulator.clock if demo else None)
        sockets = listen(loaded.config.server.port, loaded.config.server.host)
        log_warnings(loaded, sockets[0].getsockname()[1])
        await service.start(sockets)
    except BaseException as error:
        await _abandon(service, sockets, demo)
        if isinstance(error, ConfigError):
            raise loaded.locate(error) from None
        raise
    return service, demo


def start_demo(loaded: LoadedConfig) -> Demo:
    """`serve --emulator`: the emulator in this process, the config pointed at it."""
    from daemon.emulator import run as emulator_run

    return emulator_run.start_demo(loaded)


async def run_until_stopped(
    service: Service,
    stop_requested: asyncio.Event,
    drain_limit: float,
    demo: Demo | None,
    reload_requested: asyncio.Event | None = None,
) -> int:
    """Ready until SIGTERM/SIGINT, reloading on SIGHUP, then drain within `drain_limit`
    seconds; exit code 0."""
    notifier = SdNotifier()
    notifier.notify("READY=1")
    watchdog = _start_watchdog(notifier)
    reloads = _start_reloads(service, notifier, reload_requested, demo)
    await _stop_or_lease_lost(stop_requested, service.lease_lost)
    if reloads is not None:
        reloads.cancel()
        await asyncio.gather(reloads, return_exceptions=True)
    log.info("shutting_down", extra={"timeout": drain_limit})
    notifier.notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    try:
        await asyncio.wait_for(service.stop(drain_limit), drain_limit)
    except TimeoutError:
        log.error("shutdown_timed_out", extra={"timeout": drain_limit})
    if demo is not None:
        demo.stop()
    return EXIT_RUNTIME if service.lease_lost.is_set() else 0


async def _stop_or_lease_lost(stop_requested: asyncio.Event, lease_lost: asyncio.Event) -> None:
    """Until SIGTERM/SIGINT, or until another instance has taken the store's lease."""
    waits = [asyncio.ensure_future(event.wait()) for event in (stop_requested, lease_lost)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _abandon(
    service: Service | None, sockets: list[socket.socket], demo: Demo | None
) -> None:
    """Undo a start that failed half-way."""
    for sock in sockets:
        sock.close()
    if service is not None:
        await service.store.close()
        service.fcm_executor.shutdown(wait=False)
    if demo is not None:
        demo.stop()


def _start_reloads(
    service: Service, notifier: SdNotifier, requested: asyncio.Event | None, demo: Demo | None
) -> asyncio.Task[None] | None:
    """The task that reloads auth.* and logging.level whenever SIGHUP asks (daemon/reload.py)."""
    if requested is None:
        return None
    from daemon.reload import Reloader

    reloader = Reloader(service, notifier, demo.configure if demo else None, requested)
    return asyncio.get_running_loop().create_task(reloader.run())


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
