"""The handover channel: a Unix socket (`handover.sock` in the runtime directory) the new daemon
listens on while it takes over. Once the old daemon has stopped serving, it connects and sends
its state (the journal's encoding, for a new daemon without a state directory) and the
descriptors of memory that lives in no file (memfd, hugetlb), at most 253 per message.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from pathlib import Path

import msgpack

from ..errors import MembackingError
from ..protocol.errors import ProtocolError
from ..protocol.fdpass import (
    MAX_FDS_PER_MESSAGE,
    PeerClosed,
    close_fds,
    recv_raw,
    send_raw,
)
from ..runtime import RuntimePaths
from .journal import MAX_JOURNAL_BYTES

SOCKET_NAME = "handover.sock"
#: bytes of the state per message (a datagram stays well within the socket's buffer)
CHUNK = 48 * 1024
#: what one message may hold beside the state's chunk (its msgpack framing, the fds' ids)
_MAX_MESSAGE = CHUNK + 16 * 1024


class ChannelError(MembackingError):
    """The handover channel failed (nothing received is kept: its fds are closed)."""


def channel_path(paths: RuntimePaths) -> Path:
    return paths.root / SOCKET_NAME


class Receiver:
    """The new daemon's end: bound before it asks, read once the old daemon agreed."""

    def __init__(self, paths: RuntimePaths) -> None:
        self.path = channel_path(paths)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a new daemon that died while taking over
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            self._sock.listen(1)
        except OSError as exc:
            self.close()
            raise ChannelError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None

    def receive(self, timeout: float) -> tuple[bytes, dict[int, int]]:
        """The old daemon's state (empty if it sent none) and fds by mappable id. The caller
        owns the fds. ChannelError if the old daemon does not send them whole in `timeout`."""
        fds: dict[int, int] = {}
        try:
            return self._receive(timeout, fds)
        except BaseException:
            close_fds(list(fds.values()))
            raise

    def _receive(self, timeout: float, fds: dict[int, int]) -> tuple[bytes, dict[int, int]]:
        deadline = time.monotonic() + timeout
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise ChannelError(f"the old daemon did not connect within {timeout:g}s") from None
        with conn:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in (os.getuid(), 0):
                raise ChannelError(f"a process of uid {uid} connected to {self.path}")
            state = bytearray()
            while True:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    data, got = recv_raw(conn, _MAX_MESSAGE)
                except (TimeoutError, PeerClosed, ProtocolError, OSError) as exc:
                    raise ChannelError(f"the handover channel failed: {exc}") from None
                try:
                    kind, value = msgpack.unpackb(data, raw=False)
                    ids = value if kind == "fds" else []
                    ok = (kind == "state" and type(value) is bytes and not got) or (
                        kind == "fds"
                        and type(ids) is list
                        and len(ids) == len(got)
                        and all(type(i) is int and i not in fds for i in ids)
                    )
                    ok = ok or (kind == "end" and value == len(fds) and not got)
                except Exception:
                    ok = False
                if not ok:
                    close_fds(got)
                    raise ChannelError("the old daemon sent a malformed handover message")
                if kind == "end":
                    return bytes(state), fds
                if kind == "state":
                    state += value
                    if len(state) > MAX_JOURNAL_BYTES:
                        raise ChannelError("the old daemon's state is over the journal's limit")
                fds.update(zip(ids, got, strict=True))

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def send(paths: RuntimePaths, state: bytes, fds: dict[int, int], timeout: float) -> None:
    """The old daemon's end: send `state` and `fds` (by mappable id; they stay open here) to
    the new daemon. OSError if it cannot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(channel_path(paths)))
        for i in range(0, len(state), CHUNK):
            send_raw(sock, msgpack.packb(["state", state[i : i + CHUNK]], use_bin_type=True))
        items = sorted(fds.items())
        for i in range(0, len(items), MAX_FDS_PER_MESSAGE):
            batch = items[i : i + MAX_FDS_PER_MESSAGE]
            send_raw(sock, msgpack.packb(["fds", [k for k, _ in batch]]), [f for _, f in batch])
        send_raw(sock, msgpack.packb(["end", len(fds)]))
