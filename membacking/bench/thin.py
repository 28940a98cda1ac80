"""A thin mapper: the least Python that serves faults and Unmaps against the real manager daemon
(one faulting thread, requests packed by hand, no validation, no table beyond a set of mapped
starts). Beside membacking's own mapper it shows what the mapper's code costs; beside the floors,
what the manager's does. Benchmark scaffolding only: it trusts the manager completely.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from multiprocessing.connection import Connection

import msgpack
import zmq

from ..ffi import Reservation
from ..protocol import messages as m
from ..protocol.codec import decode, encode
from ..protocol.fdpass import recv_message, send_message
from ..protocol.messages import Channel
from ..runtime import RuntimePaths

_MAP, _NO_MAPPING, _UNMAP, _RELEASE, _FD_GRANT = (
    m.Map.TYPE,
    m.NoMapping.TYPE,
    m.Unmap.TYPE,
    m.Release.TYPE,
    m.FdGrant.TYPE,
)


class ThinMapper:
    """Registers with the manager at `runtime_dir` and maps what it is told, nothing more."""

    def __init__(self, runtime_dir: str | os.PathLike[str], name: str = "thin") -> None:
        paths = RuntimePaths.resolve(runtime_dir)
        self.fd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd_sock.connect(os.fspath(paths.fd_socket))
        send_message(self.fd_sock, m.Hello(name))
        welcome, _ = recv_message(self.fd_sock, sender="manager")
        assert isinstance(welcome, m.Welcome), welcome
        self.mapper_id = welcome.mapper_id
        self.reservation = Reservation(welcome.address_space)
        self.view = self.reservation.buffer()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.stream = self.ctx.socket(zmq.DEALER)
        self.stream.connect(paths.mapper_endpoint)
        self.stream.send(encode(m.Attach(welcome.mapper_id, welcome.token, m.ROLE_STREAM_FD)))
        attached = decode(self.stream.recv(), Channel.MAPPER)
        assert isinstance(attached, m.Attached), attached
        #: held while an access reads and while the mapper thread unmaps (as membacking's)
        self.lock = threading.Lock()
        self.mapped: set[int] = set()
        self.fds: dict[int, int] = {}
        self.gates: collections.deque[threading.Lock] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.stream, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        items = poller.sockets  # zmq_poll on it, as membacking's mapper thread does
        while True:
            if any(ready == self._wake_r for ready, _ in zmq.zmq_poll(items, -1)):
                return
            items_ = msgpack.unpackb(self.stream.recv(zmq.NOBLOCK))
            kind = items_[1]
            if kind == _MAP:
                start, size, mappable, file_offset, writable = items_[2:7]
                while mappable not in self.fds:  # the grant pushed behind the Map
                    data, fds, _, _ = socket.recv_fds(self.fd_sock, 256, 1)
                    grant = msgpack.unpackb(data)
                    if grant[1] == _FD_GRANT:
                        self.fds[grant[2]] = fds[0]
                self.reservation.map_fd(start, size, self.fds[mappable], file_offset, writable)
                self.mapped.add(start)
                self.gates.popleft().release()
            elif kind == _NO_MAPPING:
                self.gates.popleft().release()
            elif kind in (_UNMAP, _RELEASE):
                seq = items_[2]
                if kind == _UNMAP:
                    start, size = items_[3], items_[4]
                    with self.lock:
                        self.mapped.discard(start)
                        self.reservation.unmap(start, size)
                for mappable in items_[-1]:
                    fd = self.fds.pop(mappable, None)
                    if fd is not None:
                        os.close(fd)
                self.fd_sock.send(msgpack.packb([1, m.UnmapAck.TYPE, seq]))

    def read_at(self, gpa: int) -> int:
        """A byte at `gpa`, the start of a page of a region (faulted in first if unmapped)."""
        with self.lock:
            if gpa in self.mapped:
                return self.view[gpa]
        gate = threading.Lock()
        gate.acquire()
        self.gates.append(gate)
        self.fd_sock.send(msgpack.packb([1, m.SendMappings.TYPE, gpa, 4096]))
        gate.acquire()
        with self.lock:
            if gpa not in self.mapped:
                raise LookupError(f"no region backs GPA {gpa:#x}")
            return self.view[gpa]

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        self.stream.send(encode(m.Detach()))
        self.stream.close(linger=1000)
        self.ctx.term()
        self.fd_sock.close()
        for fd in (self._wake_r, self._wake_w, *self.fds.values()):
            os.close(fd)
        self.view.release()
        self.reservation.release()

    def __enter__(self) -> ThinMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holder_main(runtime_dir: str, name: str, conn: Connection) -> None:
    """A thin mapper process obeying the same pipe commands as the benchmark's mappers."""
    with ThinMapper(runtime_dir, name) as thin:
        conn.send(("ready", thin.mapper_id))
        while True:
            command, args = conn.recv()
            if command == "quit":
                break
            if command == "touch":
                for gpa in args:
                    thin.read_at(gpa)
                conn.send(("ok", None))
