"""The bench's Google/FCM fakes: the emulator in a process of its own, plus bench controls.

    python -m daemon.bench.fakes --key-file PATH     # started by `mrm-push bench`

The real emulator (daemon/emulator/: OAuth, Calendar, FCM) on a free port of 127.0.0.1, with
routes under /bench/ for the bench only:

- `POST /bench/change?c=CALENDAR&e=EVENT`: a new event in the calendar, without the webhook
  the emulator would send (the bench sends that itself, timed); 204.
- `POST /bench/changer` {"calendars", "rate", "prefix", "limit"}: such changes in the
  background at `rate`/s, round robin; `POST /bench/changer/stop` ends them and answers the
  [calendar, event] pairs made.
- `GET /bench/fcm?after=N`: the FCM messages accepted from the N-th on, compact.
- `GET /bench/stats[?mark=1]`: CPU seconds, FCM requests and messages, events.list calls, and
  how late this process's loop ran since the last mark or reset (the fake's own saturation).
- `POST /bench/reset`: forget the FCM messages and the call log (a new part begins).

Prints one JSON line {"ready": true, "port": P} on stdout once listening; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import socket
import time
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from daemon.bench.common import HOST, PROJECT_ID, percentile
from daemon.clock import SystemClock
from daemon.emulator.app import Emulator, Route, build_emulator_app
from daemon.emulator.fcm import FcmEmulator
from daemon.emulator.google import GoogleCalendarEmulator

LAG_TICK = 0.005  # seconds between the loop-lag probe's wake-ups
LAG_SAMPLES = 200_000  # probe samples kept (about 17 minutes of them)
CHANGER_LIMIT = 1_000_000  # background changes at most, whatever the bench asks


class LoopLag:
    """How late the loop wakes a sleeper: above a few ms, this process was the limit."""

    def __init__(self) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_TICK
            await asyncio.sleep(LAG_TICK)
            self.samples.append(max(0.0, loop.time() - due))

    def figures(self) -> dict[str, float | None]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"p99_ms": None, "max_ms": None}
        return {
            "p99_ms": round(1000 * percentile(ordered, 0.99), 2),
            "max_ms": round(1000 * ordered[-1], 2),
        }


class Changer:
    """Background changes: a new event on each calendar in turn, at a steady rate."""

    def __init__(self, google: GoogleCalendarEmulator) -> None:
        self.google = google
        self.made: list[tuple[str, str]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, calendars: list[str], rate: float, prefix: str, limit: int) -> None:
        self.stop()
        self.made = []
        self._task = asyncio.get_running_loop().create_task(
            self._run(calendars, rate, prefix, min(limit, CHANGER_LIMIT))
        )

    async def _run(self, calendars: list[str], rate: float, prefix: str, limit: int) -> None:
        started = time.monotonic()
        for i in range(limit):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            calendar = calendars[i % len(calendars)]
            event_id = f"{prefix}{i:09d}"
            quiet_change(self.google, calendar, event_id)
            self.made.append((calendar, event_id))

    def stop(self) -> list[tuple[str, str]]:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        return self.made


def quiet_change(google: GoogleCalendarEmulator, calendar_id: str, event_id: str) -> None:
    """A new event, with no webhook from the emulator: the bench sends that one itself."""
    google.calendar_set.insert_event(
        google.calendar(calendar_id),
        summary="bench",
        start=None,
        end=None,
        event_id=event_id,
        status="confirmed",
    )


class Fakes:
    """The emulator, its FCM part, the changer and the lag probe, as the handlers see them."""

    def __init__(self) -> None:
        clock = SystemClock()
        self.emulator = Emulator(clock)
        self.fcm = FcmEmulator(self.emulator.oauth, clock, project_id=PROJECT_ID)
        self.emulator.fcm = self.fcm
        self.changer = Changer(self.emulator.google)
        self.lag = LoopLag()

    def stats(self) -> dict[str, Any]:
        calls = self.emulator.google.calls
        return {
            "cpu": time.process_time(),
            "fcm_requests": self.fcm.requests,
            "fcm_messages": len(self.fcm.inbox.messages()),
            "lists": sum(1 for call in calls if call[0] == "list"),
            "google_errors": sum(1 for call in calls if call[2] >= 400),
            "lag": self.lag.figures(),
        }

    def reset(self) -> None:
        self.fcm.reset()
        self.emulator.google.calls.clear()
        self.lag.samples.clear()

    def fcm_messages(self, after: int) -> list[list[Any]]:
        """[token, notification_id, calendar_id, event_ids, full_resync, received_at] each."""
        rows = []
        for message in self.fcm.inbox.messages()[after:]:
            data = message["message"].get("data") or {}
            try:
                event_ids = json.loads(data.get("event_ids") or "[]")
            except ValueError:
                event_ids = []
            rows.append(
                [
                    message["token"],
                    data.get("notification_id"),
                    data.get("calendar_id"),
                    event_ids,
                    data.get("full_resync") == "1",
                    message["received_at"],
                ]
            )
        return rows


class BenchHandler(tornado.web.RequestHandler):
    def initialize(self, fakes: Fakes) -> None:
        self.fakes = fakes

    def check_xsrf_cookie(self) -> None:  # an API, not a browser form
        pass

    def body(self) -> dict[str, Any]:
        try:
            value = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, "body is not JSON") from None
        if not isinstance(value, dict):
            raise tornado.web.HTTPError(400, "body is not a JSON object")
        return value


class ChangeHandler(BenchHandler):
    def post(self) -> None:
        quiet_change(self.fakes.emulator.google, self.get_argument("c"), self.get_argument("e"))
        self.set_status(204)
        self.finish()


class ChangerHandler(BenchHandler):
    def post(self, action: str) -> None:
        if action == "/stop":
            self.finish({"events": self.fakes.changer.stop()})
            return
        body = self.body()
        calendars = [str(c) for c in body.get("calendars") or []]
        rate = float(body.get("rate") or 0)
        if not calendars or rate <= 0:
            raise tornado.web.HTTPError(400, "calendars and a positive rate are required")
        limit = int(body.get("limit") or CHANGER_LIMIT)
        self.fakes.changer.start(calendars, rate, str(body.get("prefix") or "c"), limit)
        self.finish({})


class FcmMessagesHandler(BenchHandler):
    def get(self) -> None:
        after = int(self.get_argument("after", "0"))
        rows = self.fakes.fcm_messages(after)
        self.finish({"messages": rows, "next": after + len(rows)})


class StatsHandler(BenchHandler):
    def get(self) -> None:
        stats = self.fakes.stats()
        if self.get_argument("mark", ""):  # the next figures start from here
            self.fakes.lag.samples.clear()
        self.finish(stats)


class ResetHandler(BenchHandler):
    def post(self) -> None:
        self.fakes.reset()
        self.finish({})


def bench_routes(fakes: Fakes) -> list[Route]:
    shared: dict[str, Any] = {"fakes": fakes}
    return [
        (r"/bench/change", ChangeHandler, shared),
        (r"/bench/changer(|/stop)", ChangerHandler, shared),
        (r"/bench/fcm", FcmMessagesHandler, shared),
        (r"/bench/stats", StatsHandler, shared),
        (r"/bench/reset", ResetHandler, shared),
    ]


async def serve(key_file: str) -> None:
    fakes = Fakes()
    emulator = fakes.emulator
    sockets = tornado.netutil.bind_sockets(0, HOST, family=socket.AF_INET)
    emulator.host, emulator.port = HOST, sockets[0].getsockname()[1]
    # The emulator's own routes (OAuth, Calendar, clock, FCM) and the bench's, on one port.
    extra = [*fakes.fcm.routes(), *bench_routes(fakes)]
    app = build_emulator_app(emulator.google, emulator.oauth, extra)
    emulator.server = tornado.httpserver.HTTPServer(app)
    emulator.server.add_sockets(sockets)
    emulator.write_service_account(key_file, project_id=PROJECT_ID)
    fakes.lag.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"ready": True, "port": emulator.port}), flush=True)
    await stop.wait()
    fakes.changer.stop()
    emulator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key-file", required=True, help="where to write the service account")
    args = parser.parse_args()
    asyncio.run(serve(args.key_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
