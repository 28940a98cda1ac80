"""Mappers awaited back after a restart: the journal keeps the mappers that may hold memory
(id, pid, start time); a restarted manager defers a change that could cut mappings until each
of them still running told what it holds, its process ended, or the wait ran out. The state
machine alone first, then real daemons SIGKILLed under a mapper that rides through."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import membacking
from membacking.control_client import ControlClient
from membacking.errors import MembackingError
from membacking.manager import journal
from membacking.manager.awaited import MAX_DEFERRED, AwaitedMappers
from membacking.manager.backing import MemfdStore
from membacking.manager.journal import MapperRecord
from membacking.manager.model import Send, SendFd
from membacking.manager.snapshot import capture, restore
from membacking.manager.state import ManagerState
from membacking.manager.statedir import StateDir, default_state_dir
from membacking.protocol import messages as m
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange
from membacking.runtime import RuntimePaths

from conftest import RunningManager, Worker, WorkerError, cli_env

MiB = 1 << 20
#: the processes the state machine tests pretend run: pid -> start time
RUNNING = {4242: 77, 5151: 9}


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ManagerState]:
    sdir = StateDir(tmp_path / "state")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    state.state_id = b"s" * 16
    state.awaited = AwaitedMappers(started=RUNNING.get, maps=lambda pid: None)
    yield state
    store.close_all()
    sdir.release(remove=True)


def test_a_mapper_is_unjournaled_until_a_save_lists_its_process() -> None:
    """Which live mappers no journal lists yet (the daemon saves before it sends one of them a
    Map): a new one until the next save; one whose process the adopted journal lists (back
    after a restart, under a new id) never; one gone, no more."""
    awaited = AwaitedMappers(started=RUNNING.get, maps=lambda pid: None)
    awaited.adopt((MapperRecord(3, 5151, 9),))
    awaited.register(7, 4242)
    awaited.register(8, 5151)  # back after the restart: the journal lists its process
    assert awaited.unjournaled == {7}
    awaited.saved()
    assert awaited.unjournaled == set() and not awaited.dirty
    awaited.depart(7)
    awaited.register(9, 4242)  # the same process again: listed by the last save
    assert awaited.unjournaled == set()
    awaited.saved()  # (mapper 9 and 8 now)
    awaited.depart(9)
    awaited.saved()  # the journal no longer lists process 4242
    awaited.register(10, 4242)
    assert awaited.unjournaled == {10}
    awaited.depart(10)
    assert awaited.unjournaled == set()


def _remove(state: ManagerState, name: str, client: bytes = b"client") -> list[object]:
    out = state.handle_control(client, m.ControlRequest("remove_region", {"name": name}))
    return [e.msg for e in out if isinstance(e, Send)]


def _back(state: ManagerState, pid: int, holds: tuple[int, ...]) -> tuple[int, list[object]]:
    """A mapper of process `pid` registers again and tells what it holds, then the end."""
    entry = state.register_mapper(f"back{pid}", pid)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    state.handle_mapper(b"st%d" % pid, m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    fds = []
    for mappable_id in sorted(set(holds[2::5])):
        identity = state.store.identity(mappable_id)
        assert identity is not None
        fds += [mappable_id, *identity]
    sent: list[object] = []
    for msg in (m.Holdings(tuple(fds), ()), m.Holdings((), holds), m.Holdings((), ())):
        out = state.handle_fd_message(entry.id, msg) or []
        sent += [e.msg for e in out if isinstance(e, Send)]
    return entry.id, sent


def test_a_removal_waits_for_the_mappers_awaited_back(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    a_id = state.regions["a"].submappings[0].mappable_id
    state.awaited.adopt((MapperRecord(3, 4242, 77), MapperRecord(4, 4343, 1)))
    assert [r.pid for r in state.awaited.begin(0.0, 30.0)] == [4242]  # 4343 does not run
    # before: the removal completed at once (no holder known) while the mapper still mapped it
    assert _remove(state, "a") == []
    assert "a" in state.regions and not state.regions["a"].removing
    assert state.awaited.release() == []  # not while it is awaited
    # a read-only request is answered meanwhile
    out = state.handle_control(b"other", m.ControlRequest("regions", {}))
    assert [type(e.msg) for e in out if isinstance(e, Send)] == [m.ControlReply]
    mapper_id, sent = _back(state, 4242, (0, MiB, a_id, 0, 1))
    assert sent == []  # what it holds is what the table has
    assert not state.awaited.open
    [(client, request)] = state.awaited.release()
    out = state.handle_control(client, request)
    unmaps = [e for e in out if isinstance(e, Send) and isinstance(e.msg, m.Unmap)]
    assert [(u.identity, u.msg.range) for u in unmaps] == [(b"st4242", MemoryRange(0, MiB))]
    assert not any(e.channel is Channel.CONTROL for e in out if isinstance(e, Send))
    out = state.handle_mapper(b"st4242", m.UnmapAck(unmaps[0].msg.seq))
    [reply] = [e.msg for e in out if isinstance(e, Send) and e.channel is Channel.CONTROL]
    assert isinstance(reply, m.ControlReply)
    assert reply.result["unmapped_from"] == [mapper_id]


def test_holdings_before_attached_are_refused_aloud(state: ManagerState) -> None:
    """Holdings on fd.sock before the stream is attached (and PackedHoldings past the ones kept
    for it) are not taken: the mapper is told so (Error not-attached on fd.sock), where they
    were only counted, and the wait goes on until it sends them again once attached."""
    state.awaited.adopt((MapperRecord(3, 4242, 77),))
    state.awaited.begin(0.0, 30.0)
    entry = state.register_mapper("early", 4242)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    out = state.handle_fd_message(entry.id, m.Holdings((), ()))
    [error] = [e.msg for e in out if isinstance(e, SendFd)]
    assert isinstance(error, m.Error) and error.code == "not-attached", out
    assert "send them again once Attached" in error.message
    assert state.awaited.open  # the empty Holdings was not taken
    state.handle_mapper(b"e", m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    state.handle_fd_message(entry.id, m.Holdings((), ()))
    assert not state.awaited.open


def test_only_the_empty_message_ends_the_wait(state: ManagerState) -> None:
    """Holdings may take several messages: the wait ends with the empty one that follows them
    (PackedHoldings as Holdings), from a mapper of the awaited process."""
    state.add_region("a", 0, MiB, True)
    a_id = state.regions["a"].submappings[0].mappable_id
    state.awaited.adopt((MapperRecord(3, 4242, 77),))
    state.awaited.begin(0.0, 30.0)
    other = state.register_mapper("other", 5151)
    state.welcome(other, m.SUPPORTED_FEATURES)
    state.handle_mapper(b"o", m.Attach(other.id, other.token, m.ROLE_STREAM_FD))
    state.handle_fd_message(other.id, m.PackedHoldings(b"", b""))
    assert state.awaited.open  # not the awaited process
    entry = state.register_mapper("p", 4242)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    state.handle_mapper(b"p", m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    held = struct.pack("<5Q", 0, MiB, a_id, 0, 1)
    state.handle_fd_message(entry.id, m.PackedHoldings(b"", held))
    assert state.awaited.open  # more may follow
    state.handle_fd_message(entry.id, m.PackedHoldings(b"", b""))
    assert not state.awaited.open


def test_the_wait_ends_when_the_process_ends_or_the_time_runs_out(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    state.awaited.adopt((MapperRecord(3, 4242, 77), MapperRecord(4, 5151, 9)))
    state.awaited.begin(0.0, 30.0)
    assert _remove(state, "a") == []
    # not a change that can cut anything: not deferred
    add = {"name": "b", "size": MiB, "disabled": True}
    out = state.handle_control(b"c2", m.ControlRequest("add_region", add))
    assert [type(e.msg) for e in out if isinstance(e, Send)] == [m.ControlReply]
    del RUNNING[4242]
    try:
        assert state.awaited.tick(1.0) == []  # ended: no longer awaited, nothing to report
    finally:
        RUNNING[4242] = 77
    assert [r.pid for r in state.awaited.waiting] == [5151]
    assert state.awaited.tick(29.0) == []
    assert [r.pid for r in state.awaited.tick(30.0)] == [5151]  # did not come back in time
    [(client, request)] = state.awaited.release()
    sent = [e.msg for e in state.handle_control(client, request) if isinstance(e, Send)]
    assert [type(x) for x in sent] == [m.ControlReply]
    assert "a" not in state.regions


def test_deferred_changes_are_bounded_and_told_at_shutdown(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    state.awaited.adopt((MapperRecord(3, 4242, 77),))
    state.awaited.begin(0.0, 30.0)
    for i in range(MAX_DEFERRED):
        assert _remove(state, "a", b"c%d" % i) == []
    [error] = _remove(state, "a", b"late")
    assert isinstance(error, m.Error) and error.code == "reattaching"
    assert "4242" in error.message and "retry" in error.message
    told = [e for e in state.shutdown("test") if isinstance(e, Send)]
    assert len(told) == MAX_DEFERRED
    assert all(isinstance(e.msg, m.Error) and e.msg.code == "shutting-down" for e in told)


def test_the_journal_keeps_registered_and_awaited_mappers(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    state.awaited.adopt((MapperRecord(3, 5151, 9),))
    state.awaited.begin(0.0, 30.0)
    state.awaited.dirty = False
    entry = state.register_mapper("live", 4242)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    assert state.awaited.dirty  # registration: journaled within a second, not at once
    old = state.register_mapper("old", 4242)
    state.welcome(old, None)  # no REATTACH: it cannot come back holding memory
    ns = state.register_mapper("elsewhere", 0)
    state.welcome(ns, m.SUPPORTED_FEATURES)  # pid 0 (another pid namespace): not tracked
    assert isinstance(state.store, MemfdStore)
    snapshot = capture(state, state.store, state.state_id, "/run/x")
    assert snapshot.mappers == (MapperRecord(entry.id, 4242, 77), MapperRecord(3, 5151, 9))
    assert journal.decode(journal.encode(snapshot)).mappers == snapshot.mappers
    state.awaited.dirty = False
    state.mapper_gone(entry.id)
    assert state.awaited.dirty
    assert capture(state, state.store, state.state_id, "/run/x").mappers == (
        MapperRecord(3, 5151, 9),
    )
    # a mapper of an awaited process registered again, not yet back: one record, not two
    again = state.register_mapper("again", 5151)
    state.welcome(again, m.SUPPORTED_FEATURES)
    assert capture(state, state.store, state.state_id, "/run/x").mappers == (
        MapperRecord(again.id, 5151, 9),
    )
    # a new state restored from it awaits them once it begins
    fresh = ManagerState(MemfdStore(None), address_space=1 << 32)
    fresh.awaited = AwaitedMappers(started=RUNNING.get, maps=lambda pid: None)
    restore(dataclasses.replace(snapshot, regions=(), backings=()), fresh, fresh.store)
    assert fresh.awaited.waiting == []
    assert fresh.adopted_below == fresh._next_mappable_id >= snapshot.next_mappable_id
    assert [r.pid for r in fresh.awaited.begin(0.0, 5.0)] == [4242, 5151]


# ---- real daemons --------------------------------------------------------------------------

Start = Callable[..., RunningManager]
Spawn = Callable[..., Worker]
REGIONS = ("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")


def _journaled(manager: RunningManager, pid: int) -> None:
    """Wait until the journal lists a mapper of process `pid` (within the daemon's tick)."""
    path = default_state_dir(RuntimePaths.resolve(manager.runtime_dir)) / "journal"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = journal.read_bytes(path)
        if data is not None and pid in {r.pid for r in journal.decode(data).mappers}:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} not journaled in {path}")


