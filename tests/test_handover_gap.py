"""What keeps a planned handover's service gap short, each part checked on its own: the new
daemon adopts the state before it asks (and after the old one agreed reads again only what
changed), the old daemon takes no new connection once it stops, and a mapper told `restarting`
registers again at once (no wait for a farewell that was said already)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from membacking.manager.backing import MemfdStore
from membacking.manager.daemon import Daemon
from membacking.manager.held import Held
from membacking.manager.model import Send
from membacking.manager.persist import PersistConfig
from membacking.manager.settings import ManagerConfig
from membacking.manager.state import ManagerState, region_info
from membacking.mapper.core import VaMapper
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange

from conftest import short_tmpdir

MiB = 1 << 20


def test_a_mapper_told_restarting_does_not_wait_for_a_farewell() -> None:
    """The fd socket's end read after Shutdown `restarting` (in the same turn of the mapper
    thread) starts no wait for a farewell: the Shutdown has decided already (it held the
    relink for FAREWELL_WAIT)."""
    relinked = threading.Event()  # cleared: the Shutdown started the relink
    waited: list[bool] = []
    gone: list[str] = []
    mapper: Any = SimpleNamespace(
        fds=SimpleNamespace(read_waiting=lambda: "connection closed", take_farewell=lambda: None),
        relinked=relinked,
        _await_farewell=lambda: waited.append(True),
        manager_gone=gone.append,
        gone=None,
        link=SimpleNamespace(features=m.SUPPORTED_FEATURES),  # (REATTACH: keeps its mappings)
    )
    assert VaMapper._read_fd_socket(mapper)
    assert waited == [] and gone == ["connection closed"]
    relinked.set()  # a hang-up with no Shutdown before it still waits for one
    assert VaMapper._read_fd_socket(mapper)
    assert waited == [True]


def test_a_restarting_shutdown_read_while_awaiting_a_farewell_ends_the_wait() -> None:
    """The fd socket's end read first, the mapper waits for a farewell on the stream; a
    Shutdown `restarting` read there ends that wait at once (it held the relink for the whole
    FAREWELL_WAIT): the stream is read once, not again until the wait runs out."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    pull.bind("inproc://farewell")
    push.connect("inproc://farewell")
    push.send(b"Shutdown")  # left unread: the stream stays readable
    relinked = threading.Event()
    relinked.set()
    drained: list[bool] = []

    def drain() -> None:  # handles Shutdown `restarting`: the relink starts
        drained.append(True)
        relinked.clear()

    mapper: Any = SimpleNamespace(
        gone=None, relinked=relinked, _stream_ready=[(pull, zmq.POLLIN)], _drain_stream=drain
    )
    try:
        VaMapper._await_farewell(mapper)
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()
    assert drained == [True]


def test_a_stopping_daemon_refuses_new_connections_at_once(tmp_path: Path) -> None:
    """While a daemon tells its mappers it stops, a mapper trying to register finds no
    listener (ECONNREFUSED) instead of a backlog that nobody answers any more."""
    runtime = short_tmpdir()
    config = ManagerConfig(runtime_dir=runtime, persist=PersistConfig(state_dir=tmp_path / "s"))
    daemon = Daemon(config)
    daemon.start()
    outcome: list[int] = []
    told = daemon.state.shutdown

    def shutdown(reason: str, code: str) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(daemon.paths.fd_socket))
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or -1)
        finally:
            sock.close()
        return told(reason, code)

    daemon.state.shutdown = shutdown  # type: ignore[method-assign]
    try:
        daemon.stop("handing over to pid 1")
        daemon._shutdown()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert outcome == [errno.ECONNREFUSED]


def _take_over_in_thread(runtime: Path, before_ask: Any) -> tuple[Daemon, threading.Thread]:
    """A new daemon (`--takeover`) in this process, serving in a thread once it took over;
    `before_ask(daemon)` runs just before it asks the running daemon (its ask is recorded)."""
    from membacking.control_client import ControlClient

    daemon = Daemon(ManagerConfig(runtime_dir=runtime, takeover=True))
    call = ControlClient.call
    ready = threading.Event()

    def asking(self: ControlClient, op: str, **args: Any) -> Any:
        if op == "handover":
            before_ask(daemon)
        return call(self, op, **args)

    ControlClient.call = asking  # type: ignore[method-assign]
    thread = threading.Thread(
        target=daemon.run, kwargs={"on_ready": lambda _: ready.set(), "install_signals": False}
    )
    thread.start()
    try:
        for _ in range(300):
            if ready.wait(0.1) or not thread.is_alive():
                break
        assert ready.is_set(), "the new daemon did not take over"
    finally:
        ControlClient.call = call  # type: ignore[method-assign]
    return daemon, thread


