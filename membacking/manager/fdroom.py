"""Room in the daemon's descriptor table, made before the descriptors come: the kernel grows a
process's table by doubling it, and in a process of several threads (the ZeroMQ I/O thread)
each growth waits for an RCU grace period (expand_fdtable), 8 to 13 ms measured here, on the
thread whose accept or receive needed the slot: in a handover's gap, the mappers coming back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

#: descriptors of a mapper: its fd.sock connection and its ZeroMQ stream connection
PER_MAPPER = 2
#: what a daemon may open beside its mappers' connections (journal writes, sockets, pipes)
SPARE = 64


def table_size(pid: int | str = "self") -> int | None:
    """How many descriptors the process's table holds now (FDSize in /proc/PID/status)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"FDSize:"):
                return int(line.split()[1])
    return None


def open_count(pid: int) -> int | None:
    """How many descriptors process `pid` has open (None if this process may not look)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def make_room(extra: int, ceiling: int) -> None:
    """Grow this process's table now so that `extra` descriptors fit above the highest open
    one (never past `ceiling`, the daemon's own limit): one duplicate at the slot that needs
    it, closed at once. F_DUPFD takes the lowest free slot at or above the one asked, so no
    descriptor in use is ever replaced, whatever another thread opens meanwhile."""
    try:
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return  # no /proc: the table grows as it did
    target = min(highest + extra, ceiling - 1)
    size = table_size()
    if size is not None and target < size:
        return  # it fits already
    probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # the open-file limit: a table that grows later
            os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, target))
    finally:
        os.close(probe)
