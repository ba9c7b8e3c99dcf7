"""The emulator's Tornado application: OAuth, Google Calendar, FCM and the clock, on one port."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import tornado.httpserver
import tornado.netutil
import tornado.web

from daemon.clock import Clock, ManualClock, SystemClock, rfc3339
from daemon.emulator.google import GoogleCalendarEmulator
from daemon.emulator.keys import read_key_info, write_key_info, write_service_account
from daemon.emulator.oauth import OAuthEmulator

Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


class RouteProvider(Protocol):
    def routes(self) -> list[Route]: ...


class OffsetClock:
    """A real clock that demos can move forward: real time plus an offset."""

    def __init__(self, base: Clock) -> None:
        self.base = base
        self.offset = 0.0
        # Called after each move: `serve --emulator` runs its renewal check at once, so that
        # moving the clock shows the renewal without waiting for the next periodic check.
        self.listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.base.now() + self.offset

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        for listener in self.listeners:
            listener()


class ClockHandler(tornado.web.RequestHandler):
    """GET the emulator's time; POST {"advance": seconds} to move it."""

    def initialize(self, google: GoogleCalendarEmulator) -> None:
        self.google = google

    def check_xsrf_cookie(self) -> None:
        pass

    def get(self) -> None:
        now = self.google.now()
        self.finish({"now": rfc3339(now), "epoch": now})

    def post(self) -> None:
        try:
            seconds = float(json.loads(self.request.body or b"{}")["advance"])
        except (ValueError, KeyError, TypeError):
            self.set_status(400)
            self.finish({"error": {"code": 400, "message": 'body must be {"advance": seconds}'}})
            return
        if seconds < 0:
            self.set_status(400)
            self.finish({"error": {"code": 400, "message": "the clock only moves forward"}})
            return
        self.google.advance_clock(seconds)
        self.get()


def build_emulator_app(
    google: GoogleCalendarEmulator,
    oauth: OAuthEmulator,
    extra_routes: Iterable[Route] = (),
) -> tornado.web.Application:
    routes: list[Route] = [
        *oauth.routes(),
        *google.routes(),
        (r"/emulator/clock", ClockHandler, {"google": google}),
        *extra_routes,
    ]
    return tornado.web.Application(routes)


class Emulator:
    """Clock, OAuth, Calendar and (when set) FCM, served together.

    Set `fcm` (anything with `routes()`) before `start()` to serve it too.
    On a real clock the emulator keeps its own offset, so `/emulator/clock`
    moves channel expiry without touching the host's time.
    """

    def __init__(self, clock: Clock | None = None, **google_settings: Any) -> None:
        base = clock or SystemClock()
        self.clock: Clock = base if isinstance(base, ManualClock) else OffsetClock(base)
        self.oauth = OAuthEmulator()
        self.google = GoogleCalendarEmulator(self.clock, self.oauth, **google_settings)
        self.fcm: RouteProvider | None = None
        self.server: tornado.httpserver.HTTPServer | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def calendar_endpoint(self) -> str:
        """What to give google-api-python-client as `api_endpoint`."""
        return self.base_url + "/calendar/v3/"

    def write_service_account(
        self,
        path: str,
        *,
        client_email: str = "mrm-push@mrm-push-emulator.iam.gserviceaccount.com",
        project_id: str = "mrm-push-emulator",
    ) -> dict[str, Any]:
        """A key file whose token_uri is this emulator, already trusted by its OAuth part."""
        info = write_service_account(
            path, token_uri=self.token_url, client_email=client_email, project_id=project_id
        )
        self.oauth.register(info)
        return info

    def keep_service_account(
        self,
        path: str,
        *,
        client_email: str = "mrm-push@mrm-push-emulator.iam.gserviceaccount.com",
        project_id: str = "mrm-push-emulator",
    ) -> dict[str, Any]:
        """The key file a previous run left at `path`, trusted again and its token_uri pointed
        at this run; a new one when there is none. Clients holding the file keep working."""
        info = read_key_info(path, client_email)
        if info is None:
            return self.write_service_account(
                path, client_email=client_email, project_id=project_id
            )
        if info.get("token_uri") != self.token_url:
            info["token_uri"] = self.token_url
            write_key_info(path, info)
        self.oauth.register(info)
        return info

    def app(self) -> tornado.web.Application:
        extra = self.fcm.routes() if self.fcm is not None else []
        return build_emulator_app(self.google, self.oauth, extra)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tornado.httpserver.HTTPServer:
        """Listen (port 0: any free port, then read `.port`); call on the running loop."""
        sockets = tornado.netutil.bind_sockets(port, host, family=socket.AF_INET)
        self.host, self.port = host, sockets[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(self.app())
        self.server.add_sockets(sockets)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.google.close()