def _remove_async(manager: RunningManager, name: str) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(ControlClient(manager.runtime_dir, timeout=60).remove_region(name))
        except MembackingError as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _stderr_until(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """What `proc` wrote on stderr until `text` appeared in it (or `timeout` seconds passed,
    or it ended); then it is killed."""
    assert proc.stderr is not None
    err, deadline = "", time.monotonic() + timeout
    while text not in err and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.2)[0]:
            line = proc.stderr.readline()
            if not line:
                break
            err += line
    proc.kill()
    return err + proc.communicate(10)[1]


@pytest.mark.parametrize("how", ["sigkill", "takeover"])
def test_a_removal_after_a_restart_reaches_a_mapper_not_back_yet(
    start_manager: Start, spawn_worker: Spawn, how: str
) -> None:
    """A mapper stopped while its daemon is killed and restarted (or handed over): the removal
    asked of the new daemon waits until the mapper is back and unmaps it from it (before, it
    returned at once and the mapper went on reading the removed region)."""
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "late")
    worker.ask("write 0x10000000 " + b"dev".hex())
    if how == "sigkill":
        _journaled(first, worker.pid)  # within the daemon's tick
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        if how == "sigkill":
            first.stop(signal.SIGKILL)
            second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
        else:  # the old daemon journals its mappers as it hands over
            second = start_manager(*REGIONS, "--takeover", runtime_dir=first.runtime_dir)
            assert first.proc.wait(15) == 0
        status = second.client().status()
        assert [a["pid"] for a in status["awaited"]] == [worker.pid]
        assert "awaited back" in second.cli("status").stdout
        thread, result = _remove_async(second, "dev")
        thread.join(1.5)
        assert result == [], result  # it waits for the stopped mapper
        status = second.client().status()
        assert status["deferred"] == 1
        assert status["health"] == "degraded"
        assert status["problems"] == [f"1 change(s) wait for pid(s) {worker.pid} to come back"]
        # the command line says what it waits for (not an acknowledgement, nor an eviction)
        cli = subprocess.Popen(
            [sys.executable, "-m", "membacking", "region", "disable", "ram0"],
            env=cli_env(second.runtime_dir),
            stderr=subprocess.PIPE,
            text=True,
        )
        said = f"waiting for the mapper(s) of the manager before the restart (pid {worker.pid})"
        err = _stderr_until(cli, said, 20.0)  # (a loaded machine may take seconds to start it)
        assert said in err
        assert "evicted" not in err
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    thread.join(30)
    [done] = result
    assert isinstance(done, dict), done
    [back] = second.client().mappers()
    assert done["unmapped_from"] == [back["id"]]
    with pytest.raises(WorkerError, match="NoMappingError"):
        worker.ask("read 0x10000000 1")
    assert second.client().status()["awaited"] == []


