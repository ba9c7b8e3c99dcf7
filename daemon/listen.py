"""Binding the listening sockets: a failure is one line naming the address (exit code 1)."""

from __future__ import annotations

import socket

from tornado.netutil import bind_sockets


class StartError(Exception):
    """Something outside the configuration stops the start (the port is taken): exit code 1,
    so that systemd tries again."""


def address(host: str, port: int) -> str:
    """`host:port` as people write it: brackets around an IPv6 address, `*` for all."""
    if not host:
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(
    port: int, host: str, family: socket.AddressFamily = socket.AF_UNSPEC
) -> list[socket.socket]:
    """The listening sockets for `host:port`; StartError with the address and the reason."""
    try:
        return bind_sockets(port, host or None, family=family)
    except OSError as error:
        reason = (error.strerror or str(error) or type(error).__name__).lower()
        raise StartError(f"cannot listen on {address(host, port)}: {reason}") from None
