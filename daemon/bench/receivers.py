"""The ingest part's reference receivers: the least a webhook receiver does, timed beside ours.

    python -m daemon.bench.receivers --kind bare --channels FILE
    python -m daemon.bench.receivers --kind naive --channels FILE --db PATH

Both are one small Tornado app on a free port of 127.0.0.1 that checks the X-Goog headers as
Google sends them (channel known, its token compared in constant time, resource id, state,
message number) and answers 200; `naive` also commits one SQLite row per request before the
answer (aiosqlite, WAL, synchronous=FULL), as a first receiver that stores would. FILE holds
{channel id: [token, resource id]}. `GET /count` answers {"answered", "rows"}. One JSON line
{"ready": true, "port": P} on stdout once listening; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import signal
import socket
from pathlib import Path
from typing import Any

import aiosqlite
import tornado.httpserver
import tornado.netutil
import tornado.web

from daemon.bench.common import HOST

STATES = frozenset({"sync", "exists", "not_exists"})


class Receiver:
    def __init__(self, channels: dict[str, list[str]], db: aiosqlite.Connection | None) -> None:
        self.channels = channels
        self.db = db
        self.answered = 0
        self.rows = 0


class WebhookHandler(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def check_xsrf_cookie(self) -> None:
        pass

    async def post(self) -> None:
        headers = self.request.headers
        channel = self.receiver.channels.get(headers.get("X-Goog-Channel-ID", ""))
        number = headers.get("X-Goog-Message-Number", "")
        state = headers.get("X-Goog-Resource-State", "")
        if channel is None or not number.isdigit() or state not in STATES:
            raise tornado.web.HTTPError(400)
        token = headers.get("X-Goog-Channel-Token", "").encode()
        resource = headers.get("X-Goog-Resource-ID", "").encode()
        if not (
            hmac.compare_digest(token, channel[0].encode())
            and hmac.compare_digest(resource, channel[1].encode())
        ):
            raise tornado.web.HTTPError(403)
        db = self.receiver.db
        if db is not None:
            await db.execute(
                "INSERT INTO notifications (channel_id, message_number, state) VALUES (?, ?, ?)",
                (headers["X-Goog-Channel-ID"], int(number), state),
            )
            await db.commit()
            self.receiver.rows += 1
        self.receiver.answered += 1
        self.set_status(200)
        self.finish()


class CountHandler(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def get(self) -> None:
        rows = None
        if self.receiver.db is not None:
            async with self.receiver.db.execute("SELECT COUNT(*) FROM notifications") as cursor:
                found = await cursor.fetchone()
            rows = int(found[0]) if found else 0
        self.finish({"answered": self.receiver.answered, "rows": rows})


async def open_db(path: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute(
        "CREATE TABLE IF NOT EXISTS notifications (id INTEGER PRIMARY KEY, channel_id TEXT,"
        " message_number INTEGER, state TEXT, received_at REAL DEFAULT (julianday('now')))"
    )
    await db.commit()
    return db


async def serve(kind: str, channels: dict[str, list[str]], db_path: str | None) -> None:
    db = await open_db(db_path) if kind == "naive" and db_path else None
    receiver = Receiver(channels, db)
    shared: dict[str, Any] = {"receiver": receiver}
    app = tornado.web.Application(
        [(r"/notifications", WebhookHandler, shared), (r"/count", CountHandler, shared)],
        log_function=lambda handler: None,  # no access log: the least a receiver does
    )
    sockets = tornado.netutil.bind_sockets(0, HOST, family=socket.AF_INET)
    server = tornado.httpserver.HTTPServer(app, idle_connection_timeout=60)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"ready": True, "port": sockets[0].getsockname()[1]}), flush=True)
    await stop.wait()
    server.stop()
    if db is not None:
        await db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("bare", "naive"), required=True)
    parser.add_argument("--channels", required=True, help="JSON {channel id: [token, resource]}")
    parser.add_argument("--db", help="the SQLite file (naive)")
    args = parser.parse_args()
    if args.kind == "naive" and not args.db:
        parser.error("--kind naive needs --db")
    channels = json.loads(Path(args.channels).read_text(encoding="utf-8"))
    asyncio.run(serve(args.kind, channels, args.db))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
