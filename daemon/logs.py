"""Logging as one JSON object per line: `ts`, `level`, `event`, and the ids involved."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from daemon.clock import rfc3339

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; extras become fields, exceptions a `traceback` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup_logging(level: str, stream: Any = None) -> None:
    """Route the root logger (and Tornado's) to one JSON line per record on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # google-api-python-client logs request URLs (with query strings) at INFO/DEBUG.
    for noisy in ("googleapiclient.discovery", "googleapiclient.discovery_cache", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def short_token(token: str) -> str:
    """The last 8 characters of an FCM token: enough to tell tablets apart, never the secret."""
    return "…" + token[-8:] if len(token) > 8 else "…"
