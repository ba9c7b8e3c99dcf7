"""GET /ws, the companion app's live feed (contract 5): upgrade checks, then the subscribe protocol.

The protocol is subscribe / unsubscribe / ping; the fan-out hub (daemon/fanout.py) does the
sending."""

from __future__ import annotations

import hmac
import json
import logging
import socket
from http.client import responses
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import urlsplit

from tornado import web, websocket

from daemon.configfile import Subscriber
from daemon.fanout import Client, FanoutHub
from daemon.ids import calendar_id_problem
from daemon.origins import ANY, normal_origin
from handlers.base import ApiError, BadJson, bearer_token, load_json
from storage.base import StoreError

if TYPE_CHECKING:
    from daemon.app import Service

log = logging.getLogger(__name__)

BAD_FRAMES_ALLOWED = 2  # the next one closes the socket with 1008
# The close reason (1008) when a reload removed the socket's token; not a secret.
TOKEN_REVOKED = "token revoked"  # noqa: S105
SEQ_MAX = 2**63 - 1
ORIGIN_SHOWN = 200  # characters of a refused Origin put in the log and the answer


class BadMessage(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def find_subscriber(token: str, subscribers: tuple[Subscriber, ...]) -> Subscriber | None:
    """The subscriber holding `token`, every token compared in constant time."""
    given = token.encode()
    found: Subscriber | None = None
    for subscriber in subscribers:
        if hmac.compare_digest(given, subscriber.token.encode()) and found is None:
            found = subscriber
    return found


def _calendar_list(data: dict[str, Any]) -> list[str]:
    ids = data.get("calendar_ids")
    if not isinstance(ids, list) or not ids:
        raise BadMessage("invalid_message", "calendar_ids must be a non-empty list")
    for calendar_id in ids:
        if not isinstance(calendar_id, str):
            raise BadMessage("invalid_message", "calendar_ids must hold strings")
        problem = None if calendar_id == "*" else calendar_id_problem(calendar_id)
        if problem is not None:
            raise BadMessage("invalid_message", problem)
    return list(dict.fromkeys(ids))


class WebSocketFeedHandler(websocket.WebSocketHandler):
    """One companion-app socket."""

    auth: ClassVar[str] = "subscriber"

    client: Client | None = None
    subscriber: Subscriber
    bad_frames = 0

    # -- shared objects ----------------------------------------------------------------------
    @property
    def service(self) -> Service:
        return cast("Service", self.settings["service"])

    @property
    def hub(self) -> FanoutHub:
        return self.service.fanout

    # -- before the upgrade ------------------------------------------------------------------
    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        token = bearer_token(self.request) or self.get_query_argument("access_token", "") or ""
        subscriber = find_subscriber(token, self.service.secrets.subscribers)
        if subscriber is None:
            raise ApiError(401, "unauthorized", "a valid subscriber token is required")
        self.subscriber = subscriber
        problem = self._origin_problem()
        if problem is not None:
            origin = self.request.headers.get("Origin")
            log.warning(
                "websocket_origin_refused",
                extra={
                    "origin": None if origin is None else origin[:ORIGIN_SHOWN],
                    "sec_fetch_site": self.request.headers.get("Sec-Fetch-Site"),
                },
            )
            raise ApiError(403, "origin_not_allowed", problem)

    def _origin_problem(self) -> str | None:
        """Browsers say where a page comes from; non-browser clients send no Origin. The same
        rules as Tornado's own check (which runs again after this one), answered in JSON."""
        headers = self.request.headers
        site = headers.get("Sec-Fetch-Site")
        origin = headers.get("Origin")
        netloc = ""
        if origin is not None:
            try:
                netloc = urlsplit(origin).netloc.lower()
            except ValueError:  # "http://[::1": Tornado's own check would raise on it (a 500)
                return f"origin {origin[:ORIGIN_SHOWN]} is not a URL"
        if site in ("same-origin", "none"):
            return None
        if origin is None:
            return None if site is None else f"Sec-Fetch-Site {site} without an Origin"
        if site is None and netloc == headers.get("Host", "").lower():
            return None
        if self.check_origin(origin):
            return None
        return f"origin {origin[:ORIGIN_SHOWN]} is not in websocket.allowed_origins"

    def check_origin(self, origin: str) -> bool:
        allowed = self.service.config.websocket.allowed_origins  # normal forms (the config)
        if ANY in allowed:
            return True
        normal = normal_origin(origin)
        return normal is not None and normal in allowed

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise ApiError(400, "websocket_required", "this route speaks WebSocket only")
        hub = self.hub
        if hub.closing:
            raise ApiError(503, "shutting_down", "the service is shutting down")
        limit = self.service.config.websocket.max_connections
        if hub.sockets_in_use >= limit:
            raise ApiError(503, "too_many_connections", f"{limit} sockets are open already")
        hub.sockets_in_use += 1  # held for the upgrade and the socket's whole life
        try:
            await super().get(*args, **kwargs)
        finally:
            hub.sockets_in_use -= 1

    # The hub pings every socket from one timer (no Task per socket) and drops silent ones.
    @property
    def ping_interval(self) -> float | None:
        return None

    @property
    def max_message_size(self) -> int:
        return self.service.config.websocket.max_message_size

    def get_compression_options(self) -> dict[str, Any] | None:
        return None  # frames are made once for every socket: never per-socket compressed

    # -- the socket --------------------------------------------------------------------------
    def open(self, *args: str, **kwargs: str) -> None:
        connection = self.ws_connection
        assert connection is not None and connection.stream is not None
        connection.set_nodelay(True)  # frames are joined per tick already; no Nagle delay
        self._cap_send_buffer(connection.stream.socket)
        # A reload (SIGHUP) during the upgrade may have revoked the token prepare() accepted, or
        # changed its calendars: the socket starts with the subscriber as configured now.
        subscriber = find_subscriber(self.subscriber.token, self.service.secrets.subscribers)
        self.client = self.hub.connect(connection.stream, self.close, subscriber)
        if self.client is None:
            self.close(1001, "server shutting down")
        elif subscriber is None:
            self.hub.close(self.client, 1008, TOKEN_REVOKED)

    def _cap_send_buffer(self, sock: socket.socket | None) -> None:
        """Left alone, Linux grows a socket's send buffer to tcp_wmem's maximum (some 4 MB) for
        a client that never reads: websocket.max_queue would bound only what lies beyond."""
        if sock is None:
            return  # closed already: on_close follows
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, self.service.config.websocket.send_buffer
            )
        except OSError as error:  # the peer may be gone by now; the stream will notice
            log.debug("websocket_send_buffer_not_set", extra={"reason": str(error)})

    def on_close(self) -> None:
        if self.client is not None:
            self.hub.disconnect(self.client)
            # The Client holds this handler (its closer): without this, the two (and the
            # socket's buffers) would wait for the cyclic GC's next full collection.
            self.client = None

    def on_ping(self, data: bytes) -> None:
        if self.client is not None:
            self.client.heard = True

    def on_pong(self, data: bytes) -> None:
        if self.client is not None:
            self.client.heard = True

    async def on_message(self, message: str | bytes) -> None:
        client = self.client
        if client is None or client.closing:
            return
        client.heard = True
        try:
            if isinstance(message, bytes):
                raise BadMessage("invalid_message", "binary frames are not accepted")
            try:
                data = load_json(message)
            except BadJson as error:
                raise BadMessage("invalid_json", f"the frame {error}") from None
            if not isinstance(data, dict):
                raise BadMessage("invalid_message", "a frame must hold one JSON object")
            kind = data.get("type")
            if kind == "ping":
                self.hub.send(client, {"type": "pong"})
            elif kind == "subscribe":
                await self._subscribe(client, data)
            elif kind == "unsubscribe":
                self._unsubscribe(client, data)
            else:
                raise BadMessage("unknown_type", f"unknown message type {kind!r}")
        except BadMessage as error:
            self.bad_frames += 1
            if self.bad_frames > BAD_FRAMES_ALLOWED:
                self.hub.close(client, 1008, "too many bad frames")
            else:
                self._error(client, error.code, error.message)

    def _error(self, client: Client, code: str, message: str, **extra: Any) -> None:
        self.hub.send(client, {"type": "error", "code": code, "message": message, **extra})

    async def _subscribe(self, client: Client, data: dict[str, Any]) -> None:
        requested = _calendar_list(data)
        after = data.get("after")
        if after is not None and (
            not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= SEQ_MAX
        ):
            raise BadMessage("invalid_message", "after must be a seq (an integer >= 0)")
        epoch = data.get("store_epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise BadMessage("invalid_message", "store_epoch must be a string")
        try:
            store_epoch = await self.hub.store_epoch()
        except StoreError as error:
            self._error(client, "storage_unavailable", str(error))
            return
        if client.closing or client.subscriber is None:
            return
        # The calendars the token may see as of now (a reload may have changed them while the
        # store was asked), and from here to `subscribed` nothing awaits: no live notification
        # comes before it.
        allowed = client.subscriber.calendars
        sees_all = "*" in allowed
        visible = set(allowed)
        wanted: list[str] = []
        forbidden: list[str] = []
        wildcard = False
        for calendar_id in requested:
            if calendar_id == "*":
                if sees_all:
                    wildcard = True
                else:
                    wanted.extend(allowed)
            elif sees_all or calendar_id in visible:
                wanted.append(calendar_id)
            else:
                forbidden.append(calendar_id)
        accepted, refused, wildcard = self.hub.subscribe(
            client, list(dict.fromkeys(wanted)), wildcard, replay=after is not None
        )
        self.hub.send(
            client,
            {
                "type": "subscribed",
                "calendar_ids": (["*"] if wildcard else []) + accepted,
                "store_epoch": store_epoch,
            },
        )
        for calendar_id in forbidden:
            self._error(
                client,
                "forbidden_calendar",
                "this token may not see that calendar",
                calendar_id=calendar_id,
            )
        if refused:
            index = self.hub.index
            self._error(
                client,
                "too_many_subscriptions",
                f"a socket may hold {index.max_count} subscriptions, their calendar ids "
                f"{index.max_bytes} bytes in all; these were left out",
                calendar_ids=refused,
            )
        if after is not None:
            await self.hub.replay(client, None if wildcard else accepted, after, epoch)

    def _unsubscribe(self, client: Client, data: dict[str, Any]) -> None:
        requested = _calendar_list(data)
        everything = "*" in requested
        calendars = list(client.calendars) if everything else requested
        self.hub.unsubscribe(client, calendars, everything=everything)
        self.hub.send(client, {"type": "unsubscribed", "calendar_ids": requested})

    # -- errors before the upgrade -----------------------------------------------------------
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        code = responses.get(status_code, "error").lower().replace(" ", "_")
        message = responses.get(status_code, "error")
        exc_info = kwargs.get("exc_info")
        if exc_info is not None and isinstance(exc_info[1], ApiError):
            code, message = exc_info[1].code, exc_info[1].message
        if status_code == 401:
            self.set_header("WWW-Authenticate", "Bearer")
        self.finish(
            json.dumps({"error": {"status": status_code, "code": code, "message": message}})
        )

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, web.HTTPError):
            return  # answered with its status and code; the access line records it
        log.error("websocket_error", exc_info=(typ, value, tb), extra={"route": "/ws"})


routes = [(r"/ws", WebSocketFeedHandler)]
