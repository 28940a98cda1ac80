"""SCM_RIGHTS helpers: send and receive one message with file descriptors on a Unix socket.

The only module of the protocol package that touches sockets. Receiving closes every fd the
message type does not expect and rejects truncated messages (MSG_TRUNC / MSG_CTRUNC).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Sequence

from .codec import MAX_MESSAGE_BYTES, decode, encode
from .errors import ProtocolError
from .messages import Channel, Message

#: The kernel's limit of fds in one SCM_RIGHTS message (SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
# plain ints: the socket module's flags are IntFlag members, and `int & member` runs the enum's
# Python-level __rand__
_MSG_CTRUNC, _MSG_TRUNC = int(socket.MSG_CTRUNC), int(socket.MSG_TRUNC)
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
#: every fd received is close-on-exec from the moment it arrives (the kernel sets it in the
#: same call): fds from SCM_RIGHTS are inheritable otherwise, Python's default notwithstanding,
#: and a program a mapper runs (os.system, a subprocess without close_fds) would hold guest
#: memory that no Unmap reaches
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class PeerClosed(ConnectionError):
    """The peer closed the connection (end of stream)."""


class FdsDropped(ProtocolError):
    """The kernel dropped fds that came with a message (MSG_CTRUNC): the receiver is at its
    open-file limit, or the sender attached more than the receive buffer holds. `msg` is the
    message they came with, when its bytes (which arrive whole) decode."""

    def __init__(self, data: bytes) -> None:
        super().__init__(
            "fds sent with a message were dropped on arrival (the receiver is at its open-file "
            "limit, or too many fds were attached)",
            reason="fd-count",
        )
        self.data = data
        self.msg: Message | None = None


def send_message(sock: socket.socket, msg: Message, fds: Sequence[int] = ()) -> None:
    """Send `msg` with exactly the fds its type requires."""
    if len(fds) != msg.FDS:
        raise ValueError(f"{type(msg).__name__} travels with {msg.FDS} fds, not {len(fds)}")
    data = encode(msg)
    # MSG_NOSIGNAL: a peer gone raises EPIPE, even in a process that does not ignore SIGPIPE
    if fds:
        socket.send_fds(sock, [data], list(fds), _MSG_NOSIGNAL)
    elif sock.type == socket.SOCK_STREAM:
        sock.sendall(data, _MSG_NOSIGNAL)
    else:
        sock.send(data, _MSG_NOSIGNAL)


def send_raw(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one datagram of `data` with `fds` (at most MAX_FDS_PER_MESSAGE): the other end
    reads it with `recv_raw`."""
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"at most {MAX_FDS_PER_MESSAGE} fds per message, not {len(fds)}")
    if fds:
        socket.send_fds(sock, [data], list(fds), _MSG_NOSIGNAL)
    else:
        sock.send(data, _MSG_NOSIGNAL)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 (contextlib.suppress costs three Python calls per fd)
            os.close(fd)
        except OSError:
            pass


def recv_raw(sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[bytes, list[int]]:
    """Receive one datagram and every fd that came with it (the caller owns the fds, each
    close-on-exec).

    Raises PeerClosed at end of stream, FdsDropped when the ancillary data was truncated and
    ProtocolError when the data was (closing the fds that did arrive, in both cases).
    """
    data, ancdata, flags, _ = sock.recvmsg(max_bytes + 1, _CMSG_SPACE, _MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            usable = len(payload) - len(payload) % ints.itemsize
            ints.frombytes(payload[:usable])
            fds.extend(ints)
    if flags & _MSG_CTRUNC:
        close_fds(fds)
        raise FdsDropped(data)
    if flags & _MSG_TRUNC or len(data) > max_bytes:
        close_fds(fds)
        raise ProtocolError(f"message longer than {max_bytes} bytes", reason="too-large")
    if not data and not fds:
        raise PeerClosed("peer closed the connection")
    return data, fds


def recv_message(
    sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES, sender: str | None = None
) -> tuple[Message, list[int]]:
    """Receive and validate one message on the fd channel, with exactly the fds it expects."""
    try:
        data, fds = recv_raw(sock, max_bytes)
    except FdsDropped as exc:
        with contextlib.suppress(ProtocolError):  # say which message lost its fds, if it can
            exc.msg = decode(exc.data, Channel.FD, max_bytes=max_bytes, sender=sender)
        raise
    try:
        msg = decode(data, Channel.FD, max_bytes=max_bytes, sender=sender)
    except ProtocolError:
        close_fds(fds)
        raise
    if len(fds) != msg.FDS:
        close_fds(fds)
        raise ProtocolError(
            f"{type(msg).__name__} must carry {msg.FDS} fds, got {len(fds)}", reason="fd-count"
        )
    return msg, fds
