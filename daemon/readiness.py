"""Readiness: each check's reason in words an operator can act on, "ok" when it passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from storage.base import StoreError

CHECK_TIMEOUT = 5.0  # seconds a check may take before its answer is "no answer"

Check = Callable[[], Awaitable[None]]


class NotReady(Exception):
    """A readiness check's own answer: its message is the whole reason."""


async def run_check(check: Check) -> str:
    """ "ok", or why not: the message alone for the failures we name ourselves, the
    exception's type beside it for anything else (a bug's answer must still say what it is)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await check()
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except (NotReady, StoreError) as error:
        return str(error) or type(error).__name__
    except Exception as error:  # a check's failure is its answer, whatever it is
        return f"{type(error).__name__}: {error}"
    return "ok"


async def run_checks(checks: Mapping[str, Check]) -> dict[str, str]:
    """Every check at once; its answer by name."""
    names = list(checks)
    results = await asyncio.gather(*(run_check(checks[name]) for name in names))
    return dict(zip(names, results, strict=True))
