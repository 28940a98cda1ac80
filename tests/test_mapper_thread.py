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
    what the test says. With `older`, it refuses the stream's role as a manager of an earlier
    release does; with `strict_arity`, it refuses a Hello with a feature mask as that release's
    decoder does (bad-arity, connection kept open). Its Welcome grants `features` (None: no
    mask, as a manager of an earlier release), with a state_id when they hold REATTACH."""

    def __init__(
        self,
        root: Path,
        older: bool = False,
        strict_arity: bool = False,
        features: int | None = None,
    ) -> None:
        self.older = older
        self.features = features
        self.strict_arity = strict_arity
        self.hellos: list[m.Hello] = []
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
        self.hellos.append(hello)
        if self.strict_arity and hello.features is not None:
            send_message(self.conn, m.Error("bad-arity", "Hello needs 1 wire fields, got 2"))
            hello, _ = recv_message(self.conn)
            assert isinstance(hello, m.Hello)
            self.hellos.append(hello)
        reattach = (self.features or 0) & m.FEATURE_REATTACH
        state_id = TOKEN if reattach else None
        send_message(self.conn, m.Welcome(1, TOKEN, 1 << 30, 4096, self.features, state_id))
        identity, data = self.router.recv_multipart()
        attach = decode(data, Channel.MAPPER)
        assert isinstance(attach, m.Attach) and attach.role == m.ROLE_STREAM_FD
        self.stream = identity
        if self.older:
            refusal = m.Error("bad-role", "role must be 0 (stream) or 1 (requests)")
            self.router.send_multipart([identity, encode(refusal)])
            return
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


def test_a_manager_of_an_earlier_release_is_named_at_attach() -> None:
    """Such a manager would refuse this mapper's requests on the fd socket; it refuses the
    stream's role first, and attach says what is wrong instead of faults timing out later."""
    older = ScriptedManager(short_tmpdir(), older=True)
    try:
        root = Path(older.listener.getsockname()).parent
        with pytest.raises(membacking.ManagerUnavailableError, match="of an earlier release"):
            membacking.attach(root, name="newer", timeout=5.0)
    finally:
        older.close()


def test_a_manager_that_refuses_the_feature_mask_gets_a_plain_hello() -> None:
    """A manager of the release before feature negotiation answers a Hello with a mask with
    bad-arity: the mapper registers again without one and uses no features."""
    strict = ScriptedManager(short_tmpdir(), strict_arity=True)
    try:
        root = Path(strict.listener.getsockname()).parent
        with membacking.attach(root, name="newer", timeout=5.0) as memory:
            strict.registered()
            assert [h.features for h in strict.hellos] == [m.SUPPORTED_FEATURES, None]
            assert memory._mapper.link.features == 0
    finally:
        strict.close()


def test_a_mapper_offers_its_features(scripted: ScriptedManager) -> None:
    root = Path(scripted.listener.getsockname()).parent
    with membacking.attach(root, name="offers", timeout=5.0):
        scripted.registered()
        assert [h.features for h in scripted.hellos] == [m.SUPPORTED_FEATURES]


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
        # (without SHUTDOWN_CODE, a stop for good: a reason beginning neither way restarts)
        stop = m.Shutdown("manager shutting down: scripted")
        scripted.router.send_multipart([scripted.stream, encode(stop)])
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
        with pytest.raises(TimeoutError, match="has not made room"):
            while sent < 1_000_000:  # the kernel's buffer holds a few hundred
                link.send(m.SendMappings(m.MemoryRange(0, 4096)))
                sent += 1
        assert 0 < sent < 1_000_000
        with pytest.raises(
            membacking.GuestMemoryError, match="has not made room on this mapper's fd socket for 1s"
        ) as exc:
            memory.read_at(0x1000, 1)
        assert not isinstance(exc.value, membacking.ManagerGoneError)  # it is there, stalled
        assert len(requests_seen(scripted, 1)) == sent
        link.send(m.SendMappings(m.MemoryRange(0, 4096)))
        assert requests_seen(scripted, 1) == [m.SendMappings(m.MemoryRange(0, 4096))]
    finally:
        memory.detach()


@pytest.mark.parametrize("abandoned", [1, 2])
def test_late_denials_answer_the_maps_that_gave_up_not_the_next_one(
    scripted: ScriptedManager, abandoned: int
) -> None:
    """A Map whose fd answer does not come within the link timeout fails. The denials that come
    afterwards, one per such Map, belong to them: the next Map of the mappable, answered with
    the fd, maps it."""
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
        for _ in range(abandoned):
            reader = threading.Thread(target=read)
            reader.start()
            assert requests_seen(scripted, 10) == [m.SendMappings(m.MemoryRange(0, 4096))]
            scripted.router.send_multipart([scripted.stream, encode(mapping)])  # nothing behind
            reader.join(10)
            assert "did not send the fd of mappable 1" in str(outcome.pop())
        for i in range(abandoned):
            send_message(scripted.conn, m.FdDenied(1, f"the answer to Map {i}"))

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


def test_acks_go_on_the_fd_socket_and_wait_there_for_room(scripted: ScriptedManager) -> None:
    """The mapper acknowledges on its fd socket, not on the stream. When that socket's buffer is
    full, its acks wait in order, and are sent once the manager reads again; the mapper thread
    goes on applying what the manager sends meanwhile."""
    root = Path(scripted.listener.getsockname()).parent
    memory = membacking.attach(root, name="acks", timeout=1.0)
    try:
        scripted.registered()
        scripted.router.send_multipart([scripted.stream, encode(m.Release(5, ()))])
        assert requests_seen(scripted, 10) == [m.UnmapAck(5)]
        assert not scripted.router.poll(200)  # nothing came on the stream

        link, mapper = memory._mapper.link, memory._mapper
        filled = 0
        while link.try_send(m.SendMappings(m.MemoryRange(0, 4096))):
            filled += 1
        for seq in (6, 7):
            scripted.router.send_multipart([scripted.stream, encode(m.Release(seq, ()))])
        scripted.router.send_multipart([scripted.stream, encode(m.EagerResult(False, "probe"))])
        assert mapper._eager_done.wait(10)  # applied behind the acks that found no room
        time.sleep(1.5)  # past the link timeout: still queued, not dropped
        assert list(mapper.acks.waiting) == [m.UnmapAck(6), m.UnmapAck(7)]

        seen = requests_seen(scripted, 5)
        assert len(seen) == filled + 2
        assert seen[-2:] == [m.UnmapAck(6), m.UnmapAck(7)]
    finally:
        memory.detach()


def test_faulting_threads_wait_for_room_one_timeout_in_all(scripted: ScriptedManager) -> None:
    """While the manager takes nothing, each fault waits for room on the fd socket at most the
    link timeout, its wait for the send lock included, however many threads fault at once."""
    root = Path(scripted.listener.getsockname()).parent
    memory = membacking.attach(root, name="crowd", timeout=1.0)
    failures: list[tuple[float, str]] = []
    try:
        scripted.registered()
        link = memory._mapper.link
        while link.try_send(m.SendMappings(m.MemoryRange(0, 4096))):
            pass
        started = time.monotonic()

        def fault(page: int) -> None:
            try:
                memory.read_at(page * 4096, 1)
            except membacking.GuestMemoryError as exc:
                failures.append((time.monotonic() - started, str(exc)))

        threads = [threading.Thread(target=fault, args=(page,)) for page in range(1, 5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert len(failures) == 4
        assert all("has not made room" in why for _, why in failures), failures
        # one after the other they would fail 1, 2, 3 and 4 s in
        assert max(when for when, _ in failures) < 3, failures
    finally:
        memory.detach()
