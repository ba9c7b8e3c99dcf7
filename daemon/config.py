"""The configuration schema: every key with its default, unit and help, checked by pydantic."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemon.origins import ANY, normal_origin, origin_problem

NOTIFICATION_BODY_MAX = 256  # bytes of fcm.notification_body
DEFAULT_ROOMS_QUERY = "{ allRooms { rooms { calendarId firebaseToken } } }"


def key(
    default: Any,
    unit: str,
    help: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    path: bool = False,
    secret: bool = False,
) -> Any:
    """A config key: its default, its unit ("" when none), one line of help and its bounds.

    `path`: relative to the config file; `secret`: masked whenever the config is shown.
    """
    extra: dict[str, Any] = {"unit": unit, "path": path, "secret": secret}
    return Field(default=default, description=help, ge=ge, le=le, json_schema_extra=extra)


# Keys that are gone, and what took their place: naming one stops the start with that line.
REPLACED_KEYS = {
    "server.xheaders": "replaced by server.trusted_proxies, the CIDRs of the proxies whose "
    "X-Forwarded-For, X-Real-Ip and X-Forwarded-Proto are believed",
}


def check_cidrs(value: list[str]) -> list[str]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as error:
            raise ValueError(f"{cidr!r} is not a CIDR") from error
    return value


Seconds = Annotated[int, Field(ge=0)]
PositiveSeconds = Annotated[int, Field(ge=1)]
Timeout = Annotated[float, Field(gt=0, le=3600)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Server(Section):
    """Where and how the HTTP server listens."""

    host: str = key("127.0.0.1", "", "address to listen on")
    port: int = key(8080, "", "TCP port to listen on (0: any free port)", ge=0, le=65535)
    public_url: str | None = key(
        None,
        "URL",
        "how Google reaches us; https:// unless loopback (none: http://<host>:<port>)",
    )
    trusted_proxies: list[str] = key(
        [], "", "CIDRs of proxies whose X-Forwarded-For/-Proto and X-Real-Ip are believed"
    )
    max_body_size: int = key(65536, "bytes", "larger request bodies get 413", ge=1024, le=2**26)
    shutdown_timeout: Timeout = key(10, "seconds", "time to drain on SIGTERM before exiting")
    state_dir: str = key(
        "var", "path", "directory for files the service writes (emulator keys)", path=True
    )

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)


class Storage(Section):
    """Where rooms, channels and notifications are kept."""

    url: str = key(
        "sqlite:///var/mrm-push.sqlite3",
        "URL",
        "sqlite:///relative/path, sqlite:////absolute/path or mongodb://...",
    )
    mongo_driver: Literal["motor", "pymongo"] = key(
        "motor", "", "motor, or pymongo for its AsyncMongoClient"
    )
    retention_days: int = key(14, "days", "published notifications are kept this long", ge=1)
    lease_seconds: int = key(
        15,
        "seconds",
        "instance lease, renewed every third of it; a killed instance's is taken over after it",
        ge=1,
        le=3600,
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("sqlite:///") and value.strip("/") != "sqlite:":
            return value
        if value.startswith(("mongodb://", "mongodb+srv://")):
            return value
        raise ValueError("must be sqlite:///path or mongodb://...")


class Google(Section):
    """Google Calendar access and watch channels."""

    service_account_file: str | None = key(
        None, "path", "service-account key file; its token_uri is the OAuth URL", path=True
    )
    subject: str | None = key(None, "", "user to act as, with domain-wide delegation")
    calendar_endpoint: str = key(
        "https://www.googleapis.com/calendar/v3/", "URL", "Calendar API base URL"
    )
    webhook_path: str = key("/notifications", "", "path Google posts notifications to")
    channel_ttl: int = key(604800, "seconds", "channel lifetime asked of Google", ge=60)
    renew_before: int = key(86400, "seconds", "renew channels expiring within this", ge=0)
    renew_check_interval: PositiveSeconds = key(600, "seconds", "time between renewal checks")
    request_timeout: Timeout = key(10, "seconds", "one Google call, queueing included")
    max_concurrency: int = key(4, "", "Google calls at once", ge=1, le=64)
    max_retries: int = key(8, "", "background retries of a pending channel", ge=0)

    @field_validator("webhook_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value:
            raise ValueError("must be a path starting with /")
        return value


class Fcm(Section):
    """Firebase Cloud Messaging (HTTP v1) to the room tablets."""

    backend: Literal["firebase-admin", "pyfcm"] = key(
        "firebase-admin", "", "FCM client library: firebase-admin or pyfcm"
    )
    service_account_file: str | None = key(None, "path", "Firebase service-account key", path=True)
    project_id: str | None = key(None, "", "Firebase project id (default: the key's)")
    endpoint: str = key("https://fcm.googleapis.com", "URL", "scheme and host of the FCM API")
    max_attempts: int = key(8, "", "attempts per delivery before it is failed", ge=1)
    attempt_timeout: Timeout = key(30, "seconds", "one FCM request at most")
    mismatch_breaker: int = key(
        5, "", "SENDER_ID_MISMATCH tokens within 60 s that stop token dropping", ge=1
    )
    tombstone_days: int = key(30, "days", "how long a refused token stays out of refresh", ge=1)
    notification_body: str | None = key(
        None, "", 'also send notification.body (the old mrm_push sent "success"); none: data only'
    )

    @field_validator("notification_body")
    @classmethod
    def _body(cls, value: str | None) -> str | None:
        # FCM's whole message stays under 4 KB; the data map already takes up to 3,500 bytes.
        if value is not None and not 1 <= len(value.encode()) <= NOTIFICATION_BODY_MAX:
            raise ValueError(f"must be 1-{NOTIFICATION_BODY_MAX} bytes")
        return value


class WebSocket(Section):
    """The companion app's live feed on /ws."""

    ping_interval: PositiveSeconds = key(25, "seconds", "server ping; silent clients dropped")
    max_queue: int = key(1000, "messages", "unsent backlog before a 4008 close", ge=1)
    max_message_size: int = key(65536, "bytes", "largest frame a client may send", ge=256)
    max_connections: int = key(20000, "", "sockets at once; more get 503", ge=1)
    max_subscriptions: int = key(1000, "", "calendars per socket", ge=1)
    send_buffer: int = key(
        131072,
        "bytes",
        "kernel send buffer per socket (SO_SNDBUF; Linux reserves twice this)",
        ge=4096,
        le=2**26,
    )
    allowed_origins: list[str] = key(
        [], "", 'browser origins allowed: scheme://host[:port], or "*" (empty: same origin)'
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        normal = []
        for origin in value:
            if origin == ANY:
                normal.append(origin)
                continue
            problem = origin_problem(origin)
            if problem is not None:
                raise ValueError(f"{origin!r} {problem}")
            normal.append(normal_origin(origin) or origin)
        return normal


class Subscriber(Section):
    """One companion-app credential and the calendars it may see."""

    token: str | None = key(None, "", "subscriber token", secret=True)
    token_file: str | None = key(None, "path", "file holding the token", path=True)
    calendars: list[str] = key(["*"], "", 'calendar ids, or ["*"] for all')

    @model_validator(mode="after")
    def _one_token(self) -> Subscriber:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token or token_file")
        return self


class Auth(Section):
    """Who may call what."""

    api_keys: list[str] = key([], "", "API keys for the management API", secret=True)
    api_keys_file: str | None = key(None, "path", "file with one API key per line", path=True)
    subscribers: list[Subscriber] = key([], "", "WebSocket subscriber tokens (docs/protocol.md)")
    legacy_allow_from: list[str] = key([], "", "CIDRs allowed on legacy routes without a key")
    metrics_token: str | None = key(None, "", "Bearer token required for /metrics", secret=True)
    metrics_token_file: str | None = key(None, "path", "file holding metrics_token", path=True)

    @field_validator("legacy_allow_from")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)


