"""Removal binds every holder: a mapper evicted while stopped drops every mapping before its
first access after SIGCONT, `--evict-kill` kills it instead, a stopped manager's mappers drop
theirs too, and a manager that merely dies leaves them in place."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_mapper_thread import ScriptedManager, requests_seen

import membacking
from membacking.manager.config import MIN_UNMAP_TIMEOUT
from membacking.manager.shutdown import STOP_LINGER
from membacking.mapper.lease import LEASE
from membacking.protocol import messages as m
from membacking.protocol.codec import encode
from membacking.protocol.fdpass import send_message

from conftest import RunningManager, Worker, WorkerError, short_tmpdir

Spawn = Callable[..., Worker]
Start = Callable[..., RunningManager]

GPA = 0x100000
SIZE = 0x10000
OLD, NEW, STRAY = "aa" * 16, "bb" * 16, "cc" * 16


def stopped(pid: int) -> bool:
    """Every thread of `pid` is stopped (not merely about to be)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            states.append(stat.read().rsplit(")", 1)[1].split()[0])
    return all(state == "T" for state in states)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def stop(worker: Worker) -> None:
    worker.proc.send_signal(signal.SIGSTOP)
    assert wait_until(lambda: stopped(worker.pid))


def queue(worker: Worker, *commands: str) -> None:
    """Write commands to a (stopped) worker's stdin: it runs them the moment it runs again."""
    assert worker.proc.stdin is not None
    worker.proc.stdin.write("".join(c + "\n" for c in commands))
    worker.proc.stdin.flush()


def answers(worker: Worker, n: int) -> list[str]:
    """The worker's next `n` answers."""
    return [worker._line(30.0) for _ in range(n)]


def holds_region(worker: Worker, name: str) -> bool:
    """Whether the worker maps, or holds an fd of, region `name`'s memory: a memfd, or a file
    of the state directory (mem/<id>.membacking:<name>)."""
    ref = re.compile(rf"(?:memfd:|/mem/\d+\.)membacking:{re.escape(name)}\b")
    return bool(ref.search(worker.maps())) or any(ref.search(t) for t in worker.fd_targets())


def test_the_lease_is_shorter_than_any_eviction_or_stop() -> None:
    assert MIN_UNMAP_TIMEOUT >= 2 * LEASE
    assert STOP_LINGER > LEASE