def test_a_mapper_that_does_not_come_back_is_killed_under_evict_kill(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "stuck")
    worker.ask("read 0x10000000 1")
    _journaled(first, worker.pid)
    os.kill(worker.pid, signal.SIGSTOP)
    first.stop(signal.SIGKILL)
    second = start_manager(
        *REGIONS, "--unmap-timeout", "1", "--evict-kill", runtime_dir=first.runtime_dir
    )
    thread, result = _remove_async(second, "dev")
    thread.join(30)
    assert isinstance(result[0], dict), result
    assert worker.proc.wait(10) == -signal.SIGKILL
    stats = second.client().stats()
    assert stats["evict_kills"] == 1
    assert "did not come back" in second.log()


def test_a_vms_launcher_that_does_not_come_back_is_not_killed_under_evict_kill(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """A mapper of the previous manager that lent regions to a VM (its journaled pin still
    holds) is not killed when its wait runs out, --evict-kill or not: the pin keeps those
    regions from change, and a launcher's end would end its VM (QEMU dies with it)."""
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "launcher")
    worker.ask("read 0x0 1")
    first.client().call(
        "pin_regions", mapper=worker.mapper_id, label="VM 'kept'", pid=worker.pid, regions="ram0"
    )
    _journaled(first, worker.pid)
    os.kill(worker.pid, signal.SIGSTOP)
    first.stop(signal.SIGKILL)
    try:
        second = start_manager(
            *REGIONS, "--unmap-timeout", "1", "--evict-kill", runtime_dir=first.runtime_dir
        )
        deadline = time.monotonic() + 30
        while second.client().stats()["reattach_timeouts"] < 1:
            assert time.monotonic() < deadline, second.log()
            time.sleep(0.1)
        assert worker.proc.poll() is None  # alive (stopped), not killed
        assert second.client().stats()["evict_kills"] == 0
        assert "not killed (--evict-kill): it lent regions ram0 to VM 'kept'" in second.log()
        with pytest.raises(membacking.ControlError, match="pinned before a restart"):
            second.client().remove_region("ram0")
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def test_a_handover_waits_for_the_changes_that_wait_for_mappers(state: ManagerState) -> None:
    """A change deferred until the mappers of the manager before are back is a change not
    done: the running daemon refuses to hand over meanwhile (`busy`: the new process asks
    again), rather than end it with `shutting-down`."""
    from membacking.manager.handover import what_is_handed_over

    state.add_region("a", 0, MiB, True)
    state.awaited.adopt((MapperRecord(3, 4242, 77),))
    state.awaited.begin(0.0, 30.0)
    assert what_is_handed_over(state)[0] == []
    assert _remove(state, "a") == []  # deferred
    pending, _ = what_is_handed_over(state)
    assert pending == ["1 waiting for mappers to come back"]


