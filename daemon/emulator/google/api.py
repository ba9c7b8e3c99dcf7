"""The Calendar API routes the client library calls: events.watch, events.list, channels.stop."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import tornado.web

from daemon.emulator.google.errors import GoogleApiError
from daemon.emulator.oauth import OAuthEmulator

if TYPE_CHECKING:
    from daemon.emulator.google.emulator import GoogleCalendarEmulator

Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]

# Any of these lets a token read events (readonly is what the service asks for).
CALENDAR_SCOPES = (
    "https://www.googleapis.com/auth/calendar.readonly",
    "https://www.googleapis.com/auth/calendar",
    "https://www.googleapis.com/auth/calendar.events.readonly",
    "https://www.googleapis.com/auth/calendar.events",
)


def authorise(oauth: OAuthEmulator, authorization: str | None) -> None:
    """Google's answers for a missing or dead token (401) and for one without the scope (403)."""
    if oauth.grant(authorization) is None:
        raise GoogleApiError(
            401,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access "
            "token, login cookie or other valid authentication credential.",
        )
    if not any(oauth.verify(authorization, scope) for scope in CALENDAR_SCOPES):
        raise GoogleApiError(
            403, "insufficientPermissions", "Request had insufficient authentication scopes."
        )


class GoogleHandler(tornado.web.RequestHandler):
    """What every Google route shares: the emulator, JSON bodies, Google's error answers."""

    def initialize(self, google: GoogleCalendarEmulator) -> None:
        self.google = google

    def check_xsrf_cookie(self) -> None:  # an API, not a browser form
        pass

    def json_body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise GoogleApiError(400, "parseError", "Parse Error") from None
        if not isinstance(body, dict):
            raise GoogleApiError(400, "parseError", "Parse Error")
        return body

    def fail(self, exc: GoogleApiError) -> None:
        self.set_status(exc.status)
        if exc.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')
        self.finish(exc.body())


class WatchHandler(GoogleHandler):
    async def post(self, calendar_id: str) -> None:
        try:
            body = self.json_body()
            answer, channel = await self.google.call(
                "watch",
                calendar_id,
                self.request.headers.get("Authorization"),
                lambda: self.google.watch(calendar_id, body, self.request.query),
            )
        except GoogleApiError as exc:
            self.fail(exc)
            return
        written = self.finish(answer)
        # Without sync_before_answer the sync goes out now, after the answer.
        self.google.start_sync(channel)
        await written


class StopHandler(GoogleHandler):
    async def post(self) -> None:
        try:
            body = self.json_body()
            known = self.google.channel(str(body.get("id")))
            await self.google.call(
                "stop",
                known.calendar_id if known else None,
                self.request.headers.get("Authorization"),
                lambda: self.google.stop(body),
            )
        except GoogleApiError as exc:
            self.fail(exc)
            return
        self.set_status(204)
        self.finish()


class EventsHandler(GoogleHandler):
    async def get(self, calendar_id: str) -> None:
        args = {name: self.get_query_argument(name) for name in self.request.query_arguments}
        await self._list(calendar_id, args)

    async def post(self, calendar_id: str) -> None:
        """A GET whose URI is too long (over 2,048 characters, e.g. a long percent-encoded
        calendar id) comes as a POST with X-HTTP-Method-Override and the query as a form body,
        as google-api-python-client sends it and Google takes it."""
        if self.request.headers.get("X-HTTP-Method-Override", "").upper() != "GET":
            raise tornado.web.HTTPError(405)
        args = {name: self.get_body_argument(name) for name in self.request.body_arguments}
        await self._list(calendar_id, args)

    async def _list(self, calendar_id: str, args: dict[str, str]) -> None:
        try:
            answer = await self.google.call(
                "list",
                calendar_id,
                self.request.headers.get("Authorization"),
                lambda: self.google.list_events(calendar_id, args),
            )
        except GoogleApiError as exc:
            self.fail(exc)
            return
        self.finish(answer)


def api_routes(google: GoogleCalendarEmulator) -> list[Route]:
    api = {"google": google}
    return [
        (r"/calendar/v3/calendars/([^/]+)/events/watch", WatchHandler, api),
        (r"/calendar/v3/calendars/([^/]+)/events", EventsHandler, api),
        (r"/calendar/v3/channels/stop", StopHandler, api),
    ]