class Backend(Section):
    """mrm_api, the GraphQL backend: room refresh and notify."""

    url: str | None = key(None, "URL", "GraphQL endpoint of mrm_api")
    token: str | None = key(None, "", "Bearer token for the backend", secret=True)
    token_file: str | None = key(None, "path", "file holding the backend token", path=True)
    rooms_query: str = key(DEFAULT_ROOMS_QUERY, "", "GraphQL query listing the rooms")
    prune: bool = key(False, "", "remove rooms the backend no longer lists on refresh")
    notify: bool = key(
        True, "", "send the mrmNotification mutation after each publication (with backend.url)"
    )
    refresh_interval: Seconds = key(
        3600, "seconds", "periodic refresh when backend.url is set; 0 = only on request"
    )
    timeout: Timeout = key(10, "seconds", "one backend call at most")
    max_attempts: int = key(8, "", "attempts per notify before it is failed", ge=1)


class Sync(Section):
    """The safety-net poll."""

    poll_interval: Seconds = key(900, "seconds", "incremental sync of every calendar; 0 = off")


class Logging(Section):
    """Log output (one JSON object per line on stderr)."""

    level: Literal["debug", "info", "warning", "error"] = key("info", "", "lowest level logged")


class Config(Section):
    """The whole configuration."""

    server: Server = Server()
    storage: Storage = Storage()
    google: Google = Google()
    fcm: Fcm = Fcm()
    websocket: WebSocket = WebSocket()
    auth: Auth = Auth()
    backend: Backend = Backend()
    sync: Sync = Sync()
    logging: Logging = Logging()


SECTIONS: dict[str, type[Section]] = {
    name: info.annotation  # type: ignore[misc]
    for name, info in Config.model_fields.items()
}
