"""systemd notification (sd_notify) without libsystemd: datagrams to $NOTIFY_SOCKET, with file
descriptors in SCM_RIGHTS for the fd store (FDSTORE=1, see `fdstore`).

Does nothing when NOTIFY_SOCKET is unset, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

log = logging.getLogger("membacking.manager")

#: seconds one datagram may wait for room in the service manager's queue
SEND_TIMEOUT = 2.0


def address() -> str | None:
    """$NOTIFY_SOCKET as a socket address (None when unset); "@name" is the abstract namespace."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return None
    return "\0" + where[1:] if where.startswith("@") else where


def send(state: str, fds: Sequence[int] = ()) -> None:
    """Send one datagram `state` (with `fds`) to the service manager; OSError if it cannot
    (within SEND_TIMEOUT: a service manager that reads nothing must not stop the daemon)."""
    where = address()
    if where is None:
        raise OSError("NOTIFY_SOCKET is not set")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(SEND_TIMEOUT)
        sock.connect(where)
        if fds:
            socket.send_fds(sock, [state.encode()], list(fds))
        else:
            sock.sendall(state.encode())


def notify(state: str) -> bool:
    """Send e.g. "READY=1" to the service manager; True if a message was sent."""
    if address() is None:
        return False
    try:
        send(state)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address(), exc)
        return False
    return True