def test_a_mapper_whose_wait_ran_out_is_named_until_it_is_back_or_ends(
    state: ManagerState,
) -> None:
    """Past its wait a mapper of the manager before still runs and may still map what changes
    remove: their answers name it (`not_back`), the journal keeps it (a crash now must not
    forget it), until it comes back (its stale mappings are then unmapped) or ends."""
    from membacking.manager.model import removal_summary

    state.add_region("a", 0, MiB, True)
    state.add_region("b", 2 * MiB, MiB, True)
    state.adopted_below = state._next_mappable_id  # (a and b: as if adopted at a restart)
    a_id = state.regions["a"].submappings[0].mappable_id
    state.awaited.adopt((MapperRecord(3, 4242, 77),))
    state.awaited.begin(0.0, 30.0)
    assert [r.pid for r in state.awaited.tick(30.0)] == [4242]  # its wait ran out
    assert not state.awaited.open and state.awaited.not_back() == [4242]
    assert [r.pid for r in state.awaited.records()] == [4242]  # still journaled
    # a region made since the restart: they cannot map it, and its removal does not say so
    state.add_region("new", 8 * MiB, MiB, True)
    [new] = _remove(state, "new")
    assert isinstance(new, m.ControlReply) and "not_back" not in new.result, new
    [reply] = _remove(state, "b")
    assert isinstance(reply, m.ControlReply)
    assert reply.result["unmapped_from"] == [] and reply.result["not_back"] == [4242]
    assert "pid 4242 did not come back" in removal_summary(reply.result)
    [status] = state.handle_control(b"c", m.ControlRequest("status", {}))
    assert isinstance(status, Send) and isinstance(status.msg, m.ControlReply)
    assert status.msg.result["health"] == "degraded"  # not `ok` while it may map removed memory
    assert status.msg.result["not_back"] == [4242]
    assert any("pid 4242 did not come back" in p for p in status.msg.result["problems"])
    # it comes back late: what it held of a is kept, and it is no longer named
    mapper_id, _ = _back(state, 4242, (0, MiB, a_id, 0, 1))
    assert state.awaited.not_back() == []
    assert [r.mapper_id for r in state.awaited.records()] == [mapper_id]  # as it is now
    # one that ends instead is forgotten at the next tick
    state.awaited.adopt((MapperRecord(5, 5151, 9),))
    state.awaited.begin(40.0, 30.0)
    state.awaited.tick(70.0)
    assert state.awaited.not_back() == [5151]
    del RUNNING[5151]
    state.awaited.tick(71.0)
    assert state.awaited.not_back() == []


