"""The control API for Google (/emulator/google/...): JSON, no auth; each call is one method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from daemon.emulator.google.api import GoogleHandler, Route
from daemon.emulator.google.errors import GoogleApiError
from daemon.emulator.google.model import Settings

if TYPE_CHECKING:
    from daemon.emulator.google.emulator import GoogleCalendarEmulator

SETTINGS = tuple(f.name for f in fields(Settings))


class _Control(GoogleHandler):
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": {"code": status_code, "message": self._reason}})

    def _handle(self, action: Callable[[], Any], status: int = 200) -> None:
        try:
            result = action()
        except GoogleApiError as exc:
            self.fail(exc)
            return
        except (TypeError, ValueError, KeyError) as exc:
            self.set_status(400)
            self.finish({"error": {"code": 400, "message": str(exc)}})
            return
        self.set_status(status)
        if result is None:
            self.set_status(204)
            self.finish()
        else:
            self.finish(result)


def _event_fields(body: dict[str, Any]) -> dict[str, Any]:
    allowed = ("summary", "start", "end", "status")
    return {k: v for k, v in body.items() if k in allowed}


class ControlCalendarsHandler(_Control):
    def get(self) -> None:
        self.finish({"calendars": self.google.calendar_ids()})

    def post(self) -> None:
        body = self.json_body()
        self._handle(lambda: {"id": self.google.create_calendar(str(body["id"])).id}, 201)


class ControlCalendarHandler(_Control):
    def delete(self, calendar_id: str) -> None:
        self._handle(lambda: self.google.delete_calendar(calendar_id))


class ControlEventsHandler(_Control):
    def get(self, calendar_id: str) -> None:
        self._handle(lambda: {"items": self.google.events(calendar_id)})

    def post(self, calendar_id: str) -> None:
        body = self.json_body()
        self._handle(
            lambda: self.google.insert_event(
                calendar_id, event_id=body.get("id"), **_event_fields(body)
            ),
            201,
        )


class ControlEventHandler(_Control):
    def patch(self, calendar_id: str, event_id: str) -> None:
        body = self.json_body()
        self._handle(lambda: self.google.update_event(calendar_id, event_id, **_event_fields(body)))

    def delete(self, calendar_id: str, event_id: str) -> None:
        self._handle(lambda: self.google.cancel_event(calendar_id, event_id))


class ControlExpireHandler(_Control):
    def post(self, calendar_id: str) -> None:
        self._handle(lambda: self.google.expire_sync_tokens(calendar_id))


class ControlChannelsHandler(_Control):
    def get(self) -> None:
        calendar_id = self.get_query_argument("calendar_id", None)
        self.finish({"channels": self.google.channels(calendar_id)})


class ControlFailuresHandler(_Control):
    def post(self) -> None:
        body = self.json_body()

        def inject() -> None:
            self.google.inject(
                str(body["method"]),
                count=int(body.get("count", 1)),
                status=body.get("status"),
                reason=body.get("reason"),
                message=body.get("message"),
                delay=float(body.get("delay", 0.0)),
                calendar_id=body.get("calendar_id"),
            )

        self._handle(inject)

    def delete(self) -> None:
        self._handle(self.google.clear_failures)


class ControlWebhooksHandler(_Control):
    def get(self) -> None:
        self.finish({"attempts": [a.as_json() for a in self.google.webhooks]})


class ControlSettingsHandler(_Control):
    def get(self) -> None:
        self.finish({name: getattr(self.google, name) for name in SETTINGS})

    def patch(self) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - set(SETTINGS))
        if unknown:
            self.set_status(400)
            self.finish({"error": {"code": 400, "message": f"unknown settings {unknown}"}})
            return
        for name, value in body.items():
            setattr(self.google, name, value)
        self.get()


def control_routes(google: GoogleCalendarEmulator) -> list[Route]:
    api = {"google": google}
    return [
        (r"/emulator/google/calendars", ControlCalendarsHandler, api),
        (r"/emulator/google/calendars/([^/]+)", ControlCalendarHandler, api),
        (r"/emulator/google/calendars/([^/]+)/events", ControlEventsHandler, api),
        (r"/emulator/google/calendars/([^/]+)/events/([^/]+)", ControlEventHandler, api),
        (r"/emulator/google/calendars/([^/]+)/expire-sync-tokens", ControlExpireHandler, api),
        (r"/emulator/google/channels", ControlChannelsHandler, api),
        (r"/emulator/google/failures", ControlFailuresHandler, api),
        (r"/emulator/google/webhooks", ControlWebhooksHandler, api),
        (r"/emulator/google/settings", ControlSettingsHandler, api),
    ]
