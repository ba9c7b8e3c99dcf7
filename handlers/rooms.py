"""The management API for rooms, their tablets' tokens and their watch channels."""

from __future__ import annotations

from typing import Any

from daemon.channels import current_of
from daemon.clock import rfc3339
from daemon.ids import TOKEN_RULE, calendar_id_problem, text_problem, valid_token
from handlers.base import ApiError, BaseHandler
from storage.base import Channel, Room

ROOM_FIELDS = frozenset({"firebase_tokens", "firebase_token", "name"})


def check_calendar_id(calendar_id: str) -> str:
    problem = calendar_id_problem(calendar_id)
    if problem is not None:
        raise ApiError(400, "invalid_calendar_id", problem)
    return calendar_id


def check_token(token: Any) -> str:
    if not valid_token(token):
        raise ApiError(400, "invalid_token", TOKEN_RULE)
    return str(token)


def room_tokens_from_body(body: dict[str, Any]) -> tuple[str | None, list[str] | None]:
    """(name, token list) from a PUT body; None where the body leaves them as they are."""
    unknown = set(body) - ROOM_FIELDS
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 256):
        raise ApiError(400, "invalid_name", "name must be a string of at most 256 characters")
    problem = text_problem("name", name) if name is not None else None
    if problem is not None:
        raise ApiError(400, "invalid_name", problem)
    if "firebase_tokens" in body and "firebase_token" in body:
        raise ApiError(400, "invalid_body", "give firebase_tokens or firebase_token, not both")
    tokens: list[str] | None = None
    if "firebase_tokens" in body:
        given = body["firebase_tokens"]
        if not isinstance(given, list) or len(given) > 1000:
            raise ApiError(400, "invalid_token", "firebase_tokens must be a list (1000 at most)")
        tokens = [check_token(t) for t in given]
    elif body.get("firebase_token") is not None:
        tokens = [check_token(body["firebase_token"])]
    return name, tokens


def channel_json(channel: Channel) -> dict[str, Any]:
    """A channel as the API shows it; its token never leaves the service."""
    return {
        "id": channel.id,
        "calendar_id": channel.calendar_id,
        "resource_id": channel.resource_id,
        "expiration": rfc3339(channel.expiration),
        "state": channel.state,
        "confirmed": channel.confirmed,
        "last_error": channel.last_error,
        "created_at": rfc3339(channel.created_at),
    }


def room_json(room: Room, channel: Channel | None, full: bool = False) -> dict[str, Any]:
    tokens = list(room.firebase_tokens) if full else [t[-8:] for t in room.firebase_tokens]
    return {
        "calendar_id": room.calendar_id,
        "name": room.name,
        "firebase_tokens": tokens,
        "created_at": rfc3339(room.created_at),
        "updated_at": rfc3339(room.updated_at),
        "channel": channel_json(channel) if channel else None,
    }


class RoomsBase(BaseHandler):
    """Shared by the room handlers: the room with its current channel, as JSON."""

    async def room_answer(self, room: Room) -> dict[str, Any]:
        channel = await self.service.channels.current_channel(room.calendar_id)
        return room_json(room, channel, full=self.flag_arg("full"))

    async def known_room(self, calendar_id: str) -> Room:
        room = await self.service.store.rooms.get(check_calendar_id(calendar_id))
        if room is None:
            raise ApiError(404, "room_not_found", f"no room for calendar {calendar_id!r}")
        return room


class RoomListHandler(RoomsBase):
    """GET /v1/rooms"""

    auth = "api_key"

    async def get(self) -> None:
        rooms = await self.service.store.rooms.list()
        by_calendar: dict[str, list[Channel]] = {}
        for channel in await self.service.store.channels.list():
            by_calendar.setdefault(channel.calendar_id, []).append(channel)
        full = self.flag_arg("full")
        answer = [room_json(r, current_of(by_calendar.get(r.calendar_id, [])), full) for r in rooms]
        self.write_json({"rooms": answer})


class RoomHandler(RoomsBase):
    """GET, PUT, DELETE /v1/rooms/{calendar_id}"""

    auth = "api_key"

    async def get(self, calendar_id: str) -> None:
        self.write_json(await self.room_answer(await self.known_room(calendar_id)))

    async def put(self, calendar_id: str) -> None:
        check_calendar_id(calendar_id)
        name, tokens = room_tokens_from_body(self.json_body(required=False))
        room, created = await self.service.rooms.put(calendar_id, name, tokens)
        self.write_json(await self.room_answer(room), 201 if created else 200)

    async def delete(self, calendar_id: str) -> None:
        if not await self.service.rooms.delete(check_calendar_id(calendar_id)):
            raise ApiError(404, "room_not_found", f"no room for calendar {calendar_id!r}")
        self.set_status(204)
        self.finish()


class RoomTokenHandler(RoomsBase):
    """POST, DELETE /v1/rooms/{calendar_id}/tokens/{token}"""

    auth = "api_key"

    async def post(self, calendar_id: str, token: str) -> None:
        await self.known_room(calendar_id)
        room = await self.service.rooms.add_token(calendar_id, check_token(token))
        if room is None:
            raise ApiError(404, "room_not_found", f"no room for calendar {calendar_id!r}")
        self.write_json(await self.room_answer(room))

    async def delete(self, calendar_id: str, token: str) -> None:
        await self.known_room(calendar_id)
        await self.service.store.rooms.remove_token(
            calendar_id, check_token(token), self.service.clock.now()
        )
        self.set_status(204)
        self.finish()


class ChannelListHandler(BaseHandler):
    """GET /v1/channels"""

    auth = "api_key"

    async def get(self) -> None:
        channels = await self.service.store.channels.list()
        self.write_json({"channels": [channel_json(c) for c in channels]})


class ChannelRenewHandler(BaseHandler):
    """POST /v1/channels/renew (?calendar_id=)"""

    auth = "api_key"

    async def post(self) -> None:
        calendar_id = self.str_arg("calendar_id")
        if calendar_id is not None:
            check_calendar_id(calendar_id)
            if await self.service.store.rooms.get(calendar_id) is None:
                raise ApiError(404, "room_not_found", f"no room for calendar {calendar_id!r}")
        summary = await self.service.channels.renew_now(calendar_id)
        self.write_json(summary.as_json())


routes = [
    (r"/v1/rooms", RoomListHandler),
    (r"/v1/rooms/([^/]*)", RoomHandler),
    (r"/v1/rooms/([^/]*)/tokens/([^/]*)", RoomTokenHandler),
    (r"/v1/channels", ChannelListHandler),
    (r"/v1/channels/renew", ChannelRenewHandler),
]
