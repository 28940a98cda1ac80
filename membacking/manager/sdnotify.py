"""systemd readiness notification (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET.

Does nothing when NOTIFY_SOCKET is unset, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("membacking.manager")


def notify(state: str) -> bool:
    """Send e.g. "READY=1" to the service manager; True if a message was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True
