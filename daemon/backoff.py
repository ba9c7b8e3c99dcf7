"""Exponential backoff with jitter, and Retry-After read once for every retry that honours it."""

from __future__ import annotations

import email.utils
import math
import random
from datetime import UTC


def backoff_delay(
    attempt: int,
    *,
    base: float = 2.0,
    cap: float = 3600.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    Half the exponential step is fixed and half is random ("equal jitter"): retries spread out
    so that many failures at once do not come back at once, yet never come back immediately.
    """
    step: float = min(cap, base * 2.0 ** max(0, attempt - 1))
    jitter = (rng or random.Random()).uniform(0, step / 2)  # noqa: S311 - jitter, not a secret
    return step / 2 + jitter


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) as seconds from `now`, never less
    than 0; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # no zone, or "-0000": HTTP dates are GMT, not local time
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
