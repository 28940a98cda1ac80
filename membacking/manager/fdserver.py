"""The daemon's side of fd.sock: accepting connections (credentials, queues, the open-file
limit), registration, each mapper's requests and acks, and sending each mapper its fds without
ever blocking the loop. A part of `Daemon`, kept apart because it is the one place peers reach
before they have an identity.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable

import psutil
import zmq

from ..protocol import messages as m
from ..protocol.errors import ProtocolError
from ..protocol.fdpass import PeerClosed, recv_message, send_message
from ..protocol.shutdowns import shutdown_for
from .backing import MemfdStore
from .errors import Refused
from .fdconn import FdConn, OutboxFull, not_back
from .state import Disconnect, Effect, ManagerState
from .strikes import MAX_STRIKES

log = logging.getLogger("membacking.manager")

#: A connection to fd.sock that has not registered within this many seconds is closed...
HELLO_TIMEOUT = 5.0
#: ...and at most this many may wait at once, so strangers cannot use up the daemon's fds.
MAX_UNREGISTERED = 64
#: ...and refused strangers (answered on their first message) at most this many, for a second
MAX_REFUSED_WAITING = 16


def _events(conn: FdConn) -> int:
    """What the poller watches a connection for: reading, or while it is paused only an error
    (libzmq reports the peer's close so, not what waits to be read), and room while its outbox
    waits."""
    return int(zmq.POLLERR if conn.paused else zmq.POLLIN) | (
        int(zmq.POLLOUT) if conn.outbox else 0
    )


#: why a connection is turned away near the daemon's open-file limit (the mapper says it)
_NO_ROOM = (
    "the manager is at its open-file limit: no room for another mapper's connections (raise "
    "its limit, LimitNOFILE=, or remove regions)"
)


class FdServer:
    """fd.sock handling for `Daemon` (which sets every attribute below)."""

    state: ManagerState
    store: MemfdStore
    _listen: socket.socket
    _poller: zmq.Poller | None
    _conns: dict[int, FdConn]
    _conn_of_mapper: dict[int, FdConn]
    _allowed_uids: set[int]
    _allowed_gids: set[int]
    _fd_ceiling: int
    _accept_paused: bool
    #: --evict-kill: each connection keeps a pidfd of its peer to kill it by
    _evict_kill: bool

    def _apply(self, effects: Iterable[Effect]) -> None:
        raise NotImplementedError

    def _save_state(self) -> None:
        raise NotImplementedError

    def _control_request(self, identity: bytes, msg: m.Message) -> None:
        raise NotImplementedError

    def _guard(self, what: str, pid: int | None, action: Callable[[], object]) -> None:
        raise NotImplementedError

    def _replay_deferred(self) -> None:
        """Run the control changes that waited for mappers to come back (awaited.py), in the
        order they came, once none is awaited."""
        for identity, msg in self.state.awaited.release():
            action = functools.partial(self._control_request, identity, msg)
            self._guard("deferred control request", None, action)

    def _tick_awaited(self) -> None:
        """Each second: stop awaiting the mappers whose process ended, or all once the wait
        ran out (those still running are killed under --evict-kill)."""
        awaited = self.state.awaited
        if not awaited.waiting and not awaited.gave_up:
            return  # (no walk of the regions each second for nothing)
        # files of the operator's, and private RAM (anonymous), are not named `membacking:`
        files = any(r.backing in ("file", "private") for r in self.state.regions.values())
        for record in self.state.awaited.tick(self.state._monotonic(), files):
            lent = self.state.pins.adopted_of(record.mapper_id)  # a VM's launcher
            not_back(record, self.state.unmap_timeout, self._evict_kill, self.state.counters, lent)

    def _resume_accepting(self) -> None:
        if self._accept_paused and self._poller is not None:
            self._accept_paused = False
            self._poller.register(self._listen.fileno(), zmq.POLLIN)

    def _sweep(self) -> None:
        """Close connections that never registered in time (strangers after a second); forget
        the mappers whose process is gone."""
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.mapper_id is None]:
            if conn.accepted < now - (HELLO_TIMEOUT if conn.forbidden is None else 1.0):
                self.state.reject("timeout", "connected but never said Hello", conn.pid)
                self._drop_conn(conn, "no Hello")
        for entry in list(self.state.mappers.values()):
            # pid 0: the mapper is in a pid namespace we cannot see into (another container);
            # its fd socket still tells us when it goes away
            if entry.pid != 0 and not psutil.pid_exists(entry.pid):
                self._apply([Disconnect(entry.id)])
        for conn in [c for c in self._conns.values() if c.paused]:  # (an Attach that failed)
            paused_for = self.state.mappers.get(conn.mapper_id or 0)
            if paused_for is None or paused_for.stream is not None:
                self._pause(conn, False)

    def _pause_accepting(self, exc: OSError) -> None:
        """New connections wait in the backlog for a second; the listening socket would
        otherwise stay readable and spin the loop. Mappers already attached are not affected."""
        self.state.refused["no-resources"] += 1
        self.state.accept_refused_at = self.state._monotonic()  # (`status` says so)
        log.error(
            "cannot accept a connection on fd.sock: %s; trying again in a second "
            "(raise the open-file limit, LimitNOFILE=, for more mappers)",
            exc.strerror or exc,
        )
        if self._poller is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(self._listen.fileno())
        self._accept_paused = True

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: out of descriptors or memory
                self._pause_accepting(exc)
                return
            unregistered = [c for c in self._conns.values() if c.mapper_id is None]
            # each mapper will open a ZeroMQ connection too, two if of an earlier release
            # (descriptors are numbered from the lowest free one, so the new socket's number
            # tells how many are in use)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            if sock.fileno() + 2 * (len(unregistered) + 1) >= self._fd_ceiling:
                # told why, before the close: its Hello reads this instead of waiting for a
                # reply until its timeout (the connection is taken, so the loop cannot spin)
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    send_message(sock, m.Error("no-resources", _NO_ROOM))
                sock.close()
                self.state.accept_refused_at = self.state._monotonic()
                self.state.refuse("no-resources", "turned away: close to the open-file limit", pid)
                continue
            allowed = uid in self._allowed_uids or gid in self._allowed_gids
            # strangers and allowed peers wait in separate queues, so strangers who reach the
            # socket (--allow-uid opens it) cannot crowd out the mappers that may attach
            waiting = sum(1 for c in unregistered if (c.forbidden is None) == allowed)
            if waiting >= (MAX_UNREGISTERED if allowed else MAX_REFUSED_WAITING):
                reason = "busy" if allowed else "uid"
                self.state.reject(reason, f"{waiting} connections have not registered yet", pid)
                sock.close()
                continue
            sock.setblocking(False)  # a mapper that stops reading must never block the loop
            conn = FdConn(sock, pid, uid)
            if self._evict_kill and allowed and pid > 0:
                # now, while the peer waits for its Welcome: a pid read later may be reused
                with contextlib.suppress(OSError):
                    conn.pidfd = os.pidfd_open(pid)
            if not allowed:
                # Refuse on its first message, not now: closing with that message unread would
                # reset the connection and the peer would never read why it was refused.
                self.state.reject("uid", f"uid {uid} may not connect", pid)
                conn.forbidden = f"uid {uid} may not use this manager"
            self._conns[sock.fileno()] = conn
            if self._poller is not None:
                self._poller.register(sock.fileno(), zmq.POLLIN)

    def _drop_conn(
        self, conn: FdConn, why: str = "disconnected", farewell: str | None = None
    ) -> None:
        """Close a connection and forget its mapper; with `farewell`, first tell the mapper why
        (a Shutdown on the stream and on the fd socket, where the kernel delivers it before the
        end of stream, so the mapper reads it the moment it runs again)."""
        fileno = conn.sock.fileno()
        if fileno == -1:
            return  # already dropped
        if farewell is not None and conn.mapper_id is not None:
            self._apply(self.state.farewell(conn.mapper_id, farewell))
            self._say_farewell(conn, farewell)
        if self._poller is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(fileno)
        self._conns.pop(fileno, None)
        conn.close()
        if conn.mapper_id is not None:
            self._conn_of_mapper.pop(conn.mapper_id, None)
            # told it is evicted (strikes, a socket it stopped reading): it may run on until
            # its lease ends, so what waited on it waits for its grace (dropping.py)
            evicted = None if farewell is None else farewell.removeprefix("evicted: ")
            self._apply(self.state.mapper_gone(conn.mapper_id, why, evicted=evicted))

    def _say_farewell(self, conn: FdConn, reason: str, code: str = m.SHUTDOWN_EVICTED) -> None:
        """Write a Shutdown on a mapper's fd socket behind what waits for it there, if it has
        room (a mapper evicted with a full socket reads the Shutdown on its stream); with its
        `code` where the mapper negotiated codes."""
        with contextlib.suppress(OSError):
            if conn.mapper_id is not None and conn.flush():
                send_message(conn.sock, shutdown_for(reason, code, conn.features))

    def _fd_send(self, conn: FdConn, msg: m.Message, fd: int | None = None) -> None:
        """Send on a mapper's fd socket; what it cannot take now waits in the connection."""
        try:
            waiting = conn.send(
                msg, fd, self.state.limits.max_fds_per_mapper + MAX_STRIKES, self._fd_ceiling
            )
        except (OutboxFull, OSError) as exc:
            farewell = f"{m.SHUTDOWN_EVICTED}: the manager cannot send to it ({exc})"
            self._drop_conn(conn, f"cannot send to mapper: {exc}", farewell)
            return
        if waiting and self._poller is not None:
            self._poller.register(conn.sock.fileno(), _events(conn))

    def _flush_outbox(self, conn: FdConn) -> None:
        try:
            done = conn.flush()
        except OSError as exc:
            self._drop_conn(conn, f"cannot send to mapper: {exc}")
            return
        if done and self._poller is not None:
            self._poller.register(conn.sock.fileno(), _events(conn))

    def _on_fd_conn(self, conn: FdConn) -> None:
        if conn.paused:  # woken by an error: its peer closed it (nothing is read meanwhile)
            self._drop_conn(conn, "fd socket closed")
            return
        if conn.forbidden is not None:
            with contextlib.suppress(PeerClosed, ProtocolError, OSError):
                recv_message(conn.sock, sender="mapper")
                send_message(conn.sock, m.Error("forbidden", conn.forbidden))
            self._drop_conn(conn, "forbidden")
            return
        try:
            msg, _fds = recv_message(
                conn.sock, sender="mapper"
            )  # fds: always empty for mapper -> manager types
        except BlockingIOError:
            return  # woken with nothing to read
        except (PeerClosed, ConnectionError, OSError) as exc:
            why = "fd socket closed" if isinstance(exc, PeerClosed) else f"fd socket error: {exc}"
            self._drop_conn(conn, why)
            return
        except ProtocolError as exc:
            self._strike(conn, exc.reason, str(exc))
            return
        try:
            # (what cannot be sent to this mapper drops the connection in _fd_send; anything
            # else raised here is the daemon's own fault, not the mapper's)
            self._handle_fd_message(conn, msg)
        except Exception:
            self.state.rejected["internal"] += 1
            log.exception(
                "internal error while handling %s from pid %d", type(msg).__name__, conn.pid
            )
        if type(msg) is m.PackedHoldings:  # (no more work for any other, a request above all)
            entry = self.state.mappers.get(conn.mapper_id or 0)
            if entry is not None and entry.stream is None and entry.early_holdings:
                # kept for its Attach: what follows waits in its socket until then, not in the
                # daemon (64 KiB each, 64 a peer: 4 MiB for a peer that never attaches)
                self._pause(conn, True)

    def _pause(self, conn: FdConn, paused: bool) -> None:
        conn.paused = paused
        if self._poller is not None and conn.sock.fileno() != -1:
            self._poller.register(conn.sock.fileno(), _events(conn))

    def _attached(self, mapper_id: int) -> None:
        """An Attach of `mapper_id` was handled: read its fd socket again if it was paused for
        it (`_sweep` resumes any other a failure left paused); replay the changes that waited
        for mappers back after a restart (its Holdings may have come first)."""
        conn = self._conn_of_mapper.get(mapper_id)
        entry = self.state.mappers.get(mapper_id)
        if conn is not None and conn.paused and (entry is None or entry.stream is not None):
            self._pause(conn, False)
        if self.state.awaited.deferred:
            self._replay_deferred()

    def _strike(self, conn: FdConn, reason: str, detail: str) -> None:
        self.state.reject(reason, detail, conn.pid)
        conn.strikes += 1
        self._fd_send(conn, m.Error(reason, detail[:1000]))
        if conn.strikes >= MAX_STRIKES:
            entry = self.state.mappers.get(conn.mapper_id) if conn.mapper_id is not None else None
            if entry is None:
                log.warning(
                    "disconnecting pid %d after %d invalid messages", conn.pid, conn.strikes
                )
            else:
                log.error(
                    "mapper %d (%s, pid %d) evicted: %d invalid messages in a row on fd.sock",
                    entry.id,
                    entry.name,
                    entry.pid,
                    conn.strikes,
                )
                self.count_strike_eviction()
            farewell = f"{m.SHUTDOWN_EVICTED}: too many invalid messages"
            self._drop_conn(conn, "too many invalid messages", farewell)

    def count_strike_eviction(self) -> None:
        """A mapper cut off for 8 invalid messages in a row: an eviction like one for not
        answering (`evictions`), told apart in `evictions_invalid`."""
        self.state.counters["evictions"] += 1
        self.state.counters["evictions_invalid"] += 1

    def _handle_fd_message(self, conn: FdConn, msg: m.Message) -> None:
        if isinstance(msg, m.Hello):
            if conn.mapper_id is not None:
                self._strike(conn, "unexpected", "Hello sent twice")
                return
            if self.state.reserve_mapper_id():
                self._save_state()  # the block of ids is journaled before one is handed out
            try:
                entry = self.state.register_mapper(msg.name, conn.pid)
            except Refused as exc:
                self._fd_send(conn, m.Error(exc.code, str(exc)))
                self._drop_conn(conn, "refused")
                return
            conn.mapper_id = entry.id
            self._conn_of_mapper[entry.id] = conn
            conn.strikes = 0
            self._fd_send(conn, self.state.welcome(entry, msg.features))
            conn.features = entry.features or 0
            return
        if conn.mapper_id is None:
            self._strike(conn, "not-registered", f"{type(msg).__name__} before Hello")
            return
        rejections = self.state.rejections
        try:
            effects = self.state.handle_fd_message(conn.mapper_id, msg)
        except Refused as exc:  # a message it may not send (Holdings without REATTACH, ...)
            self._strike(conn, exc.code, str(exc))
            return
        if not effects and conn.mapper_id not in self.state.mappers:  # (asked only then)
            # it detached (an ack it sent just before may come after: not a rejection); a
            # request would wait for an answer that never comes: the end of the socket says so
            self._drop_conn(conn, f"{type(msg).__name__} after Detach")
            return
        if effects is None:  # after Hello a mapper sends only requests and acks here
            self._strike(conn, "unexpected", f"{type(msg).__name__} is not accepted on fd.sock")
            return
        if self.state.rejections == rejections:  # acted on, not refused (an unknown seq, ...)
            conn.strikes = 0
        self._apply(effects)
        if isinstance(msg, (m.Holdings, m.PackedHoldings)) and self.state.awaited.deferred:
            self._replay_deferred()  # the last mapper awaited may be back
