"""Reliability: mappers killed at any point, mappers that stop answering, a manager killed and
restarted, limits. Bounded in time; each scenario checks that nothing is lost and that the
manager's fds and memfds return to where they were. With MEMBACKING_RELIABILITY_LOG set, each
scenario appends its measured outcome (see scripts/reliability_report.py)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

import membacking
from membacking import ManagerUnavailableError, MembackingError
from membacking.protocol import messages as m
from membacking.protocol.codec import encode
from membacking.protocol.fdpass import send_message

from conftest import HandMapper, RunningManager, Worker, WorkerError

MiB = 1 << 20
Spawn = Callable[..., Worker]
Start = Callable[..., RunningManager]


def manager_fds(manager: RunningManager) -> tuple[int, int]:
    """(open fds, memfd fds) of the manager process (after the test's control connection is
    up, so that it is part of every count)."""
    manager.client().stats()
    targets = []
    for entry in os.listdir(f"/proc/{manager.pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{manager.pid}/fd/{entry}"))
    return len(targets), sum("memfd:" in t or "/mem/" in t for t in targets)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def record(
    scenario: str,
    tried: int,
    outcome: str,
    lost: str,
    before: tuple[int, int],
    after: tuple[int, int],
) -> None:
    path = os.environ.get("MEMBACKING_RELIABILITY_LOG")
    if path:
        with open(path, "a") as log:
            log.write(
                json.dumps(
                    {
                        "scenario": scenario,
                        "tried": tried,
                        "outcome": outcome,
                        "lost": lost,
                        "fds_before": before[0],
                        "fds_after": after[0],
                        "memfds_before": before[1],
                        "memfds_after": after[1],
                    }
                )
                + "\n"
            )


def test_mapper_killed_at_random_points(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager(
        "--region", "ram=0:8M", *(f"--region=r{i}={(i + 1) * 8}M:1M" for i in range(8))
    )
    client = running.client()
    keeper = spawn_worker(running, "keeper")
    keeper.ask("write 0x0 " + b"precious".hex())
    before = manager_fds(running)
    rounds = 12
    rng = random.Random(7)
    for i in range(rounds):
        victim = spawn_worker(running, f"victim{i}")
        victim.ask(f"loop {((i % 8) + 1) * 8 * MiB:#x} 4096")  # faulting and reading
        if i % 3 == 0:
            victim.ask(f"view {((i % 8) + 1) * 8 * MiB:#x} 4096")  # holding a view
        time.sleep(rng.random() * 0.05)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        assert wait_until(
            lambda v=victim: v.mapper_id not in [p["id"] for p in client.mappers()]
        ), "killed mapper not removed"
    # zmq closes a dead peer's connection asynchronously: allow it a moment
    assert wait_until(lambda: manager_fds(running) == before), (before, manager_fds(running))
    after = manager_fds(running)
    assert bytes.fromhex(keeper.ask("read 0x0 8")) == b"precious"
    assert [p["name"] for p in client.mappers()] == ["keeper"]
    record(
        "mapper SIGKILL while faulting / reading / holding a view",
        rounds,
        "removed within the bounded wait each time; other mappers unaffected",
        "nothing",
        before,
        after,
    )


def test_mapper_killed_mid_unmap_unblocks_the_removal(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    running = start_manager("--region", "ram=0:1M")
    client = running.client()
    before = manager_fds(running)
    rounds = 5
    for i in range(rounds):
        client.add_region("dev", 0x100000, 0x10000)
        holder = spawn_worker(running, f"holder{i}")
        holder.ask("view 0x100000 4096")  # its Unmap ack will wait for this view
        result: dict[str, object] = {}
        remover = threading.Thread(target=lambda r=result: r.update(client.remove_region("dev")))
        remover.start()
        time.sleep(0.2)
        assert remover.is_alive()  # blocked on the holder's ack
        holder.proc.send_signal(signal.SIGKILL)
        remover.join(10)
        assert not remover.is_alive(), "removal did not complete after the holder died"
        assert result["unmapped_from"] == [holder.mapper_id]
    assert wait_until(lambda: manager_fds(running) == before), (before, manager_fds(running))
    after = manager_fds(running)
    record(
        "mapper SIGKILL while an Unmap waits for its ack",
        rounds,
        "removal completed as soon as the death was noticed",
        "nothing",
        before,
        after,
    )


def test_unresponsive_mapper_is_evicted(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "ram=0:1M", "--unmap-timeout", "1")
    client = running.client()
    before = manager_fds(running)
    client.add_region("dev", 0x100000, 0x10000)
    frozen = spawn_worker(running, "frozen")
    frozen.ask("read 0x100000 1")
    healthy = spawn_worker(running, "healthy")
    healthy.ask("read 0x100000 1")
    frozen.proc.send_signal(signal.SIGSTOP)
    assert wait_until(lambda: _stopped(frozen.proc.pid))  # every thread, not about to be
    try:
        started = time.monotonic()
        result = client.remove_region("dev")
        waited = time.monotonic() - started
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    assert result["unmapped_from"] == [healthy.mapper_id]  # the frozen one is evicted instead
    assert result["evicted"] == [frozen.mapper_id]
    assert waited >= 1.0  # it waited for the timeout, not less
    assert client.stats()["evictions"] == 1
    assert [p["name"] for p in client.mappers()] == ["healthy"]
    assert "did not answer within 1.0s: evicted" in running.log()
    # the evicted mapper learns it: its new faults fail cleanly
    assert wait_until(lambda: _fails_cleanly(frozen))
    frozen.close()
    healthy.close()
    assert wait_until(lambda: manager_fds(running) == before)
    record(
        "mapper stops answering (SIGSTOP) during a removal",
        1,
        "evicted after --unmap-timeout; removal completed; evicted mapper sees ManagerGone",
        "nothing",
        before,
        manager_fds(running),
    )


def test_mapper_that_never_reads_its_fd_socket(start_manager: Start) -> None:
    """An eager mapper that takes no fds and acks nothing: the fds behind its MapEagers fill
    its socket and wait in the daemon, which goes on serving; the mapper is evicted after
    --unmap-timeout and every fd the daemon held back for it is closed."""
    running = start_manager("--region", "ram=0:1M", "--unmap-timeout", "1")
    client = running.client()
    for i in range(1, 600):
        client.add_region(f"r{i}", i << 20, 4096)
    before = manager_fds(running)
    peer = HandMapper(running.runtime_dir, "deaf")
    try:
        peer.stream.send(encode(m.SetEager()))
        assert wait_until(lambda: manager_fds(running)[1] > before[1] + 100)  # held back
        with membacking.attach(running.runtime_dir, name="other") as other:
            other.write_at(0, b"still serving")
        assert wait_until(lambda: client.stats()["evictions"] == 1)
        assert "deaf" not in [p["name"] for p in client.mappers()]
    finally:
        peer.close()
    assert wait_until(lambda: manager_fds(running) == before)
    record(
        "mapper never reads its fd socket (eager replay of 600 regions)",
        1,
        "fds held back without blocking the daemon; evicted after --unmap-timeout",
        "nothing",
        before,
        manager_fds(running),
    )


def _stopped(pid: int) -> bool:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            states.append(stat.read().rsplit(")", 1)[1].split()[0])
    return all(state == "T" for state in states)


def _fails_cleanly(worker: Worker) -> bool:
    try:
        answer = worker.ask("read 0x0 1")
    except WorkerError as exc:
        if "ManagerGoneError" in str(exc) or "MappingsDroppedError" in str(exc):
            return True
        raise
    raise AssertionError(f"an evicted mapper could still fault memory in: {answer}")


def test_manager_killed_and_restarted(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "ram=0:1M")
    workers = [spawn_worker(running, f"w{i}") for i in range(3)]
    for i, worker in enumerate(workers):
        worker.ask(f"write {i * 16:#x} " + f"w{i}".encode().hex())
    running.stop(signal.SIGKILL)
    for i, worker in enumerate(workers):
        assert bytes.fromhex(worker.ask(f"read {i * 16:#x} 2")) == f"w{i}".encode()
        # written while no manager runs: to the same memory the restarted one adopts
        worker.ask(f"write {0x1000 + i * 16:#x} " + f"g{i}".encode().hex())
    with pytest.raises(ManagerUnavailableError):
        membacking.attach(running.runtime_dir, timeout=2, reconnect_timeout=0)
    again = start_manager("--region", "ram=0:1M", runtime_dir=running.runtime_dir)
    assert "adopted=1" in again.ready_line
    with membacking.attach(again.runtime_dir) as memory:
        for i in range(3):
            assert memory.read_at(i * 16, 2) == f"w{i}".encode()
            assert memory.read_at(0x1000 + i * 16, 2) == f"g{i}".encode()
        memory.write_at(0x2000, b"fresh")
        assert bytes.fromhex(workers[0].ask("read 0x2000 5")) == b"fresh"  # the same memory
    # the mappers registered again: a fault beyond what they held is served by the new daemon
    with pytest.raises(WorkerError, match="NoMappingError"):
        workers[1].ask("read 0x200000 1")
    assert wait_until(lambda: len(again.client().mappers()) == 3)
    record(
        "manager SIGKILL with 3 mappers attached, then restart on the same directory",
        1,
        "restart adopted the region table and the memory files of the state directory; "
        "mappers kept their mappings through the gap and registered again with the new "
        "daemon; bytes written before and during the gap read back through it",
        "nothing: every byte of every region (RAM in tmpfs files, file regions in their files)",
        (0, 0),
        (0, 0),
    )


def test_limits_refuse_cleanly(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager(
        "--region",
        "ram=0:1M",
        "--max-mappers",
        "2",
        "--max-regions",
        "3",
        "--max-fds-per-mapper",
        "1",
    )
    client = running.client()
    first = spawn_worker(running, "one")
    spawn_worker(running, "two")
    with pytest.raises(MembackingError, match="limit of 2 mappers"):
        membacking.attach(running.runtime_dir, name="three")
    client.add_region("b", 0x100000, 0x1000)
    client.add_region("c", 0x200000, 0x1000)
    with pytest.raises(MembackingError, match=r"holds 3 regions, its limit \(--max-regions\) is 3"):
        client.add_region("d", 0x300000, 0x1000)
    first.ask("read 0x0 1")
    with pytest.raises(
        WorkerError, match=r"GuestMemoryError cannot map GPA 0x100000: .*limit of 1 fds"
    ):
        first.ask("read 0x100000 1")  # its second fd is denied: a clean failure that says why
    assert client.stats()["refused"]["limit"] == 3  # a mapper, a region and an fd


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_out_of_file_descriptors(start_manager: Start) -> None:
    """More connections than the daemon may open files: it stops accepting for a moment, keeps
    serving what it has, and takes new mappers again once descriptors are free."""
    limit = ["prlimit", "--nofile=160:160", "--"]  # soft and hard: the daemon cannot raise it
    running = start_manager("--region", "ram=0:1M", prefix=limit)
    peers = []
    try:
        for _ in range(80):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(5)
            sock.connect(str(running.runtime_dir / "fd.sock"))
            send_message(sock, m.Hello("greedy"))
            peers.append(sock)
        assert wait_until(lambda: running.client().stats()["refused"].get("no-resources", 0) > 0)
        assert running.proc.poll() is None
    finally:
        for sock in peers:
            sock.close()
    assert wait_until(lambda: running.client().stats()["mappers"] == 0)
    with membacking.attach(running.runtime_dir, name="after") as memory:
        memory.write_at(0, b"served")
        assert memory.read_at(0, 6) == b"served"
    log = running.log()  # turned away, told why (near the limit), or not accepted (at it)
    assert "turned away: close to the open-file limit" in log or "cannot accept" in log, log
    record(
        "daemon near its open-file limit (160, 80 connections)",
        1,
        "connections past the room told no-resources and closed; daemon kept serving; new "
        "mappers attach after",
        "nothing",
        (0, 0),
        (0, 0),
    )


def test_a_mapper_that_cannot_unmap_does_not_acknowledge(
    start_manager: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: if putting the placeholder back fails, the old memory is still mapped,
    so the mapper must not acknowledge; it is evicted and the removal completes then."""
    from membacking.ffi import Reservation

    running = start_manager("--region", "ram=0:1M", "--unmap-timeout", "1")
    client = running.client()
    client.add_region("dev", 0x100000, 0x10000)
    with membacking.attach(running.runtime_dir, name="stuck") as memory:
        memory.read_at(0x100000, 1)

        def failing_unmap(self: Reservation, offset: int, size: int) -> None:
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(Reservation, "unmap", failing_unmap)
        started = time.monotonic()
        result = client.remove_region("dev")
        assert time.monotonic() - started >= 1.0  # waited for the eviction, not for an ack
        assert (result["unmapped_from"], result["evicted"]) == ([], [memory.mapper_id])
        assert client.stats()["evictions"] == 1
        assert "not acknowledging" in caplog.text
        monkeypatch.undo()
        assert wait_until(lambda: memory.manager_gone is not None)
