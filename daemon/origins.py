"""Web origins (`scheme://host[:port]`) in one normal form, for websocket.allowed_origins."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

ANY = "*"
# RFC 3986 scheme syntax: http and https for web pages, others for app shells
# (capacitor://localhost, ionic://localhost) that send their own scheme.
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_HOST = re.compile(r"[a-z0-9\-._~%!$&'()*+,;=]+|\[[0-9a-f:.]+\]")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
ORIGIN_MAX = 2048  # an Origin longer than this is nobody's


def origin_problem(origin: str) -> str | None:
    """Why `origin` is not `scheme://host[:port]` (None when it is)."""
    if len(origin) > ORIGIN_MAX:
        return f"is over {ORIGIN_MAX} characters"
    scheme, sep, rest = origin.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme.lower()):
        return "is not scheme://host[:port]"
    if any(mark in rest for mark in "/?#"):
        return "is not scheme://host[:port] (no path, query or fragment)"
    if "@" in rest:
        return "is not scheme://host[:port] (no user)"
    host, port = rest, ""
    if not rest.endswith("]") and ":" in rest:
        host, _, port = rest.rpartition(":")
    if not _HOST.fullmatch(host.lower()):
        return "is not scheme://host[:port] (an ASCII host name, or an [IPv6] address)"
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return "is not scheme://host[:port] (the port is 1-65535)"
    return None


def normal_origin(origin: str) -> str | None:
    """`origin` in the form two equal origins share (scheme and host in lower case, no default
    port), or None when it is not `scheme://host[:port]`."""
    if origin_problem(origin) is not None:
        return None
    parts = urlsplit(origin)
    scheme = parts.scheme.lower()
    host = parts.netloc.lower()
    port = parts.port  # checked above: an int or None
    if port is not None:
        host = host.rpartition(":")[0]
        if port != DEFAULT_PORTS.get(scheme):
            host = f"{host}:{port}"
    return f"{scheme}://{host}"
