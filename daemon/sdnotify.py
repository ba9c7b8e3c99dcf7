"""systemd's sd_notify protocol (READY=1, WATCHDOG=1, STOPPING=1) over NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SdNotifier:
    """Sends state lines to systemd when NOTIFY_SOCKET is set; does nothing otherwise."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self.address = address or None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(state.encode())
        except OSError as error:
            log.warning("sd_notify_failed", extra={"state": state, "reason": str(error)})
            return False
        return True

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of systemd's WatchdogSec (WATCHDOG_USEC), or None when the watchdog is off."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None
