"""`mrm-push notifications tail`: follow the /ws feed and print each notification as it comes.

After a close or a failed connect it reconnects with backoff and resumes after the last seq
printed.

Where the contract leaves room (for the README): what is said about the feed (subscribed,
replayed, reconnecting, the store changed, an incomplete replay) goes to stderr, one line each;
stdout holds only notifications. Without --after, the feed starts with what is published from
then on; a reconnect before the first notification has nothing to resume from and is live again
(say --after to be sure). The backoff is reset by a connection that stayed up STABLE_AFTER s.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from tornado.websocket import WebSocketClientConnection

from daemon import optables
from daemon.client import ApiClient, CommandFailed, ServiceError, Unreachable

if TYPE_CHECKING:
    from daemon.opcli import Context

T = TypeVar("T")

BACKOFF_FIRST = 0.5  # seconds before the first reconnect (half of it random)
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0  # seconds a connection must last for the next failure to start over
RETRY_STATUSES = frozenset({502, 503, 504})  # refused before the upgrade, but for a while only


def say(text: str) -> None:
    print(f"mrm-push: {text}", file=sys.stderr, flush=True)


class Follower:
    """One `tail`: its position in the feed (last seq printed, store epoch) across sockets."""

    def __init__(self, context: Context) -> None:
        args = context.args
        self.json = context.json
        self.calendars: list[str] = [args.calendar] if args.calendar else ["*"]
        self.last_seq: int | None = args.after
        self.epoch: str | None = None
        self.stopped = asyncio.Event()
        self.rng = random.Random()  # noqa: S311 - jitter, not a secret
        self.failures = 0
        self.subscribed: list[str] = []  # as the last `subscribed` said

    def delay(self) -> float:
        """Equal jitter: between half and all of BACKOFF_FIRST doubled per failure, capped."""
        ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * float(2 ** min(self.failures, 16)))
        self.failures += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    async def until_stopped(self, work: Awaitable[T]) -> T | None:
        """`work`'s result, or None when SIGINT/SIGTERM came first (the work is cancelled)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def run(self, client: ApiClient, token: str) -> int:
        loop = asyncio.get_running_loop()
        while not self.stopped.is_set():
            reason: str | None
            try:
                connection = await self.until_stopped(client.websocket(token))
            except Unreachable as error:
                reason = str(error)
            except ServiceError as error:
                if error.status not in RETRY_STATUSES:
                    raise  # a bad token or origin: trying again changes nothing
                reason = f"/ws answered {error}"
            else:
                if connection is None:
                    break
                began = loop.time()
                reason = await self.follow(connection)
                if reason is None:
                    break
                if loop.time() - began >= STABLE_AFTER:
                    self.failures = 0
            wait = self.delay()
            say(f"{reason}; reconnecting in {wait:.1f} s")
            await self.until_stopped(asyncio.sleep(wait))
        return 0

    async def follow(self, connection: WebSocketClientConnection) -> str | None:
        """Subscribe and print until the socket closes (the reason) or a signal (None)."""
        try:
            await connection.write_message(json.dumps(self.subscribe_message()))
            while True:
                text = await self.until_stopped(connection.read_message())
                if self.stopped.is_set():
                    return None
                if text is None:
                    code, why = connection.close_code, connection.close_reason
                    return f"the connection closed ({code or 'no code'}{f' {why}' if why else ''})"
                if isinstance(text, str):
                    self.handle(json.loads(text))
        except CommandFailed:
            raise
        except Exception as error:  # the stream broke mid-write, or a frame that is not JSON
            return f"the connection failed ({type(error).__name__}: {error})"
        finally:
            connection.close(1000 if self.stopped.is_set() else None)

    def subscribe_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "calendar_ids": self.calendars}
        if self.last_seq is not None:
            message["after"] = self.last_seq
            if self.epoch is not None:
                message["store_epoch"] = self.epoch
        return message

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "notification":
            # No filter on seq: the service sends each socket strictly increasing seqs after
            # `after`, and a store that changed numbers anew (which the replay says).
            seq = message.get("seq")
            line = json.dumps(message, ensure_ascii=False) if self.json else None
            print(line or optables.notification_line(message), flush=True)
            if isinstance(seq, int):
                self.last_seq = seq
        elif kind == "subscribed":
            epoch = message.get("store_epoch")
            if self.epoch is not None and epoch != self.epoch:
                say(f"the store changed (store_epoch {self.epoch} -> {epoch}): seqs start anew")
                self.last_seq = None
            self.epoch = epoch if isinstance(epoch, str) else None
            self.subscribed = list(message.get("calendar_ids") or [])
            shown = ", ".join(self.subscribed) or "nothing"
            after = "" if self.last_seq is None else f" after seq {self.last_seq}"
            say(f"subscribed to {shown}{after}")
        elif kind == "replayed":
            say(f"replayed {message.get('count')}")
            if message.get("complete") is False:
                say(
                    "the replay is incomplete (complete: false): notifications may be missing "
                    "(retention, or another store); refetch, e.g. mrm-push notifications list"
                )
        elif kind == "error":
            code, text = message.get("code"), message.get("message")
            if code == "forbidden_calendar" and not self.subscribed:
                # The token may not see the one calendar asked for: nothing would ever come.
                raise ServiceError(
                    403, "forbidden_calendar", f"{text}: {message.get('calendar_id')}"
                )
            say(f"the service says {code}: {text}")


async def tail(context: Context) -> int:
    token = context.subscriber_token()  # a usage error before anything else
    client = context.client(None)  # /ws takes the subscriber token, never the API key
    follower = Follower(context)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, follower.stopped.set)
    try:
        return await follower.run(client, token)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
