"""The FCM message as FCM parses it: field names, types, one target, data size; its errors."""

from __future__ import annotations

import json
import re
from typing import Any

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# FCM documents 4096 bytes for a data message (keys and values together).
MAX_DATA_BYTES = 4096
_DURATION_RE = re.compile(r"^-?\d+(\.\d{1,9})?s$")

# The proto messages FCM parses, as {field: sub-schema}; a sub-schema is a nested dict,
# "string", "string_map", "any" (a Struct or a field we do not look into).
_Schema = dict[str, Any]
_ANDROID_NOTIFICATION: _Schema = {
    name: "any"
    for name in (
        "title body icon color sound tag click_action body_loc_key body_loc_args "
        "title_loc_key title_loc_args channel_id ticker sticky event_time local_only "
        "notification_priority default_sound default_vibrate_timings "
        "default_light_settings vibrate_timings visibility notification_count "
        "light_settings image bypass_proxy_notification proxy"
    ).split()
}
_ANDROID: _Schema = {
    "collapse_key": "string",
    "priority": "priority",
    "ttl": "duration",
    "restricted_package_name": "string",
    "data": "string_map",
    "notification": _ANDROID_NOTIFICATION,
    "fcm_options": {"analytics_label": "string"},
    "direct_boot_ok": "any",
    "bandwidth_constrained_ok": "any",
    "restricted_satellite_ok": "any",
}
_MESSAGE: _Schema = {
    "name": "string",
    "data": "string_map",
    "notification": {"title": "string", "body": "string", "image": "string"},
    "android": _ANDROID,
    "webpush": {
        "headers": "string_map",
        "data": "string_map",
        "notification": "any",
        "fcm_options": {"link": "string", "analytics_label": "string"},
    },
    "apns": {
        "headers": "string_map",
        "payload": "any",
        "live_activity_token": "string",
        "fcm_options": {"analytics_label": "string", "image": "string"},
    },
    "fcm_options": {"analytics_label": "string"},
    "token": "string",
    "topic": "string",
    "condition": "string",
    "fid": "string",
}
_TARGETS = ("token", "topic", "condition", "fid")
_TYPE_NAMES = {
    "string": "TYPE_STRING",
    "priority": "type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority",
    "duration": "type.googleapis.com/google.protobuf.Duration",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _field(schema: _Schema, key: str) -> str | None:
    """The proto field a JSON key names: protobuf's JSON parser takes both spellings."""
    if key in schema:
        return key
    for name in schema:
        if _camel(name) == key:
            return name
    return None


class FcmApiError(Exception):
    """One error answer of the FCM API."""

    def __init__(
        self,
        code: int,
        status: str,
        message: str,
        *,
        error_code: str | None = None,
        field: str | None = None,
        retry_after: float | str | None = None,
        details: list[dict[str, Any]] | None = None,
        html: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.error_code = error_code
        self.field = field
        self.retry_after = retry_after
        self.details = details
        self.html = html  # Google's front end, not the API: an HTML page, no JSON at all

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details is not None:
            error["details"] = self.details
        elif self.error_code is not None:
            error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": self.error_code}]
        elif self.field is not None:
            violation = {"field": self.field, "description": self.message}
            error["details"] = [{"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]}]
        return {"error": error}


def invalid(message: str, field: str | None = None) -> FcmApiError:
    return FcmApiError(400, "INVALID_ARGUMENT", message, field=field)


def _check_value(kind: Any, value: Any, path: str) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise invalid(f"Invalid value at '{path}', {json.dumps(value)}", field=path)
        _check_object(kind, value, path)
    elif kind == "string_map":
        if not isinstance(value, dict):
            raise invalid(f"Invalid value at '{path}', {json.dumps(value)}", field=path)
        for index, item in enumerate(value.values()):
            if not isinstance(item, str):
                where = f"{path}[{index}].value"
                raise invalid(
                    f"Invalid value at '{where}' (TYPE_STRING), {json.dumps(item)}", field=where
                )
    elif kind in _TYPE_NAMES:
        ok = isinstance(value, str)
        if kind == "priority":
            ok = value in ("normal", "high", "NORMAL", "HIGH")
        elif kind == "duration":
            ok = isinstance(value, str) and _DURATION_RE.match(value) is not None
        if not ok:
            raise invalid(
                f"Invalid value at '{path}' ({_TYPE_NAMES[kind]}), {json.dumps(value)}", field=path
            )


def _check_object(schema: _Schema, value: dict[str, Any], path: str) -> None:
    for key, item in value.items():
        name = _field(schema, key)
        if name is None:
            message = f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': "
            raise invalid(message + "Cannot find field.", field=path)
        _check_value(schema[name], item, f"{path}.{name}")


def validate_request(body: Any) -> tuple[dict[str, Any], bool]:
    """Check a `messages:send` body as FCM does; return (message, validate_only) or raise."""
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. Expected an object.")
    for key in body:
        if key not in ("message", "validate_only", "validateOnly"):
            raise invalid(
                f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            )
    validate_only = body.get("validate_only", body.get("validateOnly", False))
    if not isinstance(validate_only, bool):
        raise invalid(
            f"Invalid value at 'validate_only' (TYPE_BOOL), {json.dumps(validate_only)}",
            field="validate_only",
        )
    message = body.get("message")
    if not isinstance(message, dict):
        raise FcmApiError(
            400,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
            error_code="INVALID_ARGUMENT",
        )
    _check_object(_MESSAGE, message, "message")
    targets = [name for name in _TARGETS if field_value(message, name) is not None]
    if not targets:
        raise FcmApiError(
            400,
            "INVALID_ARGUMENT",
            "Recipient of the message is not set.",
            error_code="INVALID_ARGUMENT",
        )
    if len(targets) > 1:
        raise invalid(
            "Invalid JSON payload received. Oneof field 'target' is already set. "
            f"Cannot set '{targets[1]}'",
            field="message",
        )
    if data_size(message) > MAX_DATA_BYTES:
        raise FcmApiError(
            400, "INVALID_ARGUMENT", "Android message is too big", error_code="INVALID_ARGUMENT"
        )
    return message, validate_only


def field_value(obj: dict[str, Any], name: str) -> Any:
    """A field by its proto name or its camelCase JSON name."""
    return obj.get(name, obj.get(_camel(name)))


def data_size(message: dict[str, Any]) -> int:
    """Bytes of the data payload (keys and values), the message's and Android's override."""
    data = dict(field_value(message, "data") or {})
    android = field_value(message, "android") or {}
    data.update(field_value(android, "data") or {})
    return sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
