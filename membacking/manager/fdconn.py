"""One connection to the manager's fd socket (SOCK_SEQPACKET): who is on the other end, and the
messages its socket could not take yet. Sends never block the daemon: what does not fit waits
here, in order, holding its own duplicate of any fd, until the socket is writable again. Also
the killing of an evicted mapper by the pidfd of its connection (--evict-kill), or of one that
did not come back after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ..protocol import messages as m
from ..protocol.fdpass import send_message
from .journal import MapperRecord
from .pins import Pin, process_start

log = logging.getLogger("membacking.manager")


#: unread datagrams `FdConn.close` reads away before it closes
_DRAIN_AT_CLOSE = 1024


class OutboxFull(Exception):
    """The peer has not read its fd socket for longer than its outbox may grow."""


@dataclass
class FdConn:
    sock: socket.socket  # non-blocking
    pid: int
    uid: int
    mapper_id: int | None = None
    #: the features negotiated at its Hello: the Shutdown written here once the mapper is out
    #: of the table (evicted) still carries its code
    features: int = 0
    strikes: int = 0
    #: not read until its mapper's stream is attached: it sent PackedHoldings ahead of its
    #: Attach (the rest wait in the socket, not in the daemon: fdserver.py)
    paused: bool = False
    forbidden: str | None = None  # set for a peer whose credentials were refused
    #: a pidfd of the peer process, opened at accept under --evict-kill (it cannot name another
    #: process once the pid is reused)
    pidfd: int | None = None
    accepted: float = field(default_factory=time.monotonic)
    #: what the socket could not take yet, in order; each fd here is our own dup
    outbox: deque[tuple[m.Message, int | None]] = field(default_factory=deque)
    #: how many of the outbox's entries hold an fd (counted as they come and go: a count by
    #: walking the outbox at each send made a peer that never reads cost O(n) per message)
    outbox_fds: int = 0
    #: the mappables whose FdGrant waits in the outbox: asked for again (ResendFd) meanwhile,
    #: the one waiting answers (a peer asking over and over without reading held the daemon's
    #: descriptors at its limit, a copy each)
    outbox_grants: set[int] = field(default_factory=set)

    def send(
        self, msg: m.Message, fd: int | None, max_waiting: int, fd_ceiling: int = 1 << 30
    ) -> bool:
        """Send `msg` (with `fd`), or queue it behind what waits already; True if it had to
        wait. Raises OutboxFull past `max_waiting` waiting messages or when the duplicate a
        waiting fd needs would reach `fd_ceiling`, OSError if the socket failed."""
        if not self.outbox:
            try:
                send_message(self.sock, msg, () if fd is None else (fd,))
                return False
            except BlockingIOError:
                pass
        grant = msg.mappable_id if isinstance(msg, m.FdGrant) else None
        if grant in self.outbox_grants:
            return True  # its grant waits already, its own copy of the same file
        # fds are what is scarce: `max_waiting` bounds those; small messages (FdDenied, Error)
        # may wait in larger numbers
        waiting = len(self.outbox)
        if (fd is not None and self.outbox_fds >= max_waiting) or waiting >= 16 * max_waiting:
            raise OutboxFull(f"{waiting} messages wait for it to read its fd socket")
        copy = None if fd is None else os.dup(fd)
        if copy is not None and copy >= fd_ceiling:
            os.close(copy)
            raise OutboxFull("the manager is close to its open-file limit")
        self.outbox.append((msg, copy))
        if copy is not None:
            self.outbox_fds += 1
        if grant is not None:
            self.outbox_grants.add(grant)
        return True

    def flush(self) -> bool:
        """Send what waits, as far as the socket takes it; True once nothing waits. Raises
        OSError if the socket failed."""
        while self.outbox:
            msg, fd = self.outbox[0]
            try:
                send_message(self.sock, msg, () if fd is None else (fd,))
            except BlockingIOError:
                return False
            self.outbox.popleft()
            if fd is not None:
                self.outbox_fds -= 1
                os.close(fd)
            if isinstance(msg, m.FdGrant):
                self.outbox_grants.discard(msg.mappable_id)
        return True

    def kill(self) -> bool:
        """SIGKILL the peer process by the pidfd taken when it connected (a pid reused since
        cannot be hit): True if killed, False if it had exited already; OSError if it cannot."""
        if self.pidfd is None:
            raise OSError("no pidfd of it")
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        # What the peer sent and no one read would have the kernel reset its end: its next
        # read fails (ECONNRESET), and what it had not read of ours yet (the Errors, the
        # Shutdown of an eviction) is lost. Read that away first (fds in it are closed by the
        # kernel), so the peer reads ours to the end and then the close. Bounded: a peer that
        # keeps sending is reset all the same.
        with contextlib.suppress(OSError):
            for _ in range(_DRAIN_AT_CLOSE):
                if not self.sock.recv(1):
                    break
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        while self.outbox:
            _, fd = self.outbox.popleft()
            if fd is not None:
                os.close(fd)
        self.outbox_fds = 0
        self.outbox_grants.clear()


def kill_evicted(mapper_id: int, conn: FdConn | None, counters: dict[str, int]) -> None:
    """--evict-kill: SIGKILL an evicted mapper (FdConn.kill), counted in `evict_kills` and
    logged."""
    who = f"mapper {mapper_id}" + (f" (pid {conn.pid})" if conn is not None else "")
    try:
        if conn is None:
            raise OSError("no connection of it")
        if not conn.kill():
            return  # it has exited already
    except OSError as exc:
        log.error("%s: --evict-kill cannot kill it: %s", who, exc.strerror or exc)
        return
    counters["evict_kills"] += 1
    log.error("%s killed (SIGKILL, --evict-kill): evicted for not answering", who)


def not_back(
    record: MapperRecord,
    waited: float,
    evict_kill: bool,
    counters: Counter[str],
    lent: Pin | None = None,
) -> None:
    """A mapper of the previous manager whose process still runs did not come back within
    `waited` seconds (awaited.py): counted in `reattach_timeouts` and logged, as an eviction
    is; under --evict-kill SIGKILLed (by a pidfd, once its start time is checked again, so a
    pid reused meanwhile is never hit), counted in `evict_kills`, unless it lent regions to a
    VM (`lent`, its journaled pin): the pin keeps them from change, and the kill would end the
    VM (a launcher's QEMU dies with it)."""
    counters["reattach_timeouts"] += 1
    who = f"mapper {record.mapper_id} of the previous manager (pid {record.pid})"
    if evict_kill and lent is not None:
        log.error(
            "%s did not come back within %gs; not killed (--evict-kill): it lent regions %s to "
            "%s (pid %d), which stay pinned while that runs, and its end would end that VM",
            who,
            waited,
            ", ".join(sorted(lent.regions)),
            lent.label,
            lent.pid,
        )
        return
    if not evict_kill:
        spared = (
            f"it lent regions {', '.join(sorted(lent.regions))} to {lent.label} (pid "
            f"{lent.pid}), which stay pinned while that runs"
            if lent is not None
            else "it may still map memory they remove (--evict-kill would kill it)"
        )
        log.error(
            "%s did not come back within %gs: changes go on without it; %s", who, waited, spared
        )
        return
    try:
        pidfd = os.pidfd_open(record.pid)
    except OSError:
        return  # it has exited already
    try:
        if process_start(record.pid) != record.started:
            return  # another process has that pid now
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    except OSError as exc:
        log.error("%s: --evict-kill cannot kill it: %s", who, exc.strerror or exc)
        return
    finally:
        os.close(pidfd)
    counters["evict_kills"] += 1
    log.error("%s killed (SIGKILL, --evict-kill): it did not come back within %gs", who, waited)
