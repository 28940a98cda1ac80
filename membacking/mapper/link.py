"""A mapper's two connections to its manager: the fd socket (registration, requests and acks out,
fds in, lifeline) and the ZeroMQ stream socket (Map/NoMapping/Unmap in; mapper thread only).
Fds arrive on the fd socket unasked, each right behind the Map that needs it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import zmq

from .. import trace, units
from ..errors import LEFT_OVER, NO_SOCKET, ManagerUnavailableError
from ..protocol import messages as m
from ..protocol.codec import decode, encode
from ..protocol.errors import ProtocolError
from ..protocol.fdpass import PeerClosed, recv_message, send_message
from ..protocol.messages import Channel, Message
from ..runtime import RuntimePaths
from .sockwatch import SocketWatch

log = logging.getLogger("membacking.mapper")

#: a plain int (the socket module's flags are IntFlag members); a manager gone raises EPIPE
#: rather than killing a process that does not ignore SIGPIPE
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)


#: pauses between registration tries a busy manager turned away
_FIRST_PAUSE, _LAST_PAUSE = 0.05, 0.5


class _Busy(Exception):
    """The manager closed a new connection without a word (it is too busy to take it)."""


class AttachError(ManagerUnavailableError):
    """The manager refused or did not complete this mapper's registration."""


