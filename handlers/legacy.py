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

    def param(self, name: str) -> Any:
        """From the query string or a JSON body, as the old service took them (None: absent)."""
        value: Any = self.str_arg(name)
        if value is None and self.body.strip():
            value = self.json_body().get(name)
        return None if value == "" else value

    def calendar_id_param(self) -> str:
        value = self.param("calendar_id")
        if value is None:
            raise ApiError(400, "invalid_calendar_id", "calendar_id is required")
        if not isinstance(value, str):
            raise ApiError(400, "invalid_calendar_id", "calendar_id must be a string")
        return check_calendar_id(value)

    def token_param(self) -> str | None:
        value = self.param("firebase_token")
        return None if value is None else check_token(value)

    def flag_param(self, name: str) -> bool:
        value = self.param(name)
        return value is True or value == 1 or str(value).lower() in ("1", "true", "yes")


class AddRoomHandler(LegacyBase):
    """GET/POST /add_room?calendar_id=&firebase_token="""

    async def get(self) -> None:
        # Both checked before anything is stored: a bad token must not leave a new room behind.
        calendar_id = self.calendar_id_param()
        token = self.token_param()
        room, _ = await self.service.rooms.put(calendar_id, None, None)
        if token is not None:
            room = await self.service.rooms.add_token(calendar_id, token) or room
        answer = await self.room_answer(room)
        self.write_json({"message": "Room added successfully.", "room": answer})

    post = get


class DeleteRoomHandler(LegacyBase):
    """DELETE /delete_room?calendar_id="""

    async def delete(self) -> None:
        calendar_id = self.calendar_id_param()
        if await self.service.rooms.delete(calendar_id):
            self.write_json({"message": "Room stopped from listening for notifications"})
        else:
            self.write_json({"message": "Room not found under notifications list"})


class TokenHandler(LegacyBase):
    """GET/POST /token?calendar_id=&firebase_token= : the set becomes that one token."""

    async def get(self) -> None:
        calendar_id = self.calendar_id_param()
        token = self.token_param()
        if token is None:
            raise ApiError(400, "invalid_token", "firebase_token is required")
        await self.known_room(calendar_id)
        room, _ = await self.service.rooms.put(calendar_id, None, [token])
        self.write_json({"message": "OK", "room": await self.room_answer(room)})

    post = get


class LegacyRefreshHandler(LegacyBase, RefreshHandler):
    """GET/POST /refresh (?dry_run=1, ?allow_prune=1, or in a JSON body; LegacyBase comes first:
    its auth decision and check apply)"""

    async def get(self) -> None:
        summary = await self.run_refresh(self.flag_param("dry_run"), self.flag_param("allow_prune"))
        self.write_json({"message": "Calendars saved successfully", **summary})

    post = get


class LegacyChannelsHandler(LegacyBase):
    """GET /channels (every channel) · POST /channels (renew every channel)"""

    async def get(self) -> None:
        channels = await self.service.store.channels.list()
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
