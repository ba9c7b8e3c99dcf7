"""Exponential backoff with full jitter, shared by channel retries, stops and deliveries."""

from __future__ import annotations

import random


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
    """A Retry-After header (seconds or an HTTP date) as seconds from `now`."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
