"""A mapper registering again after its manager restarted or was handed over: it connects its
stream socket while the Hello is answered, waits for a successor without failing tries, tells
what it holds right behind its Attach, and never hangs: a bug or a socket left open by an
error ends in a clear failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from membacking.mapper.core import VaMapper
from membacking.protocol import messages as m

from conftest import short_tmpdir


def test_the_stream_socket_connects_while_the_hello_is_answered() -> None:
    """A mapper connects its ZeroMQ stream socket as soon as fd.sock took its connection, not
    after the Welcome: the handshake overlaps the Hello's round trip (one hop less for every
    mapper registering again after a handover). Here the manager's side holds the Welcome back
    until the stream's connection has been accepted."""
    from membacking.mapper.link import ManagerLink
    from membacking.protocol.codec import encode
    from membacking.protocol.fdpass import recv_message, send_message
    from membacking.runtime import RuntimePaths

    runtime = short_tmpdir()
    paths = RuntimePaths.resolve(runtime)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED)
    router.bind(paths.mapper_endpoint)
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listen.bind(str(paths.fd_socket))
    listen.listen(1)
    accepted_before_welcome: list[bool] = []

    def manager() -> None:
        conn, _ = listen.accept()
        with conn:
            recv_message(conn)  # the Hello
            accepted_before_welcome.append(bool(monitor.poll(5000)))
            send_message(conn, m.Welcome(1, b"t" * 16, 1 << 32, 4096, m.SUPPORTED_FEATURES))
            identity, _ = router.recv_multipart()  # the Attach
            router.send_multipart([identity, encode(m.Attached(m.ROLE_STREAM_FD))])
            conn.recv(1)  # until the mapper closes

    thread = threading.Thread(target=manager, daemon=True)
    thread.start()
    try:
        link = ManagerLink(paths, "early", timeout=10.0)
        link.close()
        thread.join(10)
        assert accepted_before_welcome == [True]
    finally:
        listen.close()
        monitor.close()
        router.close(0)
        ctx.term()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_mapper_told_restarting_tries_no_registration_before_a_successor_binds(
    start_manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager that said `restarting` is going: until its successor binds a new fd.sock a
    try can only fail, and its CPU is spent just when the old manager finishes and the new one
    starts. The mapper waits for the new socket first, then registers at once."""
    import signal

    import membacking
    from membacking.mapper.link import ManagerLink
    from membacking.mapper.reconnect import BACKOFF_MAX

    tries: list[float] = []
    reconnect = ManagerLink.reconnect

    def counted(link: ManagerLink, early: Any = None) -> bool:
        tries.append(time.time())  # the clock file times are on
        return reconnect(link, early)

    monkeypatch.setattr(ManagerLink, "reconnect", counted)
    regions = ("--region", "ram0=0:8M")
    first = start_manager(*regions, "--keep-state")
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:
        memory.write_at(0x1000, b"kept")
        again = threading.Event()
        memory.on_registered_again(lambda kept, old_id: again.set())
        old_stream = memory._mapper.link.stream
        first.stop(signal.SIGTERM)  # Shutdown `restarting`
        # its sockets are closed once it took the Shutdown in: the stream socket would connect
        # to the successor's endpoint by itself (waited for: a loaded machine may take a while)
        deadline = time.monotonic() + 10
        while not old_stream.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert old_stream.closed
        closed = time.time()
        time.sleep(0.3)
        assert tries == []  # no successor yet: nothing tried
        appeared: list[float] = []
        sock_path = first.runtime_dir / "fd.sock"
        before = sock_path.stat().st_ino if sock_path.exists() else None

        def watch() -> None:  # when the successor's fd.sock appeared: the kernel's time of it
            end = time.monotonic() + 30  # (this thread may see it late on a loaded machine)
            while time.monotonic() < end:
                with contextlib.suppress(OSError):
                    info = sock_path.stat()
                    if info.st_ino != before:
                        appeared.append(info.st_ctime_ns / 1e9)
                        return
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start_manager(*regions, runtime_dir=first.runtime_dir)
        assert again.wait(15)
        watcher.join(15)
        assert appeared
        # once it appeared, one try, which worked; before, only once the watch of at most
        # BACKOFF_MAX had run out (a successor slow to start on a loaded machine)
        early = [t for t in tries if t < appeared[0]]  # (file times lag, never lead)
        assert len(tries) - len(early) == 1, (tries, appeared)
        assert all(t >= closed + BACKOFF_MAX - 0.3 for t in early), (tries, closed)
        assert memory.read_at(0x1000, 4) == b"kept"


def test_a_fault_woken_when_the_wait_for_a_manager_runs_out_reads_why() -> None:
    """The end of the reconnect wait wakes the faults waiting for a relink: `gone` is set
    before they wake, or one of them finds it unset, sends on the closed fd socket and fails
    with 'Bad file descriptor' instead of the reason."""
    seen: list[str | None] = []
    mapper: Any = SimpleNamespace(
        id=1,
        gone=None,
        _stop=True,  # (detaching: nothing to drop here)
        waiters=SimpleNamespace(shutdown=lambda reason: None),
        _detach_acked=threading.Event(),
    )

    class Waking(threading.Event):
        def set(self) -> None:
            seen.append(mapper.gone)  # what a fault woken now reads
            super().set()

    mapper.relinked = Waking()
    VaMapper.gone_for_good(mapper, "no manager took this mapper back within 1.5s")
    assert seen == ["no manager took this mapper back within 1.5s"]


def test_a_mapper_sends_what_it_holds_before_its_attach_is_answered(start_manager: Any) -> None:
    """Registering again with a manager that takes PackedHoldings, a mapper tells what it
    holds right behind its Attach, without waiting for the Attached (one round trip less per
    mapper in a handover's gap); what it told is checked once the stream is bound."""
    import signal

    import membacking
    from membacking.mapper.link import ManagerLink

    order: list[str] = []
    attach, send = ManagerLink._attach, ManagerLink.send

    def attaching(link: ManagerLink, role: int, sock: Any, meanwhile: Any = None) -> Any:
        order.append("attach")
        result = attach(link, role, sock, meanwhile)
        order.append("attached")
        return result

    def sending(link: ManagerLink, msg: m.Message) -> None:
        if isinstance(msg, m.PackedHoldings):
            order.append("holdings")
        send(link, msg)

    regions = ("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")
    first = start_manager(*regions)
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:
        memory.write_at(0x1000, b"kept")
        memory.write_at(0x10000000, b"dev")
        again = threading.Event()
        memory.on_registered_again(lambda kept, old_id: again.set())
        ManagerLink._attach = attaching  # type: ignore[method-assign]
        ManagerLink.send = sending  # type: ignore[method-assign]
        try:
            first.stop(signal.SIGKILL)
            second = start_manager(*regions, runtime_dir=first.runtime_dir)
            assert again.wait(15)
        finally:
            ManagerLink._attach = attach  # type: ignore[method-assign]
            ManagerLink.send = send  # type: ignore[method-assign]
        assert order[:2] == ["attach", "holdings"] and order.index("attached") > 1
        held = {r["name"]: r["holders"] for r in second.client().regions()}
        assert held["ram0"] and held["ram0"] == held["dev"]
        assert memory.read_at(0x1000, 4) == b"kept"


def test_a_bug_while_registering_again_fails_faults_instead_of_hanging_them(
    start_manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in the mapper thread's relink (a bug of ours) ends it as gone
    for good: faults fail with ManagerGoneError naming it, and what was mapped is dropped (no
    manager could reach it any more)."""
    import signal

    import membacking
    from membacking.mapper import reconnect

    def broken(mapper: Any) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(reconnect, "relink", broken)
    regions = ("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")
    first = start_manager(*regions)
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:
        memory.write_at(0x1000, b"kept")
        first.stop(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(membacking.ManagerGoneError, match="registering again failed: a bug"):
            memory.read_at(0x10000000, 1)
        assert time.monotonic() - started < 10
        with pytest.raises(membacking.MappingsDroppedError, match="registering again failed"):
            memory.read_at(0x1000, 4)


def test_closing_a_link_never_waits_for_a_socket_an_error_left_open() -> None:
    """A socket of the link's ZeroMQ context left open by an error (an Attach that failed
    half-way) with a message queued would make the context's term() wait for it forever: a
    `mapper attach` or `mem read` hung so. Closing the link closes such sockets at once."""
    from membacking.mapper.link import ManagerLink

    link = ManagerLink.__new__(ManagerLink)
    link.ctx = zmq.Context()
    stray = link.ctx.socket(zmq.DEALER)
    stray.setsockopt(zmq.LINGER, -1)  # wait forever to deliver
    stray.connect("ipc:///nonexistent-membacking-test/stray.ipc")
    stray.send(b"never delivered")
    link.fd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    closing = threading.Thread(target=link.close, daemon=True)
    closing.start()
    closing.join(5)
    assert not closing.is_alive()


def test_a_mapper_packs_what_it_holds_as_it_maps_it() -> None:
    """Each chunk is packed as PackedHoldings lists it when it is mapped, each fd's identity
    when it arrives: registering again sends them without a walk; they are always exactly
    what packing the chunks and fds held at that moment gives, in the same order, whatever
    maps, cuts and removals came before."""
    import os
    import random

    from membacking.mapper.chunks import Chunk, ChunkTable
    from membacking.mapper.fds import MapperFds
    from membacking.protocol.holdings import pack_fds, pack_mappings
    from membacking.protocol.ranges import MemoryRange

    page = 4096
    table = ChunkTable()
    rnd = random.Random(7)

    def check() -> None:
        assert table.packed() == pack_mappings(
            (r.start, r.end - r.start, c.mappable_id, c.file_offset, c.writable)
            for r, c in table.items()
        )

    for step in range(400):
        start = rnd.randrange(256) * page
        rng = MemoryRange(start, start + rnd.randrange(1, 16) * page)
        kind = rnd.randrange(10)
        if kind < 5 and table.first_overlap(rng) is None:
            table.insert(rng, Chunk(rnd.randrange(1, 50), rnd.randrange(8) * page, kind % 2 == 0))
        elif kind < 8:
            table.cut(rng)  # the pieces straddling its ends are kept, packed anew
        elif kind == 8 and len(table):
            table.remove(table.items()[rnd.randrange(len(table))][0])
        elif step % 3 == 0:
            table.remove_overlapping(rng)
        check()
    table.clear()
    check()
    table.insert_sorted([(MemoryRange(0, page), Chunk(1, 0, True))])
    check()
    assert len(table.packed()) == 40

    fds = MapperFds(SimpleNamespace(), 1)  # type: ignore[arg-type]
    memfds = {i: os.memfd_create(f"f{i}") for i in (9, 5, 6)}
    for i, fd in memfds.items():
        fds._hold(i, fd)
    info = {i: os.fstat(fd) for i, fd in memfds.items()}
    expect = [(i, info[i].st_dev, info[i].st_ino) for i in (5, 6, 9)]  # by mappable id
    assert fds.packed_identities() == pack_fds(expect)
    fds.close((6,))
    assert fds.packed_identities() == pack_fds([expect[0], expect[2]])
    assert fds.identities() == [*expect[0], *expect[2]]
    fds.close_all()
    assert fds.packed_identities() == b""


def test_mappers_holding_the_same_fds_report_the_same_bytes() -> None:
    """What a mapper reports of its fds (PackedHoldings) does not depend on the order they
    came in: two mappers holding the same fds tell the same bytes (the manager checks the same
    bytes once), also after some were closed, replaced (sent twice) or taken again."""
    import os
    import random
    from types import SimpleNamespace

    from membacking.mapper.fds import MapperFds
    from membacking.protocol.holdings import pack_fds

    memfds = {i: os.memfd_create(f"f{i}") for i in range(1, 41)}
    info = {i: os.fstat(fd) for i, fd in memfds.items()}
    rnd = random.Random(3)
    held: list[MapperFds] = []
    for _ in range(3):
        fds = MapperFds(SimpleNamespace(), 1)  # type: ignore[arg-type]
        order = list(memfds)
        rnd.shuffle(order)
        for i in order:
            fds._hold(i, os.dup(memfds[i]))
        fds.close(tuple(range(1, 41, 3)))
        for i in (1, 7, 8):  # taken again after a Release, and one sent twice
            fds._hold(i, os.dup(memfds[i]))
        held.append(fds)
    kept = sorted({*range(1, 41)} - {*range(1, 41, 3)} | {1, 7})
    expect = pack_fds([(i, info[i].st_dev, info[i].st_ino) for i in kept])
    assert [fds.packed_identities() for fds in held] == [expect] * 3
    for fds in held:
        assert sorted(i for i, _ in fds.held()) == kept
        fds.close_all()
    for fd in memfds.values():
        os.close(fd)


def test_a_link_works_out_its_socket_paths_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering again stats and connects by the paths taken when the link was made (no
    Path built per try); a directory too long is refused as before."""
    import os

    from membacking.errors import ManagerUnavailableError
    from membacking.mapper.link import ManagerLink
    from membacking.runtime import RuntimePaths

    root = short_tmpdir()
    try:
        link = ManagerLink.__new__(ManagerLink)
        link.timeout = 1.0
        link._take_paths(RuntimePaths.resolve(root))

        def no_path(self: RuntimePaths) -> None:
            raise AssertionError("a path built again")

        monkeypatch.setattr(RuntimePaths, "fd_socket", property(no_path))
        monkeypatch.setattr(RuntimePaths, "check_lengths", no_path)
        assert link.socket_identity() is None
        with pytest.raises(ManagerUnavailableError, match="no membacking manager"):
            link._connect_fd_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(root / "fd.sock"))
        listener.listen(1)
        info = os.stat(root / "fd.sock")
        assert link.socket_identity() == (info.st_dev, info.st_ino, info.st_ctime_ns)
        link._connect_fd_socket().close()
        listener.close()
        monkeypatch.undo()
        long = ManagerLink.__new__(ManagerLink)
        long._take_paths(RuntimePaths.resolve(root / ("x" * 120)))
        with pytest.raises(ManagerUnavailableError, match="too long"):
            long._connect_fd_socket()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _inotify_descriptors() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify"
    return count


def test_a_mapper_keeps_its_socket_watch_after_registering_again(start_manager: Any) -> None:
    """Closing an inotify descriptor waits for an SRCU grace period in a kernel worker every
    process shares: a mapper closing its watch at the end of a handover's wait paid 1 to 2.6
    ms on its thread as faults waited. The watch stays open until the mapper closes."""
    import signal

    import membacking

    before = _inotify_descriptors()
    regions = ("--region", "ram0=0:8M")
    first = start_manager(*regions)
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:
        memory.write_at(0x1000, b"kept")
        again = threading.Event()
        memory.on_registered_again(lambda kept, old_id: again.set())
        for _ in range(2):  # made at the first registration again, used again at the second
            again.clear()
            first.stop(signal.SIGKILL)
            first = start_manager(*regions, runtime_dir=first.runtime_dir)
            assert again.wait(15)
            with pytest.raises(membacking.NoMappingError):  # the mapper thread is back at work
                memory.read_at(1 << 30, 1)
            assert _inotify_descriptors() == before + 1
        assert memory.read_at(0x1000, 4) == b"kept"
    assert _inotify_descriptors() == before  # closed with the mapper


def test_a_busy_successor_does_not_hold_up_mapped_memory(start_manager: Any) -> None:
    """A successor whose listen queue is full (it has paused accepting) refuses the connection
    with EAGAIN. Registering again, that is one failed try: the relink's own loop tries again,
    renewing the lease between tries, so accesses to mapped memory go on; the attach's own
    timeout (60 s here) of busy retries inside one try would have held them all that time."""
    import signal

    import membacking

    first = start_manager("--region", "ram0=0:8M")
    with membacking.attach(first.runtime_dir, timeout=60.0, reconnect_timeout=30.0) as memory:
        mapper = memory._mapper
        memory.write_at(0x1000, b"kept")
        first.stop(signal.SIGKILL)
        path = str(first.runtime_dir / "fd.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path + ".busy")
        listener.listen(0)
        queued: list[socket.socket] = []
        try:
            while True:  # fill its queue: the next connect gets EAGAIN
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                peer.setblocking(False)
                queued.append(peer)
                try:
                    peer.connect(path + ".busy")
                except BlockingIOError:
                    break
            os.rename(path + ".busy", path)
            time.sleep(0.5)  # the mapper finds it and tries
            done = threading.Event()
            reads: list[bytes] = []

            def read_for_a_while() -> None:
                for _ in range(20):
                    reads.append(memory.read_at(0x1000, 4))
                    time.sleep(0.05)
                done.set()

            threading.Thread(target=read_for_a_while, daemon=True).start()
            assert done.wait(20), f"only {len(reads)} of 20 reads of mapped memory returned"
            assert reads == [b"kept"] * 20
        finally:
            for peer in queued:
                peer.close()
            listener.close()
    # detaching while it registers again waits for no DetachAck: no manager could send one
    # (it used to wait until the relink gave up, 30 s here, and left the mapper gone)
    assert mapper.gone is None and not mapper._thread.is_alive()