def test_a_view_open_at_eviction_reads_zeros_not_the_removed_memory(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """A running holder whose open view keeps the Unmap from being acknowledged is evicted;
    it drops its mappings at once, and the view's range gets anonymous memory (no fault)."""
    running = start_manager("--unmap-timeout", "1")
    client = running.client()
    client.add_region("old", GPA, SIZE)
    holder = spawn_worker(running, "viewer")
    holder.ask(f"write {GPA:#x} {OLD}")
    holder.ask(f"view {GPA:#x} 4096")
    client.remove_region("old")
    assert wait_until(lambda: not holds_region(holder, "old"))
    with pytest.raises(WorkerError, match="MappingsDroppedError"):
        holder.ask(f"read {GPA:#x} 1")
    holder.ask("unview")  # the view closes without a fault
    assert holder.proc.poll() is None


def test_a_stopped_manager_makes_its_mappers_drop_theirs(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """Once the stopped daemon has exited, a holder woken right then (its lease still ran when
    it was stopped) drops its mappings before its first access."""
    running = start_manager("--region", "ram=0:1M")
    holder = spawn_worker(running, "holder")
    holder.ask(f"write 0x0 {OLD}")
    stop(holder)
    try:
        assert running.stop(signal.SIGTERM) == 0
        queue(holder, "read 0x0 16")
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    (answer,) = answers(holder, 1)
    assert answer.startswith("err MappingsDroppedError") and "shut down" in answer
    assert not holds_region(holder, "ram")


def test_a_manager_that_dies_leaves_the_mappings_in_place_while_one_may_come_back(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """No Shutdown, just the end of the connection: the manager may come back (and the
    mapper re-attach), so nothing is dropped while the mapper waits for it. Once no manager
    took it back in time, no removal could reach it any more: it drops every mapping."""
    running = start_manager("--region", "ram=0:1M")
    holder = spawn_worker(running, "holder", "--reconnect", "3")  # (then new faults fail)
    holder.ask(f"write 0x0 {OLD}")
    running.stop(signal.SIGKILL)
    time.sleep(2 * LEASE)
    assert holder.ask("read 0x0 16") == OLD
    assert holds_region(holder, "ram")
    with pytest.raises(WorkerError, match=r"MappingsDroppedError.*no manager took"):
        holder.ask("read 0x200000 1")  # a new fault cannot be served (no manager came back)
    assert not holds_region(holder, "ram")
    with pytest.raises(WorkerError, match=r"MappingsDroppedError.*no manager took"):
        holder.ask("read 0x0 16")


# ---- against a scripted manager: which endings drop the mappings ------------------------------


@pytest.fixture
def scripted() -> Iterator[ScriptedManager]:
    manager = ScriptedManager(short_tmpdir())
    yield manager
    manager.close()


def map_first_mib(scripted: ScriptedManager, memory: membacking.GuestMemory, memfd: int) -> None:
    """Fault GPA 0 in and answer it with a Map of the first MiB, backed by `memfd`."""
    result: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: result.update(data=memory.read_at(0, 6)))
    reader.start()
    assert [type(x) for x in requests_seen(scripted, 10)] == [m.SendMappings]
    assert scripted.conn is not None
    send_message(scripted.conn, m.FdGrant(1, 1 << 20, True), [memfd])
    mapping = m.Map(m.MemoryRange(0, 1 << 20), 1, 0, True)
    scripted.router.send_multipart([scripted.stream, encode(mapping)])
    reader.join(10)
    assert result["data"] == b"mapped"


#: how long the mapper waits for a successor of the scripted manager (none comes)
WAIT = 2.5


@pytest.mark.parametrize(
    ("ending", "reattach", "drops"),
    [
        ("evicted on the fd socket", True, True),
        ("evicted on the stream only", True, True),
        ("evicted on both sockets", True, True),
        ("stopping on the fd socket", True, True),
        ("old-release stopping text on the fd socket", False, True),
        ("restarting on the fd socket", True, False),
        # a manager of an earlier release: no code, and a reason beginning neither way
        ("old-release-restart text on the fd socket", True, False),
        ("connection lost", True, False),
        # a mapper without REATTACH cannot prove what it holds to the next manager (§9)
        ("restarting on the fd socket", False, True),
        ("connection lost", False, True),
    ],
)
def test_which_endings_drop_the_mappings(ending: str, reattach: bool, drops: bool) -> None:
    features = m.SUPPORTED_FEATURES if reattach else None
    scripted = ScriptedManager(short_tmpdir(), features=features)
    root = Path(scripted.listener.getsockname()).parent
    memfd = os.memfd_create("scripted")
    os.ftruncate(memfd, 1 << 20)
    os.pwrite(memfd, b"mapped", 0)
    # a short wait for a successor: a scripted manager never comes back
    memory = membacking.attach(root, name="scripted", reconnect_timeout=WAIT)
    try:
        scripted.registered()
        assert scripted.conn is not None
        map_first_mib(scripted, memory, memfd)
        shutdown = {
            "evicted": m.Shutdown("evicted: scripted", m.SHUTDOWN_EVICTED),
            "stopping": m.Shutdown("scripted stop", m.SHUTDOWN_STOPPING),
            # a manager of an earlier release: no code, the text says it
            "old-release": m.Shutdown("manager shutting down (scripted)"),
            "restarting": m.Shutdown("scripted restart", m.SHUTDOWN_RESTARTING),
            "old-release-restart": m.Shutdown("restarting (scripted)"),
        }.get(ending.split()[0])
        if shutdown is not None and not ending.endswith("stream only"):
            send_message(scripted.conn, shutdown)
        if shutdown is not None and ending.endswith("stream only"):
            # as a manager does whose fd socket to the mapper was full
            scripted.router.send_multipart([scripted.stream, encode(shutdown)])
        scripted.listener.close()  # as a manager that is gone: no registration answered
        scripted.conn.close()
        scripted.conn = None
        mapper = memory._mapper
        if drops and ending.split()[0] not in ("restarting", "connection"):
            assert wait_until(lambda: mapper.gone is not None)
        if drops and ending.split()[0] in ("restarting", "connection"):
            # dropped, but not for good: a next fault would ask a successor (none comes)
            assert wait_until(lambda: memory.mapped_ranges() == [])
            assert mapper.dropped is None and mapper.fds.get(1) is None
            assert mapper.gone is None  # still waiting for one
        elif drops:
            assert wait_until(lambda: mapper.dropped is not None)
            with pytest.raises(membacking.MappingsDroppedError, match="scripted"):
                memory.read_at(0, 6)
            assert memory.mapped_ranges() == [] and mapper.fds.get(1) is None
            if ending.endswith("both sockets"):  # the stream's copy, read after the fd socket's
                assert shutdown is not None
                scripted.router.send_multipart([scripted.stream, encode(shutdown)])
            time.sleep(0.3)  # a second Shutdown changes nothing
            assert mapper.gone is not None and memory.manager_gone is not None
        else:
            time.sleep(2 * LEASE)  # the lease has run out and been renewed since
            assert mapper.dropped is None
            assert memory.read_at(0, 6) == b"mapped"
        # once no manager took it back, no removal could reach it: it drops what it still maps
        with pytest.raises(membacking.ManagerGoneError):
            memory.read_at(1 << 20, 1)  # a new fault waits out WAIT, then cannot be served
        assert wait_until(lambda: mapper.dropped is not None)
        with pytest.raises(membacking.MappingsDroppedError):
            memory.read_at(0, 6)
        assert memory.mapped_ranges() == [] and mapper.fds.get(1) is None
    finally:
        memory.detach()
        os.close(memfd)
        scripted.close()


def test_an_access_after_the_lease_ran_out_waits_for_a_turn(scripted: ScriptedManager) -> None:
    """The slow side of the lease: an access finding it run out wakes the mapper thread, waits
    for its turn, then goes ahead (hot path and general path alike)."""
    root = Path(scripted.listener.getsockname()).parent
    memfd = os.memfd_create("scripted")
    os.ftruncate(memfd, 1 << 20)
    os.pwrite(memfd, b"mapped", 0)
    memory = membacking.attach(root, name="lease")
    try:
        scripted.registered()
        map_first_mib(scripted, memory, memfd)
        hot = memory._mapper.hot
        for access in (lambda: memory.read_at(0, 6), lambda: memory.read_plain(0, "6s")):
            hot[3] = 0.0
            assert access() == b"mapped"
            assert hot[3] > time.monotonic()
    finally:
        memory.detach()
        os.close(memfd)


def test_a_view_kept_open_past_detach_no_longer_reaches_guest_memory(
    manager: RunningManager,
) -> None:
    """A detached mapper is no holder the manager counts: a writable view left open across
    `detach()` must not keep writing guest memory that regions may move to or be removed
    from. Its range reads zeros from the detach on (no fault), and nobody else sees its
    writes."""
    memory = membacking.attach(manager.runtime_dir, name="detaching")
    memory.write_at(0x2000, b"before")
    with memory.view(0x2000, 4096, write=True) as view:
        memory.detach()
        assert bytes(view[:6]) == bytes(6)  # not the guest memory's b"before"
        view[0:8] = b"STALE!!!"
        with membacking.attach(manager.runtime_dir, name="observer") as observer:
            assert observer.read_at(0x2000, 8) == b"before\0\0"


def test_a_manager_that_takes_the_connection_but_never_answers_keeps_no_mapper_past_its_wait(
    scripted: ScriptedManager,
) -> None:
    """Registering again, a try whose Hello is taken but never answered (a hung manager: its
    listener still queues connections) is cut to what is left of the reconnect timeout, not
    the attach's own timeout (60 s here): the mapper is gone, and has dropped its mappings,
    long before that."""
    root = Path(scripted.listener.getsockname()).parent
    memfd = os.memfd_create("scripted")
    os.ftruncate(memfd, 1 << 20)
    os.pwrite(memfd, b"mapped", 0)
    memory = membacking.attach(root, name="hung", timeout=60.0, reconnect_timeout=1.0)
    try:
        scripted.registered()
        map_first_mib(scripted, memory, memfd)
        assert scripted.conn is not None
        scripted.conn.close()  # the listener stays: the next Hello is queued, never answered
        scripted.conn = None
        mapper = memory._mapper
        assert wait_until(lambda: mapper.dropped is not None, timeout=30.0)
        with pytest.raises(membacking.MappingsDroppedError, match="within 1s"):
            memory.read_at(0, 6)
    finally:
        memory.detach()
        os.close(memfd)