class ManagerLink:
    """Registers with the manager serving `paths` and owns the sockets."""

    def __init__(self, paths: RuntimePaths, name: str, timeout: float) -> None:
        self._take_paths(paths)
        self.name = name
        self.timeout = timeout
        self._send_lock = threading.Lock()
        self._watch: SocketWatch | None = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            self.fd_sock, welcome, stream = self._register(name)
        except BaseException:
            self.ctx.destroy(linger=0)
            raise
        try:
            self._take(welcome, stream)
            self.address_space = welcome.address_space
        except BaseException:
            self.close()
            raise

    def _take_paths(self, paths: RuntimePaths) -> None:
        """The socket paths as strings, and whether they fit, worked out once: registering
        again (in a handover's gap) stats and connects without building a Path each time."""
        self.paths = paths
        self._fd_socket = os.fspath(paths.fd_socket)
        self._endpoint = paths.mapper_endpoint
        try:
            paths.check_lengths()
            self._too_long: str | None = None
        except ValueError as exc:
            self._too_long = str(exc)

    def _take(
        self,
        welcome: m.Welcome,
        stream: zmq.Socket[bytes],
        early: Callable[[], None] | None = None,
    ) -> bool:
        """Use a new registration: the fd socket is `self.fd_sock`; attach the stream."""
        # from now on only the mapper thread reads it, and never blocks on it
        self.fd_sock.setblocking(False)
        self._fd_poll = select.poll()
        self._fd_poll.register(self.fd_sock, select.POLLIN)
        self._room_poll = select.poll()
        self._room_poll.register(self.fd_sock, select.POLLOUT)
        self.mapper_id = welcome.mapper_id
        self.token = welcome.token
        #: feature bits the manager will use (0 from a manager of an earlier release)
        self.features = welcome.features or 0
        #: the memory the manager serves (None: it cannot tell, so nothing is kept across a
        #: restart)
        self.state_id = welcome.state_id if self.features & m.FEATURE_REATTACH else None
        if not self.features & m.FEATURE_PACKED_HOLDINGS:
            early = None  # a manager of an earlier release takes Holdings only once attached
        self.stream = self._attach(m.ROLE_STREAM_FD, stream, early)
        return early is not None

    def drop_connection(self) -> None:
        """Close both sockets of a manager that is gone (mapper thread only): its stream socket
        would otherwise connect to the next manager's endpoint by itself, for nothing."""
        with contextlib.suppress(zmq.ZMQError):
            self.stream.close(0)
        with contextlib.suppress(OSError):
            self.fd_sock.close()

    def reconnect(self, early: Callable[[], None] | None = None) -> bool:
        """Register again with the manager now serving the runtime directory (after its
        predecessor died): new fd socket, id, token and stream socket. Raises
        ManagerUnavailableError (or AttachError) if that cannot be done now. Mapper thread
        only, with no access waiting on the fd socket. `early` is called between the Attach
        and its answer when the manager takes PackedHoldings then (FEATURE_PACKED_HOLDINGS):
        True if it was."""
        self.drop_connection()
        # one try: a busy manager is tried again by the relink's own loop, which renews the
        # lease between tries (accesses to mapped memory wait for it) and keeps its deadline
        self.fd_sock, welcome, stream = self._register(self.name, busy_retries=False)
        trace.mark(f"mapper.registered id={welcome.mapper_id}")
        if welcome.address_space != self.address_space:
            self.fd_sock.close()
            stream.close(0)
            raise AttachError(
                f"the manager now serves an address space of {welcome.address_space:#x} bytes, "
                f"not {self.address_space:#x}"
            )
        return self._take(welcome, stream, early)

    def _unavailable(self, detail: str) -> ManagerUnavailableError:
        return ManagerUnavailableError(
            f"no membacking manager at {self.paths.root} ({detail}; is `membacking manager run` "
            "running there?)"
        )

    def _connect_fd_socket(self) -> socket.socket:
        if self._too_long is not None:
            raise ManagerUnavailableError(self._too_long)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._fd_socket)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):  # as the control client says
                raise self._unavailable(
                    NO_SOCKET if exc.errno == errno.ENOENT else LEFT_OVER
                ) from None
            if exc.errno == errno.EAGAIN:  # its listen queue is full: it has paused accepting
                raise _Busy("it is not accepting connections") from None
            raise ManagerUnavailableError(
                f"cannot connect to {self.paths.fd_socket}: {exc.strerror or exc}"
            ) from None
        return sock

    def _register(
        self, name: str, busy_retries: bool = True
    ) -> tuple[socket.socket, m.Welcome, zmq.Socket[bytes]]:
        """Connect to fd.sock and say Hello; the stream socket too, once fd.sock took the
        connection (so its ZeroMQ handshake overlaps the Hello; it is the same manager's: a
        manager binds its mapper socket before fd.sock). A manager too busy to take the
        connection (too many waiting, or near its open-file limit) closes it unanswered, or
        does not accept it: try again, after a pause growing from 50 ms to 0.5 s, until
        `timeout` (unless not `busy_retries`: then it is ManagerUnavailableError at once)."""
        deadline = time.monotonic() + self.timeout
        busy_until = deadline if busy_retries else 0.0
        pause, tries = _FIRST_PAUSE, 0
        while True:
            tries += 1
            try:
                sock = self._connect_fd_socket()
            except _Busy as exc:
                pause = self._pause_or_give_up(exc, tries, busy_until, pause)
                continue
            stream = self._stream_socket()
            sock.settimeout(max(0.1, deadline - time.monotonic()))  # all tries share `timeout`
            try:
                welcome = self._hello(sock, name)
                #: the fd socket file it registered through (a successor binds a new one)
                self.registered_socket = self.socket_identity()
                return sock, welcome, stream
            except _Busy as exc:
                stream.close(0)
                sock.close()
                pause = self._pause_or_give_up(exc, tries, busy_until, pause)
            except BaseException:
                stream.close(0)
                sock.close()
                raise

    def _pause_or_give_up(self, exc: _Busy, tries: int, deadline: float, pause: float) -> float:
        """After a try the busy manager turned away: sleep `pause` (what is left of the
        timeout at most) and return the next pause, or raise if the timeout is over."""
        left = deadline - time.monotonic()
        if left < _FIRST_PAUSE:
            raise ManagerUnavailableError(
                f"the manager at {self.paths.root} is busy: it turned away all {tries} "
                f"registration tries in {self.timeout:g}s (the last: {exc}). It takes a "
                "limited number of connections that have not registered yet, each for a few "
                "seconds, and stops accepting near its open-file limit; try again, or with a "
                "longer timeout"
            ) from None
        time.sleep(min(pause, left))
        return min(2 * pause, _LAST_PAUSE)

    def socket_identity(self) -> tuple[int, int, int] | None:
        """(device, inode, change time) of the fd socket file on the runtime directory, None
        if there is none. The time tells a new socket from an old one whose inode number it
        reused."""
        try:
            info = os.stat(self._fd_socket)
        except OSError:
            return None
        return info.st_dev, info.st_ino, info.st_ctime_ns

    def _hello(self, sock: socket.socket, name: str) -> m.Welcome:
        reply = self._say_hello(sock, m.Hello(name, m.SUPPORTED_FEATURES))
        if isinstance(reply, m.Error) and reply.code == "bad-arity":
            # a manager of an earlier release refuses a Hello with a feature mask (and keeps
            # the connection open): register without features
            reply = self._say_hello(sock, m.Hello(name))
        if isinstance(reply, m.Error):
            raise AttachError(f"the manager refused this mapper: {reply.message}")
        if not isinstance(reply, m.Welcome):
            raise AttachError(f"unexpected {type(reply).__name__} during registration")
        try:
            units.check_address_space(reply.address_space)
        except ValueError as exc:
            raise AttachError(
                f"the manager offers an address space this mapper cannot use: {exc}"
            ) from None
        return reply

    def _say_hello(self, sock: socket.socket, hello: m.Hello) -> Message:
        try:
            with contextlib.suppress(BrokenPipeError):  # refused: the reason waits to be read
                send_message(sock, hello)
            reply, _ = recv_message(sock, sender="manager")
        except (PeerClosed, ConnectionResetError) as exc:
            raise _Busy(str(exc)) from None
        except TimeoutError:  # a daemon that is stopped or stuck: as the control client says
            raise ManagerUnavailableError(
                f"the manager at {self.paths.root} did not answer within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise self._unavailable(f"registration failed: {exc}") from None
        except ProtocolError as exc:
            raise AttachError(f"the manager sent an invalid registration reply: {exc}") from None
        return reply

    def _stream_socket(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self._endpoint)
        return sock

    def _attach(
        self, role: int, sock: zmq.Socket[bytes], meanwhile: Callable[[], None] | None = None
    ) -> zmq.Socket[bytes]:
        sock.send(encode(m.Attach(self.mapper_id, self.token, role)))
        if meanwhile is not None:  # while the Attach travels and is answered
            meanwhile()
        if not sock.poll(int(self.timeout * 1000)):
            sock.close(0)
            raise AttachError(f"the manager did not answer Attach within {self.timeout:g}s")
        reply = decode(sock.recv(), Channel.MAPPER, sender="manager")
        if isinstance(reply, m.Error) and reply.code == "bad-role":
            sock.close(0)
            raise AttachError(
                f"the manager at {self.paths.root} is of an earlier release: it does not take "
                "requests on the fd socket, which this mapper sends there (run a manager of "
                "this release or later)"
            )
        if isinstance(reply, m.Error):
            sock.close(0)
            raise AttachError(f"the manager refused the socket: {reply.message}")
        if not isinstance(reply, m.Attached) or reply.role != role:
            sock.close(0)
            raise AttachError(f"unexpected {reply!r} in answer to Attach")
        return sock

    def send(self, msg: Message) -> None:
        """Send a request (SendMappings, ResendFd) on the fd socket, from any thread. On this
        socket the manager's loop reads it straight away: on a ZeroMQ socket it would pass
        through an I/O thread at each end first. Waits for room in the socket's buffer for at
        most the link's timeout in all (the lock included), then raises TimeoutError; raises
        OSError if the manager is gone."""
        started: float | None = None  # taken only when something has to wait
        if not self._send_lock.acquire(blocking=False):
            started = time.monotonic()
            if not self._send_lock.acquire(timeout=self.timeout):
                raise self._no_room()
        try:
            # no room: the manager has not read what this mapper sent before; wait for it
            while not self.try_send(msg):
                if started is None:
                    started = time.monotonic()
                left = started + self.timeout - time.monotonic()
                if left <= 0 or not self._room_poll.poll(left * 1000):
                    raise self._no_room()
        finally:
            self._send_lock.release()

    def try_send(self, msg: Message) -> bool:
        """Send `msg` on the fd socket if its buffer has room now; False if not (any thread,
        never waits). Raises OSError if the manager is gone."""
        try:
            self.fd_sock.send(encode(msg), _MSG_NOSIGNAL)
        except BlockingIOError:
            return False
        return True

    def _no_room(self) -> TimeoutError:
        return TimeoutError(
            f"the manager has not made room on this mapper's fd socket for {self.timeout:g}s"
        )

    def send_stream(self, msg: Message) -> None:
        """Send on the stream socket (mapper thread only)."""
        self.stream.send(encode(msg))

    def recv_stream(self) -> Message | None:
        """The next stream message, None if none is waiting (mapper thread only)."""
        try:
            data = self.stream.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return decode(data, Channel.MAPPER, sender="manager")

    def recv_fd_message(self) -> tuple[Message, list[int]] | None:
        """The next message on the fd socket (mapper thread only), None if nothing is waiting
        (tried before waiting: the fd a Map needs has usually overtaken it)."""
        try:
            return recv_message(self.fd_sock, sender="manager")
        except BlockingIOError:
            return None

    def wait_fd_message(self) -> None:
        """Wait until the fd socket is readable; TimeoutError after the link's timeout."""
        if not self._fd_poll.poll(self.timeout * 1000):
            raise TimeoutError(f"nothing arrived within {self.timeout:g}s")

    def socket_watch(self) -> SocketWatch:
        """The watch for a new fd.sock in the runtime directory (sockwatch.py), made at the
        first registration again and kept until `close`, emptied of what it saw before: the
        close of an inotify descriptor waits for an SRCU grace period in one kernel worker
        that every process shares (1 to 2.6 ms each, measured with 16 mappers closing theirs
        at once), on the mapper thread just as the faults of a handover's gap wait for it."""
        if self._watch is None:
            self._watch = SocketWatch(self.paths.root)
        else:
            self._watch.drain()
        return self._watch

    def close(self) -> None:
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.close()
        sock = getattr(self, "stream", None)
        if sock is not None:
            sock.close()
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            # a socket an error left open (an Attach that failed half-way) would make term()
            # wait for it forever: destroy closes those at once, and waits for the rest
            ctx.destroy(linger=0)
        with contextlib.suppress(OSError):
            self.fd_sock.close()
