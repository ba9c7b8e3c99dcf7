"""Which WebSocket clients want which calendar, within each socket's bounds (count and bytes).

A socket may hold websocket.max_subscriptions calendars, and their ids together at most
`max_bytes` (UTF-8) bytes: without that, 1,000 ids of CALENDAR_ID_MAX characters cost a megabyte
per socket. Every socket subscribed to a calendar holds the same str for its id (the one its
`Subscribers` keeps): thousands of sockets watching the same rooms cost one copy of each id,
not one per socket. `by_calendar` is rebuilt when it has shrunk well below its largest size: a
dict never gives back its table on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.fanout import Client

ID_BYTES_MIN = 131072  # a socket's calendar ids together may take this many bytes at least,
ID_BYTES_EACH = 128  # or this much per allowed subscription, when websocket.max_subscriptions
# is raised so far that this is more. 131072 holds 128 ids of CALENDAR_ID_MAX ASCII characters.
REBUILD_FROM = 1024  # by_calendar sizes below this are not worth a rebuild


def id_bytes(calendar_id: str) -> int:
    """The UTF-8 length (what a client sent; a str of it takes about as much, or less)."""
    if calendar_id.isascii():
        return len(calendar_id)
    return len(calendar_id.encode("utf-8", "surrogatepass"))  # JSON may carry a lone surrogate


class Subscribers(set["Client"]):
    """The sockets subscribed to one calendar, and that calendar's id."""

    __slots__ = ("calendar_id",)

    def __init__(self, calendar_id: str) -> None:
        super().__init__()
        self.calendar_id = calendar_id


class Subscriptions:
    """The index the fan-out reads: `by_calendar` and `wildcards`."""

    def __init__(self, max_count: int) -> None:
        self.max_count = max_count
        self.max_bytes = max(ID_BYTES_MIN, max_count * ID_BYTES_EACH)
        self.by_calendar: dict[str, Subscribers] = {}
        self.wildcards: set[Client] = set()
        self.count = 0  # subscriptions of every socket (metrics)
        self._peak = 0  # the largest by_calendar since it was last built

    def add(
        self, client: Client, calendars: list[str], wildcard: bool
    ) -> tuple[list[str], list[str], bool]:
        """Returns (calendars subscribed, calendars refused for a bound, whether "*" is)."""
        room = self.max_count - client.subscription_count
        accepted: list[str] = []
        refused: list[str] = []
        if wildcard and not client.wildcard:
            if room > 0:
                client.wildcard = True
                self.wildcards.add(client)
                self.count += 1
                room -= 1
            else:
                refused.append("*")
                wildcard = False
        for calendar_id in calendars:
            if calendar_id in client.calendars:
                accepted.append(calendar_id)
                continue
            size = id_bytes(calendar_id)
            if room <= 0 or client.id_bytes + size > self.max_bytes:
                refused.append(calendar_id)
                continue
            group = self.by_calendar.get(calendar_id)
            if group is None:
                group = self.by_calendar[calendar_id] = Subscribers(calendar_id)
                self._peak = max(self._peak, len(self.by_calendar))
            group.add(client)
            client.calendars.add(group.calendar_id)
            client.id_bytes += size
            self.count += 1
            room -= 1
            accepted.append(calendar_id)
        return accepted, refused, wildcard

    def remove(self, client: Client, calendars: list[str], *, everything: bool) -> None:
        if everything and client.wildcard:
            client.wildcard = False
            self.wildcards.discard(client)
            self.count -= 1
        by_calendar = self.by_calendar
        for calendar_id in calendars:
            if calendar_id not in client.calendars:
                continue
            client.calendars.discard(calendar_id)
            client.id_bytes -= id_bytes(calendar_id)
            self.count -= 1
            group = by_calendar.get(calendar_id)
            if group is not None:
                group.discard(client)
                if not group:
                    del by_calendar[calendar_id]
        if self._peak >= REBUILD_FROM and len(by_calendar) < self._peak // 4:
            # A quarter of its largest size: a copy gets a table that fits (a copy each time
            # it falls by three quarters costs O(1) per removal, all in all).
            self.by_calendar = dict(by_calendar)
            self._peak = len(self.by_calendar)
