"""The daemon's ZeroMQ ROUTERs (mapper.ipc, control.ipc): the socket options peers rely on
(docs/PROTOCOL.md, "ZeroMQ socket options"), and opening fd.sock and mapper.ipc to the other
users --allow-uid/--allow-gid name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import zmq

from ..protocol.codec import MAX_MESSAGE_BYTES
from ..runtime import RuntimePaths

log = logging.getLogger("membacking.manager")

#: largest ZeroMQ frame the ROUTERs accept (a larger one disconnects its sender). Nothing a
#: ROUTER receives may exceed MAX_MESSAGE_BYTES (control requests included: only replies are
#: larger), so twice that leaves a message just over the limit its "too-large" reply
MAX_FRAME_BYTES = 2 * MAX_MESSAGE_BYTES
#: messages queued per peer for sending; past it a ROUTER drops what it sends (no
#: ROUTER_MANDATORY)
SNDHWM = 100_000
#: the same for control.ipc: a client waits for each reply, and one that sends requests without
#: reading the replies (up to hundreds of KiB each) held the daemon's memory by gigabytes
CONTROL_SNDHWM = 64
#: complete messages libzmq holds per peer before the daemon reads them; past it libzmq stops
#: reading that peer's connection (the peer waits: nothing is lost). libzmq counts messages,
#: not frames, and keeps a message's frames until its last one has come (docs/RELIABILITY.md)
RCVHWM = 16
#: whether an ipc listener leaves its socket file when it closes (libzmq 4.2.3 and later): a
#: daemon handing over may then release the runtime directory before its context has ended,
#: as a successor's socket files bound at the same paths are safe from its listeners
IPC_FILE_OUTLIVES_CLOSE = zmq.zmq_version_info() >= (4, 2, 3)


def new_router(ctx: zmq.Context[zmq.Socket[bytes]], control: bool = False) -> zmq.Socket[bytes]:
    """A ROUTER with the options peers rely on, not bound yet: a daemon makes its ROUTERs
    before a takeover's ask, while the running daemon still serves (the context starts its
    I/O threads with its first socket: about 0.4 ms of CPU), and binds them once the runtime
    directory is its own (`bind_router`). `control`: control.ipc's, with its smaller queue."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, CONTROL_SNDHWM if control else SNDHWM)
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    sock.setsockopt(zmq.LINGER, 500)
    # a peer sending a larger frame is disconnected by libzmq before it is buffered; frames
    # up to this size but over the protocol's limit get an Error that says so
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    return sock


def bind_router(sock: zmq.Socket[bytes], endpoint: str, path: os.PathLike[str]) -> None:
    """Bind a ROUTER of `new_router` at `endpoint`, its socket file `path` the daemon user's
    alone."""
    sock.bind(endpoint)
    os.chmod(path, 0o600)


def open_to_other_users(paths: RuntimePaths, uids: Iterable[int], gids: Iterable[int]) -> None:
    """--allow-uid/--allow-gid: other users must reach fd.sock and mapper.ipc. fd.sock checks
    SO_PEERCRED; mapper.ipc accepts nothing but the token a Welcome on fd.sock gave; the
    control socket (add, remove, ...) stays the daemon user's alone."""
    os.chmod(paths.root, 0o711)  # others may reach a socket by name, not list the dir
    for path in (paths.fd_socket, paths.mapper_socket):
        os.chmod(path, 0o666)
    log.info(
        "fd.sock and mapper.ipc are open to other users (allowed uids %s, gids %s); "
        "control.ipc stays private",
        sorted(uids) or "-",
        sorted(gids) or "-",
    )
