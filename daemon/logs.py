"""Logging as one JSON object per line: `ts`, `level`, `event`, and the ids involved.

Every line passes one redactor, so that no secret is written whatever logged it."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from daemon.clock import rfc3339
from daemon.redact import Redactor, short

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# A record's own secrets (e.g. the tokens of the request that failed), given as
# `extra={SECRETS_FIELD: [...]}`: shortened in that record, never written.
SECRETS_FIELD = "_secrets"
# Libraries that log URLs with query strings, SQL with its parameters (tokens), or HTTP/2
# headers (Authorization) below WARNING.
QUIET_LOGGERS = (
    "googleapiclient.discovery",
    "googleapiclient.discovery_cache",
    "httpx",
    "httpcore",
    "hpack",
    "aiosqlite",
    "pymongo",
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; extras become fields, exceptions a `traceback` field.
    The message, every field and the traceback go through the redactor."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        tokens = getattr(record, SECRETS_FIELD, None) or ()
        redact = self.redactor
        entry: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "event": redact.text(record.getMessage(), tokens),
            "logger": record.name,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = redact.value(value, tokens)
        if record.exc_info:
            entry["traceback"] = redact.text(self.formatException(record.exc_info), tokens)
        if record.stack_info:
            entry["stack"] = redact.text(self.formatStack(record.stack_info), tokens)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup_logging(level: str, stream: Any = None) -> logging.Handler:
    """Route the root logger (and Tornado's) to one JSON line per record on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def protect(secrets: Iterable[str]) -> None:
    """Teach every JSON formatter on the root logger these secrets (the service's API keys,
    tokens and key material, known once its configuration is read)."""
    wanted = list(secrets)
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.redactor.add(wanted)


def short_token(token: str) -> str:
    """The last 8 characters of an FCM token: enough to tell tablets apart, never the secret."""
    return short(token)
