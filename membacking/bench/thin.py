"""A thin mapper: the least Python that serves faults and Unmaps against the real manager daemon
(one faulting thread, requests packed by hand, no validation, no table beyond the mapped ranges'
starts). Beside membacking's own mapper it shows what the mapper's code costs; beside the floors,
what the manager's does. Benchmark scaffolding only: it trusts the manager, and reads only the
start of a range it mapped whole (anything else it did not expect makes it stop and say so).
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
import time
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
#: seconds a fault waits for its answer before the thin mapper gives up (a benchmark error)
TIMEOUT = 30.0


class ThinMapperError(RuntimeError):
    """The manager did something the thin mapper does not handle, or did not answer."""


class ThinMapper:
    """Registers with the manager at `runtime_dir` and maps what it is told, nothing more."""

    def __init__(self, runtime_dir: str | os.PathLike[str], name: str = "thin") -> None:
        paths = RuntimePaths.resolve(runtime_dir)
        with contextlib.ExitStack() as undo:
            self.fd_sock = undo.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
            self.fd_sock.settimeout(TIMEOUT)
            self.fd_sock.connect(os.fspath(paths.fd_socket))
            send_message(self.fd_sock, m.Hello(name))
            welcome, _ = recv_message(self.fd_sock, sender="manager")
            if not isinstance(welcome, m.Welcome):
                raise ThinMapperError(f"registration refused: {welcome}")
            self.fd_sock.settimeout(None)
            self.mapper_id = welcome.mapper_id
            self.reservation = Reservation(welcome.address_space)
            undo.callback(self.reservation.release)
            self.view = self.reservation.buffer()
            undo.callback(self.view.release)
            self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            undo.callback(self.ctx.term)
            self.stream = self.ctx.socket(zmq.DEALER)
            undo.callback(self.stream.close, 0)
            self.stream.connect(paths.mapper_endpoint)
            self.stream.send(encode(m.Attach(welcome.mapper_id, welcome.token, m.ROLE_STREAM_FD)))
            if not self.stream.poll(int(TIMEOUT * 1000)):
                raise ThinMapperError("the manager did not answer Attach")
            attached = decode(self.stream.recv(), Channel.MAPPER)
            if not isinstance(attached, m.Attached):
                raise ThinMapperError(f"attach refused: {attached}")
            undo.pop_all()
        #: held while an access reads and while the mapper thread unmaps (as membacking's)
        self.lock = threading.Lock()
        self.mapped: dict[int, int] = {}  # start -> size of each range mapped whole
        self.fds: dict[int, int] = {}
        self.gates: collections.deque[threading.Lock] = collections.deque()
        self.failure: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._run()
        except Exception as exc:  # say why, and let the waiting fault see it
            self.failure = f"{type(exc).__name__}: {exc}"
            for gate in self.gates:
                gate.release()

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
                    if grant[1] != _FD_GRANT or len(fds) != 1:
                        raise ThinMapperError(f"expected an FdGrant, got {grant}")
                    self.fds[grant[2]] = fds[0]
                self.reservation.map_fd(start, size, self.fds[mappable], file_offset, writable)
                self.mapped[start] = size
                self.gates.popleft().release()
            elif kind == _NO_MAPPING:
                self.gates.popleft().release()
            elif kind in (_UNMAP, _RELEASE):
                seq = items_[2]
                if kind == _UNMAP:
                    start, size = items_[3], items_[4]
                    with self.lock:
                        if self.mapped.get(start) != size:
                            # not a range mapped whole: forget them all (each refaults)
                            self.mapped.clear()
                        self.mapped.pop(start, None)
                        self.reservation.unmap(start, size)
                for mappable in items_[-1]:
                    fd = self.fds.pop(mappable, None)
                    if fd is not None:
                        os.close(fd)
                self.fd_sock.send(msgpack.packb([1, m.UnmapAck.TYPE, seq]))
            elif kind != m.Attached.TYPE:
                raise ThinMapperError(f"unexpected message {items_}")

    def read_at(self, gpa: int) -> int:
        """A byte at `gpa`, the start of a region's page (faulted in first if unmapped)."""
        with self.lock:
            if gpa in self.mapped:
                return self.view[gpa]
        gate = threading.Lock()
        gate.acquire()
        self.gates.append(gate)
        self.fd_sock.send(msgpack.packb([1, m.SendMappings.TYPE, gpa, 4096]))
        if not gate.acquire(timeout=TIMEOUT) or self.failure is not None:
            raise ThinMapperError(self.failure or f"no answer to a fault at {gpa:#x}")
        with self.lock:
            if gpa not in self.mapped:
                raise ThinMapperError(f"no region starts at GPA {gpa:#x}")
            return self.view[gpa]

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(TIMEOUT)
        if not self._thread.is_alive():  # the stream is this thread's again
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
            elif command == "fault_many":  # as the benchmark's mappers: a first access to each
                started = time.perf_counter()
                for gpa in args:
                    thin.read_at(gpa)
                conn.send(("ok", time.perf_counter() - started))
