"""The little that differs between motor and pymongo's async client, and the error mapping."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

from dns.exception import DNSException
from dns.resolver import NXDOMAIN, NoAnswer
from pymongo.errors import ConfigurationError, ConnectionFailure, PyMongoError

from storage.base import StoreConfigError, StoreError, StoreUnavailable

DRIVERS = ("motor", "pymongo")

# Fail fast when the server is down: /readyz and the webhook's 503 must not hang for pymongo's
# default 30 s. A URL that sets its own serverSelectionTimeoutMS keeps it.
SERVER_SELECTION_TIMEOUT_MS = 3000


def make_client(url: str, driver: str) -> Any:
    """A client for `url` with the named driver; it connects lazily, on the first operation."""
    if driver not in DRIVERS:
        raise StoreConfigError(f"storage.mongo_driver: {driver!r} is not one of {DRIVERS}")
    options: dict[str, Any] = {}
    if "serverselectiontimeoutms" not in url.lower():
        options["serverSelectionTimeoutMS"] = SERVER_SELECTION_TIMEOUT_MS
    try:
        # pymongo only warns about an unknown option or a bad value in the URL and goes on
        # without it (`tls=maybe` would mean no TLS): at start, that is a configuration error.
        # Only the URI parser's warnings: the DocumentDB/CosmosDB notice is not one.
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=UserWarning, module=r"pymongo\.uri_parser")
            if driver == "motor":
                from motor.motor_asyncio import AsyncIOMotorClient

                return AsyncIOMotorClient(url, **options)
            from pymongo import AsyncMongoClient

            return AsyncMongoClient(url, **options)
    except (ConfigurationError, UserWarning, ValueError, TypeError) as exc:
        # ConfigurationError covers InvalidURI; a bad port is a plain ValueError.
        raise StoreConfigError(f"storage.url: {exc}") from exc


def database_name(url: str) -> str | None:
    """The database named in a MongoDB URL (`mongodb://host/db?...` → `db`), None if none.

    Parsed by hand: pymongo's parser resolves `mongodb+srv://` names through DNS."""
    _, sep, rest = url.partition("://")
    if not sep:
        return None
    path = rest.partition("/")[2].partition("?")[0]
    return unquote(path) or None


async def close_client(client: Any) -> None:
    """motor's close() is plain, pymongo's async client's is a coroutine."""
    result = client.close()
    if inspect.isawaitable(result):
        await result


def reason(exc: BaseException) -> str:
    """A short, one-line reason: pymongo appends whole topology descriptions to its messages."""
    text = str(exc).split(", Timeout:", 1)[0].split(" (configured timeouts", 1)[0]
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def mapped_errors() -> Iterator[None]:
    """pymongo's errors as the store's: unreachable server → StoreUnavailable, a URL that
    cannot work → StoreConfigError, else StoreError.

    ConnectionFailure is the parent of ServerSelectionTimeoutError, AutoReconnect (hence
    NotPrimaryError) and NetworkTimeout."""
    try:
        yield
    except ConnectionFailure as exc:
        raise StoreUnavailable(f"mongodb unreachable: {reason(exc)}") from exc
    except ConfigurationError as exc:
        # At the first operation pymongo resolves a mongodb+srv:// name, and any DNS failure
        # is a ConfigurationError: a name that does not exist is one (the start stops, exit 2),
        # DNS being down is not (the service starts unready and tries again).
        if isinstance(exc.__cause__, DNSException) and not isinstance(
            exc.__cause__, NXDOMAIN | NoAnswer
        ):
            raise StoreUnavailable(f"mongodb unreachable: {reason(exc)}") from exc
        raise StoreConfigError(f"storage.url: {reason(exc)}") from exc
    except PyMongoError as exc:
        if exc.timeout:
            raise StoreUnavailable(f"mongodb timed out: {reason(exc)}") from exc
        raise StoreError(f"mongodb: {reason(exc)}") from exc
