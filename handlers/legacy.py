"""The old mrm_push routes, kept as drop-ins for mrm_api's tasks, with their answer shapes."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from handlers.base import ApiError
from handlers.refresh import RefreshHandler
from handlers.rooms import RoomsBase, channel_json, check_calendar_id, check_token

log = logging.getLogger(__name__)


class LegacyBase(RoomsBase):
    """Refused (401, one WARNING line) unless the caller has the API key or an allowed address."""

    auth = "legacy"

    async def authenticate(self) -> None:
        if self.has_api_key() or self._address_allowed():
            return
        log.warning(
            "legacy_call_refused",
            extra={"route": self.request.path, "remote": self.request.remote_ip},
        )
        raise ApiError(401, "unauthorized", "an API key or an allowed address is required")

    def _address_allowed(self) -> bool:
        try:
            address = ipaddress.ip_address(self.request.remote_ip or "")
        except ValueError:
            return False
        return any(
            address in ipaddress.ip_network(cidr, strict=False)
            for cidr in self.service.config.auth.legacy_allow_from
        )

    def param(self, name: str, required: bool = True) -> str | None:
        """From the query string or a JSON body, as the old service took them."""
        value: Any = self.get_query_argument(name, None)
        if value is None and self.body.strip():
            value = self.json_body().get(name)
        if value is None or value == "":
            if required:
                raise ApiError(400, f"missing_{name}", f"{name} is required")
            return None
        if not isinstance(value, str):
            raise ApiError(400, f"invalid_{name}", f"{name} must be a string")
        return value


class AddRoomHandler(LegacyBase):
    """GET/POST /add_room?calendar_id=&firebase_token="""

    async def get(self) -> None:
        calendar_id = check_calendar_id(self.param("calendar_id") or "")
        token = self.param("firebase_token", required=False)
        room, _ = await self.service.rooms.put(calendar_id, None, None)
        if token is not None:
            room = await self.service.rooms.add_token(calendar_id, check_token(token)) or room
        answer = await self.room_answer(room)
        self.write_json({"message": "Room added successfully.", "room": answer})

    post = get


class DeleteRoomHandler(LegacyBase):
    """DELETE /delete_room?calendar_id="""

    async def delete(self) -> None:
        calendar_id = check_calendar_id(self.param("calendar_id") or "")
        if await self.service.rooms.delete(calendar_id):
            self.write_json({"message": "Room stopped from listening for notifications"})
        else:
            self.write_json({"message": "Room not found under notifications list"})


class TokenHandler(LegacyBase):
    """GET/POST /token?calendar_id=&firebase_token= : the set becomes that one token."""

    async def get(self) -> None:
        calendar_id = check_calendar_id(self.param("calendar_id") or "")
        token = check_token(self.param("firebase_token"))
        await self.known_room(calendar_id)
        room, _ = await self.service.rooms.put(calendar_id, None, [token])
        self.write_json({"message": "OK", "room": await self.room_answer(room)})

    post = get


class LegacyRefreshHandler(LegacyBase, RefreshHandler):
    """GET/POST /refresh (LegacyBase comes first: its auth decision and check apply)"""

    async def get(self) -> None:
        summary = await self.run_refresh()
        self.write_json({"message": "Calendars saved successfully", **summary})

    post = get


class LegacyChannelsHandler(LegacyBase):
    """GET /channels (every channel) · POST /channels (renew every channel)"""

    async def get(self) -> None:
        channels = await self.service.store.list_channels()
        self.write_json({"channels": [channel_json(c) for c in channels]})

    async def post(self) -> None:
        self.write_json((await self.service.channels.renew_now()).as_json())


routes = [
    (r"/add_room", AddRoomHandler),
    (r"/delete_room", DeleteRoomHandler),
    (r"/token", TokenHandler),
    (r"/refresh", LegacyRefreshHandler),
    (r"/channels", LegacyChannelsHandler),
]