def test_the_new_daemon_adopts_the_state_before_it_asks(start_manager: Any) -> None:
    """Every memory file is open and the table built before the running daemon is asked (the
    gap is spent on what changed since only); what the old daemon counted meanwhile (and
    journaled last) is taken, and every byte is the old daemon's."""
    import membacking

    first = start_manager("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")
    seen: dict[str, Any] = {}
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:
        memory.write_at(0x1000, b"before")

        def before_ask(daemon: Daemon) -> None:
            seen["backings"] = len(daemon.store)
            seen["regions"] = sorted(daemon.state.regions)
            # what checking the mappers' Holdings reads is built already too
            seen["index"] = daemon.state._held_index is not None
            seen["identities"] = daemon.store._identities is not None
            # its ROUTERs are made (the context's threads started), bound only later
            routers = (daemon._mapper, daemon._control)
            seen["routers"] = [r.getsockopt(zmq.LAST_ENDPOINT) for r in routers]
            memory.write_at(0x2000, b"meanwhile")  # a fault the old daemon counts
            seen["faults"] = first.client().stats()["faults"]

        daemon, thread = _take_over_in_thread(first.runtime_dir, before_ask)
        try:
            assert seen["backings"] == 2 and seen["regions"] == ["dev", "ram0"]
            assert seen["index"] and seen["identities"]
            assert seen["routers"] == [b"", b""]
            bound = daemon._mapper.getsockopt(zmq.LAST_ENDPOINT)
            assert bound == daemon.paths.mapper_endpoint.encode()
            assert first.proc.wait(10) == 0
            assert daemon.state.counters["faults"] >= seen["faults"]
            assert memory.read_at(0x1000, 6) == b"before"
            assert memory.read_at(0x2000, 9) == b"meanwhile"
            assert memory.read_at(0x10000000, 2) == b"\0\0"  # a fault the new daemon serves
        finally:
            daemon.stop()
            thread.join(30)


