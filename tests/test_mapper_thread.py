"""The mapper thread against a scripted manager (real sockets, messages sent in an exact order):
orders of events a real daemon produces only now and then."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import membacking
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.fdpass import recv_message, send_message
from membacking.protocol.messages import Channel
from membacking.runtime import RuntimePaths

from conftest import Worker, short_tmpdir

TOKEN = bytes(16)


class ScriptedManager:
    """Registers one mapper (Welcome, then Attached for its stream socket) and then does only
    what the test says."""

    def __init__(self, root: Path) -> None:
        paths = RuntimePaths.resolve(root)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(paths.fd_socket))
        self.listener.listen()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(paths.mapper_endpoint)
        self.conn: socket.socket | None = None
        self.stream = b""
        self._thread = threading.Thread(target=self._register, daemon=True)
        self._thread.start()

    def _register(self) -> None:
        self.conn, _ = self.listener.accept()
        hello, _ = recv_message(self.conn)
        assert isinstance(hello, m.Hello)
        send_message(self.conn, m.Welcome(1, TOKEN, 1 << 30, 4096))
        identity, data = self.router.recv_multipart()
        attach = decode(data, Channel.MAPPER)
        assert isinstance(attach, m.Attach) and attach.role == m.ROLE_STREAM
        self.stream = identity
        self.router.send_multipart([identity, encode(m.Attached(attach.role))])

    def registered(self) -> None:
        self._thread.join(10)
        assert self.conn is not None and self.stream

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def scripted() -> Iterator[ScriptedManager]:
    manager = ScriptedManager(short_tmpdir())
    yield manager
    manager.close()


def thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_shutdown_read_before_the_fd_socket_closes(scripted: ScriptedManager) -> None:
    """Shutdown first, end of the fd socket after: the mapper thread must go quiet, not poll a
    closed socket in a loop."""
    root = Path(scripted.listener.getsockname()).parent
    memory = membacking.attach(root, name="quiet")
    try:
        scripted.registered()
        scripted.router.send_multipart([scripted.stream, encode(m.Shutdown("scripted"))])
        thread = memory._mapper._thread
        deadline = time.monotonic() + 5
        while memory._mapper.gone is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert memory._mapper.gone is not None
        assert scripted.conn is not None
        scripted.conn.close()  # now the end of stream on the fd socket
        time.sleep(0.3)
        assert thread.native_id is not None
        before = thread_cpu_seconds(thread.native_id)
        time.sleep(1.5)
        assert thread_cpu_seconds(thread.native_id) - before < 0.15
        with pytest.raises(membacking.ManagerGoneError, match="scripted"):
            memory.read_at(0, 1)
    finally:
        memory.detach()


def requests_seen(scripted: ScriptedManager, wait: float) -> list[m.Message]:
    """Every request from the mapper (on its fd socket) within `wait` seconds."""
    assert scripted.conn is not None
    seen: list[m.Message] = []
    while select.select([scripted.conn], [], [], wait)[0]:
        msg, fds = recv_message(scripted.conn, sender="mapper")
        assert fds == []
        seen.append(msg)
        wait = 0.2  # then only what is already on its way
    return seen


@pytest.mark.parametrize("first", ["grant", "map"])
def test_a_dropped_fd_fails_its_map_and_only_the_next_map_asks_again(
    scripted: ScriptedManager, first: str
) -> None:
    """The kernel drops an fd sent to a mapper at its open-file limit. Whether the manager's
    grant reaches the mapper before its Map or after it, that Map fails saying why and nothing
    is asked then; the next Map, with room again, sends ResendFd and maps the fd that answers
    it."""
    root = Path(scripted.listener.getsockname()).parent
    worker = Worker(root, "w")
    memfd = os.memfd_create("dropped")
    try:
        os.ftruncate(memfd, 1 << 20)
        os.pwrite(memfd, b"resent", 0)
        scripted.registered()
        assert scripted.conn is not None and worker.proc.stdin is not None
        worker.ask("nofile 0")
        grant, mapping = m.FdGrant(1, 1 << 20, True), m.Map(m.MemoryRange(0, 1 << 20), 1, 0, True)

        worker.proc.stdin.write("read 0x0 6\n")
        worker.proc.stdin.flush()
        assert [type(x) for x in requests_seen(scripted, 10)] == [m.SendMappings]
        for step in ("grant", "map") if first == "grant" else ("map", "grant"):
            if step == "grant":
                send_message(scripted.conn, grant, [memfd])  # dropped: no room for it
            else:
                scripted.router.send_multipart([scripted.stream, encode(mapping)])
            time.sleep(0.3)  # read by the mapper thread before the other one is sent
        answer = worker._line(10)
        assert answer.startswith("err ") and "dropped on arrival" in answer, answer
        assert "open-file limit" in answer
        assert requests_seen(scripted, 0.5) == []  # the failed Map did not ask again

        worker.ask("nofile 16")
        worker.proc.stdin.write("read 0x0 6\n")
        worker.proc.stdin.flush()
        assert [type(x) for x in requests_seen(scripted, 10)] == [m.SendMappings]
        scripted.router.send_multipart([scripted.stream, encode(mapping)])  # no fd behind it
        assert requests_seen(scripted, 10) == [m.ResendFd(1)]
        send_message(scripted.conn, grant, [memfd])
        assert bytes.fromhex(worker._line(10).removeprefix("ok ")) == b"resent"
    finally:
        worker.close()
        os.close(memfd)


def test_a_manager_that_takes_no_requests_fails_faults_after_the_timeout(
    scripted: ScriptedManager,
) -> None:
    """Requests travel on the fd socket: when the manager stops reading it and its buffer is
    full, a fault waits for room for the link's timeout, then fails saying so; once the manager
    reads again, requests go through."""
    root = Path(scripted.listener.getsockname()).parent
    memory = membacking.attach(root, name="unheard", timeout=1.0)
    try:
        scripted.registered()
        link = memory._mapper.link
        sent = 0
        with pytest.raises(TimeoutError, match="read nothing from this mapper"):
            while sent < 1_000_000:  # the kernel's buffer holds a few hundred
                link.send(m.SendMappings(m.MemoryRange(0, 4096)))
                sent += 1
        assert 0 < sent < 1_000_000
        with pytest.raises(
            membacking.GuestMemoryError, match="read nothing from this mapper for 1s"
        ) as exc:
            memory.read_at(0x1000, 1)
        assert not isinstance(exc.value, membacking.ManagerGoneError)  # it is there, stalled
        assert len(requests_seen(scripted, 1)) == sent
        link.send(m.SendMappings(m.MemoryRange(0, 4096)))
        assert requests_seen(scripted, 1) == [m.SendMappings(m.MemoryRange(0, 4096))]
    finally:
        memory.detach()


def test_a_late_denial_answers_the_map_that_gave_up_not_the_next_one(
    scripted: ScriptedManager,
) -> None:
    """A Map whose fd answer does not come within the link timeout fails. The denial that
    comes afterwards belongs to that Map: the next Map of the mappable, answered with the fd,
    maps it."""
    root = Path(scripted.listener.getsockname()).parent
    memory = membacking.attach(root, name="patient", timeout=1.0, fault_timeout=10.0)
    memfd = os.memfd_create("late")
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(memory.read_at(0, 4))
        except membacking.GuestMemoryError as exc:
            outcome.append(exc)

    try:
        os.ftruncate(memfd, 1 << 20)
        os.pwrite(memfd, b"late", 0)
        scripted.registered()
        assert scripted.conn is not None
        mapping = m.Map(m.MemoryRange(0, 1 << 20), 1, 0, True)
        reader = threading.Thread(target=read)
        reader.start()
        assert requests_seen(scripted, 10) == [m.SendMappings(m.MemoryRange(0, 4096))]
        scripted.router.send_multipart([scripted.stream, encode(mapping)])  # nothing behind it
        reader.join(10)
        assert "did not send the fd of mappable 1" in str(outcome.pop())
        send_message(scripted.conn, m.FdDenied(1, "the answer to the first Map"))

        reader = threading.Thread(target=read)
        reader.start()
        assert requests_seen(scripted, 10) == [m.SendMappings(m.MemoryRange(0, 4096))]
        scripted.router.send_multipart([scripted.stream, encode(mapping)])
        send_message(scripted.conn, m.FdGrant(1, 1 << 20, True), [memfd])
        reader.join(10)
        assert outcome == [b"late"]
    finally:
        memory.detach()
        os.close(memfd)