def test_a_mapper_is_journaled_before_it_is_sent_its_first_map(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """A mapper gets no Map before the journal lists it: a daemon killed a moment after the
    first fault (before its one-second tick wrote the mapper down) still awaits it back after
    a restart, and a removal waits for it, instead of answering at once while the mapper still
    maps the memory removed."""
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "quick")
    worker.ask("write 0x10000000 " + b"dev".hex())  # its first Map, just after its Hello
    path = default_state_dir(RuntimePaths.resolve(first.runtime_dir)) / "journal"
    data = journal.read_bytes(path)  # read at once: not waited for
    assert data is not None and worker.pid in {r.pid for r in journal.decode(data).mappers}
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        first.stop(signal.SIGKILL)
        second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
        assert [a["pid"] for a in second.client().status()["awaited"]] == [worker.pid]
        thread, result = _remove_async(second, "dev")
        thread.join(1.0)
        assert result == [], result  # it waits for the stopped mapper
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    thread.join(30)
    [done] = result
    assert isinstance(done, dict) and done["unmapped_from"], done
    with pytest.raises(WorkerError, match="NoMappingError"):
        worker.ask("read 0x10000000 1")


def test_a_clean_detach_is_journaled_before_its_acknowledgement(start_manager: Start) -> None:
    """A mapper that detached is out of the journal once its DetachAck arrives: a daemon killed
    right after does not await this (still running) process after its restart, which held
    every change up to the unmap timeout."""
    first = start_manager(*REGIONS)
    path = default_state_dir(RuntimePaths.resolve(first.runtime_dir)) / "journal"
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0x10000000, b"dev")
        data = journal.read_bytes(path)
        assert data is not None and os.getpid() in {r.pid for r in journal.decode(data).mappers}
    data = journal.read_bytes(path)  # read at once: not waited for
    assert data is not None and not journal.decode(data).mappers
    first.stop(signal.SIGKILL)
    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    assert second.client().status()["awaited"] == []