def test_a_change_after_the_preparation_is_adopted_too(start_manager: Any) -> None:
    """A region added to the running daemon after the new one prepared its state (and before
    it asked) is there after the handover, with its bytes; a removed one is gone."""
    import membacking

    first = start_manager("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:

        def before_ask(daemon: Daemon) -> None:
            client = first.client()
            client.add_region("late", 0x20000000, MiB)
            client.remove_region("dev")
            memory.write_at(0x20000000, b"late bytes")

        daemon, thread = _take_over_in_thread(first.runtime_dir, before_ask)
        try:
            assert sorted(daemon.state.regions) == ["late", "ram0"]
            assert memory.read_at(0x20000000, 10) == b"late bytes"
        finally:
            daemon.stop()
            thread.join(30)


def test_the_prepared_state_is_collected_and_frozen_before_the_ask(
    start_manager: Any, monkeypatch: Any
) -> None:
    """The full garbage collection of the state the new daemon prepared is made before it
    asks, while the old daemon serves; its start of service collects only what came since
    (the frozen state is not walked again inside the gap)."""
    import gc

    from membacking.manager.heap import Heap

    regions = [f"--region=r{i}={i * 2 * MiB:#x}:1M" for i in range(50)]
    first = start_manager(*regions)
    seen: dict[str, Any] = {"settles": []}
    settle = Heap.settle

    def recording(self: Heap, size: int = 0, full: bool = True) -> None:
        seen["settles"].append(full)
        if full:
            settle(self, size)
        else:
            settle(self, size, full)

    monkeypatch.setattr(Heap, "settle", recording)

    def before_ask(daemon: Daemon) -> None:
        seen["frozen"] = gc.get_freeze_count()
        seen["settles_before_ask"] = list(seen["settles"])

    daemon, thread = _take_over_in_thread(first.runtime_dir, before_ask)
    try:
        assert len(daemon.state.regions) == 50
        assert seen["settles_before_ask"] == [True]  # the full one, before the ask
        assert seen["frozen"] > 0
        assert seen["settles"] == [True, False]  # at the start of service: only what is new
        assert daemon.heap.frozen_after_full >= seen["frozen"]
    finally:
        daemon.stop()
        thread.join(30)


def test_holdings_are_checked_against_the_table_as_it_is_now() -> None:
    """The index Holdings are checked with (one lookup per mapping) follows the table: after
    a region is removed and another added in its place, a mapper still holding the old
    mapping has it unmapped, one holding the new one keeps it."""
    store = MemfdStore()
    state = ManagerState(store, address_space=1 << 32)
    state.state_id = b"s" * 16
    state.add_region("a", 0, MiB, True)

    def registered(name: str) -> Any:
        entry = state.register_mapper(name, 1)
        state.welcome(entry, m.SUPPORTED_FEATURES)
        state.handle_mapper(name.encode(), m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
        return entry

    def holdings(entry: Any, mappable_id: int) -> list[Any]:
        identity = store.identity(mappable_id) or (0, 0)
        state.handle_fd_message(entry.id, m.Holdings((mappable_id, *identity), ()))
        out = state.handle_fd_message(entry.id, m.Holdings((), (0, MiB, mappable_id, 0, 1)))
        return [e.msg for e in out or [] if isinstance(e, Send)]

    old_id = state.regions["a"].submappings[0].mappable_id
    first = registered("first")
    assert holdings(first, old_id) == []  # the index is built: `a` as it is
    state.remove_region("a")
    state.add_region("c", 0, MiB, True)
    new_id = state.regions["c"].submappings[0].mappable_id
    second, third = registered("second"), registered("third")
    sent = holdings(second, old_id)
    assert [type(x) for x in sent] == [m.Unmap] and sent[0].range == MemoryRange(0, MiB)
    assert holdings(third, new_id) == []
    assert region_info(state, state.regions["c"])["holders"] == [third.id]
    assert list(third.held) == [MemoryRange(0, MiB)]
    store.close_all()


def test_held_ranges_added_at_once_or_one_by_one_are_the_same() -> None:
    """`Held.extend` takes ranges past its last at once, and any others (before, between,
    overlapping what it holds) one by one: the result is what one `held[rng] = id` per range
    gives."""
    page = 4096
    ranges = [MemoryRange(i * page, (i + 1) * page) for i in range(8)]
    cases = [
        ([], ranges[2:5]),  # empty: at once
        (ranges[:2], ranges[2:5]),  # past the last: at once
        (ranges[4:6], ranges[1:4]),  # before: one by one
        (ranges[3:4], ranges[2:5]),  # around one it holds: one by one
        ([], [ranges[3], ranges[1]]),  # not in order: one by one
    ]
    for before, added in cases:
        extended, one_by_one = Held(), Held()
        for held in (extended, one_by_one):
            for rng in before:
                held[rng] = 7
        extended.extend(added, [9] * len(added))
        for rng in added:
            one_by_one[rng] = 9
        assert extended.items() == one_by_one.items()
        assert extended.bytes == one_by_one.bytes
        assert extended.mappables() == one_by_one.mappables()


def test_a_mapper_knows_the_identity_of_its_fds_without_an_fstat_at_relink() -> None:
    """What Holdings reports of each fd (st_dev, st_ino) is taken when the fd arrives and
    forgotten when it is released: registering again costs no fstat per fd."""
    from membacking.mapper.fds import MapperFds

    fds = MapperFds(SimpleNamespace(), 1)  # type: ignore[arg-type]
    one, two = os.memfd_create("one"), os.memfd_create("two")
    fds._hold(5, one)  # as each FdGrant's fd is received
    fds._hold(6, two)
    info = {5: os.fstat(one), 6: os.fstat(two)}
    assert fds.identities() == [x for i in (5, 6) for x in (i, info[i].st_dev, info[i].st_ino)]
    fds.close((5,))
    assert fds.identities() == [6, info[6].st_dev, info[6].st_ino]
    fds.close_all()
    assert fds.identities() == []


@pytest.mark.parametrize("keep", [True, False])
def test_mappers_are_told_last_when_the_state_is_kept(tmp_path: Path, keep: bool) -> None:
    """Restarting (the state kept for the next daemon), the state is closed before the mappers
    are told: their waking does not slow the daemon's last work. Stopping for good, they are
    told first (they drop their memory while the daemon closes)."""
    runtime = short_tmpdir()
    persist = PersistConfig(state_dir=tmp_path / "s", keep=keep)
    daemon = Daemon(ManagerConfig(runtime_dir=runtime, persist=persist))
    daemon.start()
    order: list[str] = []
    told, closed = daemon.state.shutdown, daemon.persist.close  # type: ignore[union-attr]

    def shutdown(reason: str, code: str) -> Any:
        order.append(f"told {code}")
        return told(reason, code)

    def close(*args: Any, **kwargs: Any) -> None:
        order.append("state closed")
        closed(*args, **kwargs)

    daemon.state.shutdown = shutdown  # type: ignore[method-assign]
    daemon.persist.close = close  # type: ignore[method-assign, union-attr]
    try:
        daemon.stop("stopped")
        daemon._shutdown()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if keep:
        assert order[:2] == ["state closed", f"told {m.SHUTDOWN_RESTARTING}"]
    else:
        assert order[:2] == [f"told {m.SHUTDOWN_STOPPING}", "state closed"]


def test_fd_sock_appears_only_once_it_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapper waiting for a new manager is woken the moment fd.sock appears (inotify): the
    socket must already listen then, or its connect is refused and it backs off. The daemon
    binds and listens under another name and renames it into place."""
    runtime = short_tmpdir()
    paths_seen: list[bool] = []
    listen = socket.socket.listen

    def listening(sock: socket.socket, *args: Any) -> None:
        if sock.family == socket.AF_UNIX:
            paths_seen.append((runtime / "fd.sock").exists())
        listen(sock, *args)

    monkeypatch.setattr(socket.socket, "listen", listening)
    config = ManagerConfig(runtime_dir=runtime, persist=PersistConfig(state_dir=tmp_path / "s"))
    daemon = Daemon(config)
    daemon.start()
    try:
        assert paths_seen == [False]  # not there yet when it began to listen
        assert (runtime / "fd.sock").exists() and not (runtime / "fd.sock.new").exists()
        assert (runtime / "fd.sock").stat().st_mode & 0o777 == 0o600
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(runtime / "fd.sock"))
        client.close()
    finally:
        daemon._shutdown()
        shutil.rmtree(runtime, ignore_errors=True)


def test_the_runtime_directory_is_released_before_the_daemon_tidies_up_after_itself(
    tmp_path: Path,
) -> None:
    """What concerns the stopping process alone (closing its backings' fds, unfreezing its
    heap) comes after it released the runtime directory, which a successor waits for."""
    runtime = short_tmpdir()
    config = ManagerConfig(runtime_dir=runtime, persist=PersistConfig(state_dir=tmp_path / "s"))
    daemon = Daemon(config)
    daemon.start()
    held_at: dict[str, bool] = {}
    lock = daemon.paths.lock
    close_all, unfreeze = daemon.store.close_all, daemon.heap.close

    def closing() -> None:
        held_at["backings closed"] = lock.exists()
        close_all()

    def unfreezing() -> None:
        held_at["heap unfrozen"] = lock.exists()
        unfreeze()

    daemon.store.close_all = closing  # type: ignore[method-assign]
    daemon.heap.close = unfreezing  # type: ignore[method-assign]
    try:
        daemon.stop("handing over to pid 1")
        daemon._shutdown()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert held_at == {"backings closed": False, "heap unfrozen": False}


def test_a_start_refused_before_the_directory_is_claimed_closes_its_routers(
    start_manager: Any,
) -> None:
    """The ROUTERs made before the runtime directory is claimed are closed, with their
    context, when the start fails there (another daemon holds it)."""
    from membacking.manager.rundir import RuntimeDirError

    first = start_manager()
    daemon = Daemon(ManagerConfig(runtime_dir=first.runtime_dir))
    with pytest.raises(RuntimeDirError):
        daemon.start()
    assert daemon._mapper.closed and daemon._control.closed and daemon._ctx.closed
