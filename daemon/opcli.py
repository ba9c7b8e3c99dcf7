"""The operator commands' command line: their parsers, their URL and key, one command's run.

A run prints a table or one JSON document on stdout, or one line on stderr on failure.

Where the contract leaves room (for the README): the config is read only for what the options
and the environment do not give; the API key is the first of --api-key-file, MRM_PUSH_API_KEY,
a password in --url's user-info, the config's first key.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.client import ApiClient, CommandFailed, UsageError, split_url
from daemon.configfile import ConfigError, LoadedConfig, load_config, local_url

API_KEY_ENV = "MRM_PUSH_API_KEY"
DEFAULT_TIMEOUT = 30.0
STATES = ("pending", "in_flight", "sent", "failed", "expired", "cancelled")
OPERATOR_COMMANDS = frozenset({"status", "rooms", "channels", "notifications", "deliveries"})

Command = Callable[["Context"], Awaitable[int]]


def _number(lo: int, name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or int(text) < lo:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {lo}, not {text!r}")
        return int(text)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"--timeout must be seconds from 0 to 3600, not {text!r}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("MRM_PUSH_CONFIG"),
        help="the service's config file, for its URL and API key (default: $MRM_PUSH_CONFIG)",
    )
    parser.add_argument("--url", help="the service's URL (default: from the config's server)")
    parser.add_argument(
        "--api-key-file", help=f"a file holding the API key (or ${API_KEY_ENV}; default: config)"
    )
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="seconds per call (30)"
    )


def _leaf(group: Any, name: str, help_text: str, run: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_text)
    _common(parser)
    parser.set_defaults(run=run)
    return parser


def add_operator_commands(commands: Any) -> None:
    """The operator commands, beside serve, check-config and emulator."""
    _leaf(commands, "status", "readiness and the headline figures", "status")

    rooms = commands.add_parser("rooms", help="the rooms API").add_subparsers(
        dest="action", required=True
    )
    _leaf(rooms, "list", "every room", "rooms_list")
    _leaf(rooms, "show", "one room", "rooms_show").add_argument("calendar_id", metavar="ID")
    add = _leaf(rooms, "add", "create a room or update it; tokens are added", "rooms_add")
    add.add_argument("calendar_id", metavar="ID")
    add.add_argument("--token", action="append", default=[], help="a tablet's FCM token")
    add.add_argument("--name", help="the room's name")
    _leaf(rooms, "delete", "forget a room", "rooms_delete").add_argument(
        "calendar_id", metavar="ID"
    )

    channels = commands.add_parser("channels", help="the channels API").add_subparsers(
        dest="action", required=True
    )
    _leaf(channels, "list", "every watch channel", "channels_list")
    _leaf(channels, "renew", "renew channels now", "channels_renew").add_argument(
        "calendar_id", metavar="ID", nargs="?", help="only this room's"
    )

    notes = commands.add_parser("notifications", help="the notifications API").add_subparsers(
        dest="action", required=True
    )
    listing = _leaf(notes, "list", "published notifications in seq order", "notifications_list")
    tail = _leaf(notes, "tail", "follow the WebSocket feed", "notifications_tail")
    for parser in (listing, tail):
        parser.add_argument("--calendar", metavar="ID", help="only this room's")
        parser.add_argument("--after", type=_number(0, "--after"), metavar="SEQ")
    listing.add_argument("--limit", type=_number(1, "--limit"), metavar="N")
    tail.add_argument("--subscriber-token-file", help="default: the config's first subscriber")

    deliveries = commands.add_parser("deliveries", help="the deliveries API").add_subparsers(
        dest="action", required=True
    )
    dlist = _leaf(deliveries, "list", "deliveries, newest first", "deliveries_list")
    dlist.add_argument("--state", choices=STATES)
    dlist.add_argument("--calendar", metavar="ID", help="only this room's")
    dlist.add_argument("--limit", type=_number(1, "--limit"), metavar="N")
    dlist.add_argument("--before", type=_number(1, "--before"), metavar="ID")
    retry = _leaf(deliveries, "retry", "send failed deliveries again", "deliveries_retry")
    retry.add_argument(
        "--state",
        choices=("failed", "expired"),
        help="every delivery in this state (failed when no ID is given)",
    )
    retry.add_argument("ids", metavar="ID", nargs="*", type=_number(1, "ID"), help="delivery ids")


class Context:
    """One command's options, with what the config gives read only when it is needed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._loaded: LoadedConfig | None = None
        self._url: str | None = None
        self._url_key: str | None = None
        if args.url:
            self._url, self._url_key = split_url(args.url)
        self._clients: list[ApiClient] = []

    @property
    def base_url(self) -> str:
        if self._url is None:
            server = self.loaded().config.server
            self._url = local_url(server.host, server.port)
        return self._url

    @functools.cached_property
    def api(self) -> ApiClient:
        """The management API's client, with the API key."""
        return self.client(self._api_key())

    def client(self, api_key: str | None) -> ApiClient:
        made = ApiClient(self.base_url, api_key, self.args.timeout)
        self._clients.append(made)
        return made

    def close(self) -> None:
        for made in self._clients:
            made.close()

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    def loaded(self) -> LoadedConfig:
        if self._loaded is None:
            try:
                self._loaded = load_config(self.args.config)
            except ConfigError as error:
                raise UsageError(f"config: {error}") from None
        return self._loaded

    def _api_key(self) -> str | None:
        if self.args.api_key_file:
            return read_secret_file("--api-key-file", self.args.api_key_file)
        from_env = os.environ.get(API_KEY_ENV, "").strip()
        if from_env:
            return from_env
        if self._url_key:
            return self._url_key
        keys = self.loaded().secrets.api_keys
        return keys[0] if keys else None

    def metrics_token(self) -> str | None:
        """The config's auth.metrics_token, when the config is read anyway or named."""
        if self._loaded is None and self.args.config is None:
            return None
        return self.loaded().secrets.metrics_token

    def subscriber_token(self) -> str:
        path = getattr(self.args, "subscriber_token_file", None)
        if path:
            return read_secret_file("--subscriber-token-file", path)
        subscribers = self.loaded().secrets.subscribers
        if not subscribers:
            raise UsageError(
                "no subscriber token: give --subscriber-token-file, or a config with "
                "auth.subscribers"
            )
        return subscribers[0].token


def read_secret_file(option: str, path: str) -> str:
    """The first line that is not empty nor a comment (the format of auth.api_keys_file)."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as error:
        raise UsageError(f"{option}: cannot read {path} ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{option}: {path} is not UTF-8 text") from None
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise UsageError(f"{option}: {path} is empty")


def run(args: argparse.Namespace) -> int:
    """Run one operator command: its exit code (0, 1, or 2 for a usage or config error)."""
    try:
        return asyncio.run(_run(args))
    except CommandFailed as error:
        print(f"mrm-push: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `| head` stopped reading: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _run(args: argparse.Namespace) -> int:
    from daemon import opcommands, optail

    commands: dict[str, Command] = {**opcommands.COMMANDS, "notifications_tail": optail.tail}
    context = Context(args)
    try:
        return await commands[args.run](context)
    finally:
        context.close()
