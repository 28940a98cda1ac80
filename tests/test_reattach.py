"""Mappers ride through a daemon's death: real daemons SIGKILLed and restarted on the same
runtime directory, real mapper processes that keep their mappings, register again, and have
what the new daemon's table no longer holds unmapped."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import membacking
from membacking.manager.backing import MemfdStore
from membacking.manager.model import Send
from membacking.manager.state import ManagerState, region_info
from membacking.manager.statedir import StateDir
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange

from conftest import RunningManager, Worker, WorkerError, stop_in_eager_replay

MiB = 1 << 20
Start = Callable[..., RunningManager]
Spawn = Callable[..., Worker]
REGIONS = ("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")


def test_mappers_keep_working_across_sigkill_and_restart(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    workers = [spawn_worker(first, f"w{i}") for i in range(2)]
    for i, worker in enumerate(workers):
        worker.ask(f"fill {i * MiB:#x} {0x41 + i:#x} {MiB:#x}")  # its own MiB of ram0
        worker.ask(f"write {0x10000000 + i * 16:#x} " + f"dev{i}".encode().hex())
    first.stop(signal.SIGKILL)

    # mapped memory keeps working while no daemon runs, both ways
    for i, worker in enumerate(workers):
        assert worker.ask(f"read {i * MiB + 100:#x} 2") == bytes([0x41 + i] * 2).hex()
        worker.ask(f"write {i * MiB:#x} " + f"gap{i}".encode().hex())
    # a fault during the gap (w0 never touched the last MiB) waits for the new daemon
    workers[0].send(f"read {7 * MiB:#x} 4")
    time.sleep(0.5)

    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    assert workers[0].answer() == "00000000"  # served by the new daemon
    # each reads what the other wrote, before and during the gap: one memory throughout
    assert workers[0].ask(f"read {MiB:#x} 4") == b"gap1".hex()
    assert workers[1].ask("read 0x0 4") == b"gap0".hex()
    assert workers[1].ask(f"read {MiB + 4:#x} 2") == "4242"
    # the new daemon takes their holdings (each reports them after it attached): removing
    # `dev` then unmaps it from both
    deadline = time.monotonic() + 10
    holders = {r["name"]: r["holders"] for r in second.client().regions()}
    while len(holders["dev"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        holders = {r["name"]: r["holders"] for r in second.client().regions()}
    assert len(holders["dev"]) == 2, holders
    mappers = second.client().mappers()
    assert len(mappers) == 2
    result = second.client().remove_region("dev")
    assert sorted(result["unmapped_from"]) == sorted(m["id"] for m in mappers)
    for worker in workers:
        with pytest.raises(WorkerError, match="NoMappingError"):
            worker.ask("read 0x10000000 1")
    with membacking.attach(second.runtime_dir) as memory:
        assert memory.read_at(0, 4) == b"gap0"


def test_a_fresh_daemon_is_not_mixed_with_old_mappings(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "w")
    worker.ask("write 0x0 " + b"old".hex())
    first.stop(signal.SIGKILL)
    second = start_manager(*REGIONS, "--fresh", runtime_dir=first.runtime_dir)
    # the worker registers again, sees other memory, and drops what it had: its accesses fail
    # saying so (attach(fresh_start="follow") reads the new memory: test_relink.py), never
    # reading the old file nor, unknowingly, the new zeroed RAM
    # (until it has registered again it still reads what it has mapped: the old memory)
    deadline = time.monotonic() + 10
    with pytest.raises(WorkerError, match=r"MappingsDroppedError.*serving other memory"):
        while time.monotonic() < deadline:
            assert worker.ask("read 0x0 3") == b"old".hex()
            time.sleep(0.05)
    while second.client().mappers() and time.monotonic() < deadline:
        time.sleep(0.05)  # (it has left: the daemon sees its fd.sock end on a later turn)
    assert second.client().mappers() == []


def test_a_clean_stop_ends_it_at_once_and_the_wait_is_bounded(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    stopped = spawn_worker(first, "stopped")
    stopped.ask("read 0x0 1")
    first.stop()  # Shutdown code "stopping": no successor to wait for
    started = time.monotonic()
    # a stop for good drops what the mapper held (MappingsDroppedError is a ManagerGoneError)
    with pytest.raises(WorkerError, match="MappingsDroppedError"):
        stopped.ask("read 0x10000000 1")  # not mapped yet
    with pytest.raises(WorkerError, match="MappingsDroppedError"):
        stopped.ask("read 0x0 1")  # mapped before the stop
    assert time.monotonic() - started < 5

    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    waiting = spawn_worker(second, "waiting", "--reconnect", "1.5")
    waiting.ask("read 0x0 1")
    second.stop(signal.SIGKILL)
    started = time.monotonic()
    # the fault waits out the reconnect timeout; then no manager can take the mapper back,
    # so no removal could reach what it maps: it drops every mapping (a successor started
    # later may remove or move that memory)
    with pytest.raises(WorkerError, match=r"MappingsDroppedError.*within 1.5s"):
        waiting.ask("read 0x10000000 1")
    assert 1.0 < time.monotonic() - started < 10
    with pytest.raises(WorkerError, match=r"MappingsDroppedError.*within 1.5s"):
        waiting.ask("read 0x0 1")  # mapped before the manager died


def test_holdings_are_checked_against_the_table(tmp_path: Path) -> None:
    """The state machine alone: what matches the table (same range, mappable, offset,
    writability, and an fd of the very file) is kept; the rest is unmapped, wrong fds
    released."""
    sdir = StateDir(tmp_path / "state")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    state.state_id = b"s" * 16
    state.add_region("a", 0, MiB, True)
    state.add_region("b", 2 * MiB, MiB, True)
    a_id = state.regions["a"].submappings[0].mappable_id
    b_id = state.regions["b"].submappings[0].mappable_id
    entry = state.register_mapper("back", 1)
    welcome = state.welcome(entry, m.SUPPORTED_FEATURES)
    assert welcome.state_id == b"s" * 16
    state.handle_mapper(b"st", m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    identity = store.identity(a_id)
    assert identity is not None
    out = state.handle_fd_message(entry.id, m.Holdings((a_id, *identity, b_id, 1, 2), ()))
    assert [e.msg for e in out or [] if isinstance(e, Send)] == [m.Release(1, (b_id,))]
    out = state.handle_fd_message(
        entry.id,
        m.Holdings(
            (),
            (0, MiB, a_id, 0, 1, 2 * MiB, MiB, b_id, 0, 1, 8 * MiB, MiB, a_id, 0, 1),
        ),
    )
    sent = [e.msg for e in out or [] if isinstance(e, Send)]
    assert [type(x) for x in sent] == [m.Unmap, m.Unmap]
    assert [x.range for x in sent if isinstance(x, m.Unmap)] == [
        MemoryRange(2 * MiB, 3 * MiB),  # its fd is not the file of b
        MemoryRange(8 * MiB, 9 * MiB),  # nothing there
    ]
    assert region_info(state, state.regions["a"])["holders"] == [entry.id]
    # what it kept is unmapped from it like from any holder
    out = state.remove_region("a")
    assert any(isinstance(e, Send) and isinstance(e.msg, m.Unmap) for e in out)
    store.close_all()
    sdir.release(remove=True)


def test_a_planned_restart_with_keep_state_is_ridden_through(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """SIGTERM of a daemon run with --keep-state tells mappers Shutdown "restarting": they keep
    their mappings and wait for the next daemon (an upgrade without stopping them)."""
    first = start_manager(*REGIONS, "--keep-state")
    worker = spawn_worker(first, "planned")
    worker.ask("write 0x0 " + b"kept".hex())
    assert first.stop() == 0
    assert worker.ask("read 0x0 4") == b"kept".hex()
    worker.send("read 0x10000000 1")  # a fault in the gap
    time.sleep(0.3)
    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    assert worker.answer() == "00"
    with membacking.attach(second.runtime_dir) as memory:
        assert memory.read_at(0, 4) == b"kept"


def test_manager_stop_keep_state_keeps_it_for_a_daemon_run_without_it(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """`manager stop --keep-state` keeps the state (and tells mappers "restarting") although
    the daemon was started without --keep-state: an upgrade needs no restart to plan it;
    `--no-keep-state` ends a state --keep-state would have kept; a --no-state daemon refuses."""
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "upgraded")
    worker.ask("write 0x0 " + b"kept".hex())
    done = first.cli("manager", "stop", "--keep-state")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("stopped; its state is kept for the next start")
    assert first.proc.wait(10) == 0
    assert worker.ask("read 0x0 4") == b"kept".hex()  # mappings kept through the gap
    second = start_manager(*REGIONS, "--keep-state", runtime_dir=first.runtime_dir)
    assert worker.ask("read 0x0 4") == b"kept".hex()  # (mapped: no need to be back for it)
    deadline = time.monotonic() + 10
    while not second.client().mappers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["name"] for e in second.client().mappers()] == ["upgraded"]  # it came back
    ended = second.cli("manager", "stop", "--no-keep-state", "--json")
    assert ended.returncode == 0 and '"keep_state": false' in ended.stdout, ended.stdout
    assert second.proc.wait(10) == 0
    with pytest.raises(WorkerError, match="MappingsDroppedError"):
        worker.ask("read 0x0 4")  # told the manager stops for good: it dropped its memory
    third = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    with membacking.attach(third.runtime_dir) as memory:
        assert memory.read_at(0, 4) == bytes(4)  # the state ended with the stop
    none = start_manager(*REGIONS, "--no-state")
    refused = none.cli("manager", "stop", "--keep-state")
    assert refused.returncode == 1 and "keeps no state (--no-state)" in refused.stderr
    assert none.proc.poll() is None and "Traceback" not in refused.stderr


def test_an_eager_mapper_is_eager_again_after_the_restart(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    worker = spawn_worker(first, "eager", "--eager")
    worker.ask("write 0x10 " + b"e".hex())
    first.stop(signal.SIGKILL)
    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        mappers = second.client().mappers()
        if mappers and mappers[0]["mode"] == "eager":
            break
        time.sleep(0.1)
    assert [x["mode"] for x in second.client().mappers()] == ["eager"]
    second.client().add_region("new", 0x20000000, MiB)  # pushed to it, as to any eager mapper
    assert worker.ask("read 0x20000000 1") == "00"
    assert worker.ask("read 0x10 1") == b"e".hex()


def test_a_new_mapper_never_gets_the_id_of_one_that_has_not_come_back(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """Registrations are not region changes: the journal still keeps every id handed out, so a
    mapper attaching to the restarted daemon before an old one is back gets an id of its own
    (before, ids started from the journal's last region change, here from 1 again)."""
    first = start_manager(*REGIONS)
    old = [spawn_worker(first, f"old{i}") for i in range(2)]
    old[1].ask("write 0x0 " + b"kept".hex())
    os.kill(old[1].pid, signal.SIGSTOP)  # it cannot register again for now
    try:
        first.stop(signal.SIGKILL)
        second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
        deadline = time.monotonic() + 10
        while not second.client().mappers() and time.monotonic() < deadline:
            time.sleep(0.05)
        new = spawn_worker(second, "new")
        taken = {old[0].mapper_id, old[1].mapper_id}
        assert new.mapper_id not in taken, (new.mapper_id, taken)
        again = {p["id"] for p in second.client().mappers()}
        assert not again & taken, (again, taken)
    finally:
        os.kill(old[1].pid, signal.SIGCONT)
    assert old[1].ask("read 0x0 4") == b"kept".hex()
    deadline = time.monotonic() + 10
    while len(second.client().mappers()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    ids = [p["id"] for p in second.client().mappers()]
    assert len(set(ids)) == 3 and not set(ids) & taken, ids


def test_an_eager_upgrade_cut_by_a_crash_ends_eager_under_the_new_daemon(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """The daemon is killed in the middle of an eager replay: the mapper asks the restarted one
    for the replay again, and the upgrade that waited ends well, every region mapped (before, it
    waited out its timeout and failed, and the mapper stayed lazy). What the dead daemon left on
    its stream is dropped in a line: it logged two lines for each of hundreds of MapEagers,
    whose acks and fds could not travel any more."""
    count = 600  # a replay long enough to be caught in the middle (stop_in_eager_replay)
    first = start_manager(*REGIONS)
    client = first.client()
    for i in range(count):
        client.add_region(f"e{i}", 0x40000000 + i * 0x10000, 0x10000)
    worker = spawn_worker(first, "eager")
    stop_in_eager_replay(first, worker)
    time.sleep(0.3)  # more of the replay reaches the stopped mapper's stream
    try:
        first.stop(signal.SIGKILL)
        second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert worker.answer(timeout=20) == ""  # the upgrade ended well
    assert [(p["name"], p["mode"]) for p in second.client().mappers()] == [("eager", "eager")]
    mapped = worker.ask("mapped").split(",")
    for i in range(count):
        assert f"{0x40000000 + i * 0x10000:#x}-{0x40000000 + (i + 1) * 0x10000:#x}" in mapped, i
    worker.close()
    said = [line for line in worker.stderr().splitlines() if "cannot" in line]
    assert len(said) <= 1, said[:4]


@pytest.mark.parametrize("reconnect", [30.0, 0.0])
def test_a_mapper_without_reattach_drops_its_mappings_when_the_manager_dies(
    start_manager: Start,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reconnect: float,
) -> None:
    """A mapper that did not negotiate REATTACH (as against a manager of an earlier release)
    cannot prove to the next manager what it holds, so no removal could reach it: when fd.sock
    ends without a Shutdown it drops every mapping at once (§9), not when it registers again.
    With a reconnect timeout its next fault asks the successor, and the memory is still there."""
    monkeypatch.setattr(m, "SUPPORTED_FEATURES", m.SUPPORTED_FEATURES & ~m.FEATURE_REATTACH)
    first = start_manager(*REGIONS)
    with membacking.attach(first.runtime_dir, reconnect_timeout=reconnect) as memory:
        mapper = memory._mapper
        assert not mapper.link.features & m.FEATURE_REATTACH
        memory.write_at(0x1000, b"kept")
        assert len(mapper.chunks) == 1
        first.stop(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(mapper.chunks) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(mapper.chunks) == 0  # before any successor runs
        if not reconnect:  # it will not wait for one: gone, and its mappings with it
            with pytest.raises(membacking.MappingsDroppedError):
                memory.read_at(0x1000, 4)
            assert caplog.text.count("every mapping dropped") == 1  # said once
            return
        assert mapper.dropped is None  # not for good: later faults may ask again
        again = threading.Event()
        memory.on_registered_again(lambda kept, old_id: again.set())
        start_manager(*REGIONS, runtime_dir=first.runtime_dir)
        assert again.wait(15)
        assert memory.read_at(0x1000, 4) == b"kept"  # mapped again from the successor
        assert "without REATTACH" in caplog.text and "fresh start" not in caplog.text
