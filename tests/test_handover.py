"""Planned handover (`manager run --takeover`) with real processes: mappers writing and reading
ride through it with no failed access and every byte kept; regions added and removed around
it; refusals (versions, no state directory, nothing to take over); a handover asked for while a
removal waits on a mapper's acknowledgement waits for it and loses nothing."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import membacking
from membacking.manager.daemon import Daemon
from membacking.manager.persist import PersistConfig
from membacking.manager.settings import ManagerConfig
from membacking.manager.statedir import default_state_dir
from membacking.mapper import faulting, reconnect
from membacking.mapper.waitlist import RELINK, WaiterSet
from membacking.protocol import messages as m
from membacking.protocol.codec import encode
from membacking.protocol.ranges import MemoryRange
from membacking.runtime import RuntimePaths

from conftest import (
    RunningManager,
    Worker,
    WorkerError,
    cli_env,
    run_cli,
    short_tmpdir,
    stop_in_eager_replay,
)

MiB = 1 << 20
Start = Callable[..., RunningManager]
Spawn = Callable[..., Worker]
REGIONS = ("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")
PATTERN = Path(__file__).with_name("pattern_mapper.py")
SLICE = 256 << 10


class PatternMapper:
    """tests/pattern_mapper.py: writes and verifies its slice, reads the others', in a loop."""

    def __init__(self, runtime_dir: Path, index: int, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PATTERN), str(runtime_dir), str(index), str(count), str(SLICE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )

    def started(self) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready and self.proc.stdout.readline().strip() == "ok started"

    def finish(self) -> tuple[int, int, int]:
        """Stop the loop: (rounds, failures, the byte its slice holds last)."""
        out, err = self.proc.communicate(input="", timeout=30)
        assert self.proc.returncode == 0, err
        rounds, failures, value = (int(w) for w in out.split()[-3:])
        assert failures == 0, err
        return rounds, failures, value


def python_cli(*args: str, patch: str) -> list[str]:
    """`membacking ARGS` in a process whose module constants `patch` changes first (another
    release, as far as the handover is concerned)."""
    code = f"{patch}\nfrom membacking.cli import main\nsys.argv[0] = 'membacking'\nmain()"
    return [sys.executable, "-c", f"import sys\n{code}", *args]


def test_mappers_ride_through_a_handover_with_regions_added_and_removed(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    mappers = [PatternMapper(first.runtime_dir, i, 3) for i in range(3)]
    for mapper in mappers:
        mapper.started()
    worker = spawn_worker(first, "w")
    client = first.client()
    client.add_region("before", 0x20000000, MiB)
    worker.ask("write 0x20000000 " + b"before".hex())
    worker.ask("read 0x10000000 1")  # dev: held by the worker

    second = start_manager(*REGIONS, "--takeover", runtime_dir=first.runtime_dir)
    assert f"took-over-from={first.pid}" in second.ready_line, second.ready_line
    assert "adopted=3" in second.ready_line
    assert first.proc.wait(10) == 0
    assert "handing over to pid" in first.log()

    new = second.client()
    deadline = time.monotonic() + 10
    while len(new.mappers()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(new.mappers()) == 4  # every mapper registered again with the new daemon
    # what was written before the handover is there; what the new daemon adds is served
    assert worker.ask("read 0x20000000 6") == b"before".hex()
    new.add_region("after", 0x30000000, MiB)
    worker.ask("write 0x30000000 " + b"after".hex())
    # the new daemon took over the worker's holdings: a removal unmaps from it
    removed = new.remove_region("dev")
    assert worker.mapper_id not in removed["unmapped_from"]  # it registered under a new id
    assert len(removed["unmapped_from"]) == 1
    with pytest.raises(WorkerError, match="NoMappingError"):
        worker.ask("read 0x10000000 1")
    new.remove_region("before")
    with pytest.raises(WorkerError, match="NoMappingError"):
        worker.ask("read 0x20000000 1")
    time.sleep(0.3)  # the loops go on under the new daemon
    results = [mapper.finish() for mapper in mappers]
    with membacking.attach(second.runtime_dir) as memory:
        for index, (rounds, _, value) in enumerate(results):
            assert rounds > 1
            assert memory.read_at(index * SLICE, SLICE) == bytes([value]) * SLICE
        assert memory.read_at(0x30000000, 5) == b"after"


def test_refusals_leave_the_running_manager_serving(start_manager: Start) -> None:
    first = start_manager(*REGIONS)
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0, b"kept")
    runtime = str(first.runtime_dir)
    newer = python_cli(
        "manager",
        "run",
        "--runtime-dir",
        runtime,
        "--takeover",
        *REGIONS,
        patch="import membacking.manager.handover as h; h.HANDOVER_VERSION = 3",
    )
    done = subprocess.run(newer, capture_output=True, text=True, env=cli_env(), timeout=60)
    assert done.returncode == 1, done.stderr
    assert "refuses to hand over" in done.stderr
    assert "handover version 2, the new one 3" in done.stderr
    assert "Traceback" not in done.stderr
    journal = python_cli(
        "manager",
        "run",
        "--runtime-dir",
        runtime,
        "--takeover",
        *REGIONS,
        patch="import membacking.manager.handover as h; h.FORMAT_VERSION = 0",
    )
    done = subprocess.run(journal, capture_output=True, text=True, env=cli_env(), timeout=60)
    assert done.returncode == 1 and "reads up to version 0 only" in done.stderr, done.stderr
    # asked by hand: a handover version it does not speak is that, whatever else comes with it
    with pytest.raises(membacking.ControlError) as refused:
        first.client().call("handover", version=99, journal=9, pid=os.getpid(), more=1)
    assert refused.value.code == "version-mismatch", refused.value
    # an asker that says it listens on the channel but does not: agreed, the daemon would stop
    # and find nobody to take its memory over (a pid of another namespace is no reason)
    with pytest.raises(membacking.ControlError) as refused:
        first.client().call("handover", version=2, journal=9, pid=1 << 30, features=1)
    assert refused.value.code == "bad-request" and "handover channel" in str(refused.value)
    assert first.proc.poll() is None
    assert first.client().stats()["regions"] == 2
    with membacking.attach(first.runtime_dir) as memory:
        assert memory.read_at(0, 4) == b"kept"

    # a state the new one could not adopt is refused before the running one is asked
    done = run_cli(
        "manager", "run", "--takeover", "--address-space", "2T", runtime_dir=first.runtime_dir
    )
    assert done.returncode == 1 and "address space is 0x10000000000" in done.stderr, done.stderr
    other = ("--region", "ram0=0:4M", "--region", "dev=0x10000000:1M")
    done = run_cli("manager", "run", "--takeover", *other, runtime_dir=first.runtime_dir)
    assert done.returncode == 1 and "region 'ram0'" in done.stderr, done.stderr
    assert "but --region/config asks for 4 MiB (0x400000 bytes) at 0x0, shm;" in done.stderr
    assert first.proc.poll() is None and "handing over" not in first.log()
    done = run_cli("manager", "run", "--takeover", "--fresh", runtime_dir=first.runtime_dir)
    assert done.returncode == 2 and "cannot go with --fresh" in done.stderr
    empty = first.runtime_dir.with_name(first.runtime_dir.name + "-none")
    done = run_cli("manager", "run", "--runtime-dir", str(empty), "--takeover")
    assert done.returncode == 1 and "nothing to take over" in done.stderr, done.stderr
    assert "start without --takeover to serve it" in done.stderr
    assert not empty.exists()  # nothing was claimed


def test_an_older_manager_or_one_without_state_is_refused_clearly(start_manager: Start) -> None:
    no_state = start_manager(*REGIONS, "--no-state")
    done = run_cli("manager", "run", "--takeover", runtime_dir=no_state.runtime_dir)
    assert done.returncode == 1 and "runs with --no-state" in done.stderr, done.stderr
    assert no_state.proc.poll() is None

    runtime = short_tmpdir()
    older = subprocess.Popen(
        python_cli(
            "manager",
            "run",
            "--runtime-dir",
            str(runtime),
            *REGIONS,
            patch="import membacking.manager.handover as h; h.OP = 'none'",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        assert older.stdout is not None and b"ready" in older.stdout.readline()
        done = run_cli("manager", "run", "--takeover", runtime_dir=runtime)
        assert done.returncode == 1, done.stderr
        assert "does not know how to hand over" in done.stderr
        assert older.poll() is None
    finally:
        older.terminate()
        older.wait(15)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_takeover_that_cannot_ask_says_why(start_manager: Start) -> None:
    """Started without the --state-dir the running daemon uses, the takeover names that
    directory (the runtime directory's note of it); a running daemon that does not answer
    (stopped) is said to be there and not answering, not "nothing to take over"."""
    import uuid

    from membacking.manager import handover
    from membacking.runtime import RuntimePaths

    state_dir = f"/dev/shm/mb-test-elsewhere-{uuid.uuid4().hex[:8]}"
    elsewhere = start_manager(*REGIONS, "--state-dir", state_dir)
    done = run_cli("manager", "run", *REGIONS, "--takeover", runtime_dir=elsewhere.runtime_dir)
    assert done.returncode == 1, done.stderr
    assert f"keeps its state in {state_dir}; take over with --state-dir {state_dir}" in (
        done.stderr
    ), done.stderr
    assert elsewhere.proc.poll() is None
    os.kill(elsewhere.pid, signal.SIGSTOP)
    try:
        paths = RuntimePaths.resolve(elsewhere.runtime_dir)
        args = {"version": 2, "journal": 1, "pid": os.getpid(), "features": 0}
        with pytest.raises(handover.HandoverError, match="does not answer") as refused:
            handover._ask(paths, 0.5, args, needs_2=False)
        assert "stopped (SIGSTOP)" in str(refused.value)
        assert "nothing to take over" not in str(refused.value)
    finally:
        os.kill(elsewhere.pid, signal.SIGCONT)
    assert elsewhere.client().status()["health"] == "ok"


def test_a_handover_during_a_pending_removal_waits_and_loses_nothing(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    first = start_manager(*REGIONS)
    first.client().add_region("dyn", 0x20000000, MiB)
    worker = spawn_worker(first, "slow")
    worker.ask("write 0x20000000 " + b"dyn".hex())
    worker.ask("write 0x0 " + b"ram".hex())
    os.kill(worker.pid, signal.SIGSTOP)  # it will not acknowledge the Unmap for a while
    outcome: dict[str, Any] = {}

    def remove() -> None:
        outcome["removed"] = membacking.ControlClient(first.runtime_dir).remove_region("dyn")

    def take_over() -> None:
        outcome["second"] = start_manager(*REGIONS, "--takeover", runtime_dir=first.runtime_dir)

    remover = threading.Thread(target=remove)
    remover.start()
    deadline = time.monotonic() + 10
    while not first.client().status()["waiting_on"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.client().status()["waiting_on"]
    taker = threading.Thread(target=take_over)
    taker.start()
    time.sleep(1.0)
    # the running manager keeps serving; the removal still waits, the new one has not started
    assert first.proc.poll() is None and taker.is_alive() and remover.is_alive()
    assert first.client().stats()["regions"] == 3
    os.kill(worker.pid, signal.SIGCONT)
    remover.join(30)
    taker.join(60)
    assert outcome["removed"]["unmapped_from"] == [worker.mapper_id]  # done, by the old one
    second = outcome["second"]
    assert f"took-over-from={first.pid}" in second.ready_line
    # the new process said what it waited for while it waited
    assert "the running manager is busy (changes wait for mappers' acknowledgements (remove" in (
        second.log()
    )
    assert first.log().count("handover refused") == 1  # asked every 50 ms, said once
    assert first.proc.wait(10) == 0
    assert sorted(r["name"] for r in second.client().regions()) == ["dev", "ram0"]
    files = os.listdir(default_state_dir(RuntimePaths.resolve(second.runtime_dir)) / "mem")
    assert len(files) == 2  # dyn's memory file went with the removal
    with pytest.raises(WorkerError, match="NoMappingError"):
        worker.ask("read 0x20000000 1")
    assert worker.ask("read 0x0 3") == b"ram".hex()


class _Stream:
    def __init__(self) -> None:
        self.polls = 0

    def poll(self, timeout: int) -> int:
        self.polls += 1
        time.sleep(timeout / 1000)
        return 0


class _Waiters:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def fail_all(self, why: str) -> None:
        self.failed.append(why)


def _mapper_state(mapper_id: int) -> Any:
    relinked = threading.Event()
    relinked.set()
    return SimpleNamespace(
        id=mapper_id,
        gone=None,
        forked=None,
        closed=False,
        _stop=False,
        reconnect_timeout=30.0,
        relinked=relinked,
        relink_reason="",
        link=SimpleNamespace(stream=_Stream()),
        waiters=_Waiters(),
    )


def test_a_restarting_shutdown_starts_the_relink_without_a_grace() -> None:
    """The mapper thread handling Shutdown `restarting` does not wait for a Shutdown behind the
    hang-up (it held every fault of a handover for SHUTDOWN_GRACE)."""
    mapper = _mapper_state(1)
    assert reconnect.start_relink(mapper, "handing over", announced=True)
    assert mapper.link.stream.polls == 0
    assert not mapper.relinked.is_set() and mapper.waiters.failed == [RELINK]
    hung_up = _mapper_state(1)  # a hang-up noticed first still looks for the Shutdown
    assert reconnect.start_relink(hung_up, "connection lost")
    assert hung_up.link.stream.polls == 1


def test_a_fault_that_failed_after_the_relink_does_not_wait(monkeypatch: Any) -> None:
    """A fault whose send failed on the old connection after the mapper had already registered
    again (its id changed) is asked again at once, not after RELINK_NOTICE."""
    monkeypatch.setattr(reconnect, "RELINK_NOTICE", 30.0)
    mapper = _mapper_state(2)
    started = time.monotonic()
    assert reconnect.relink_coming(mapper, sent_as=1)
    assert time.monotonic() - started < 15.0  # it did not wait out the notice


def test_requests_read_after_the_daemon_agreed_to_stop_are_refused(tmp_path: Path) -> None:
    """A request that arrives in the same batch as the handover it follows is refused with
    `stopping`, not run by a daemon about to exit (a removal would be left half done)."""
    runtime = short_tmpdir()
    config = ManagerConfig(runtime_dir=runtime, persist=PersistConfig(state_dir=tmp_path / "s"))
    daemon = Daemon(config)
    daemon.start()
    try:
        add = m.ControlRequest("add_region", {"name": "a", "size": MiB, "gpa": 0})
        daemon._on_control_frames([b"client", b"", encode(add)])
        assert "a" in daemon.state.regions
        daemon.stop("handing over to pid 1")
        remove = m.ControlRequest("remove_region", {"name": "a"})
        daemon._on_control_frames([b"client", b"", encode(remove)])
        assert not daemon.state.regions["a"].removing
    finally:
        daemon._shutdown()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_waiting_mapper_tries_as_soon_as_a_new_daemon_binds(
    start_manager: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapper between two registration tries does not sleep out its backoff once a new
    daemon has bound its fd socket (here the backoff is 30 s: the read below would time out)."""
    import conftest

    script = tmp_path / "slow_backoff_worker.py"
    script.write_text(
        "import runpy, sys\n"
        "import membacking.mapper.reconnect as r\n"
        "r.BACKOFF_START = r.BACKOFF_MAX = 30.0\n"
        f"sys.argv = [{str(conftest.WORKER)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(conftest.WORKER)!r}, run_name='__main__')\n"
    )
    monkeypatch.setattr(conftest, "WORKER", script)
    first = start_manager(*REGIONS)
    worker = Worker(first.runtime_dir, "patient")
    try:
        worker.ask("write 0x0 " + b"kept".hex())
        first.stop(signal.SIGKILL)
        time.sleep(0.5)  # its first try failed: it pauses for 30 s
        start_manager(*REGIONS, runtime_dir=first.runtime_dir)
        assert worker.ask("read 0x10000000 1", timeout=15) == "00"  # a fault: served again
        assert worker.ask("read 0x0 4") == b"kept".hex()
    finally:
        worker.close()


def test_a_fault_that_registers_as_a_relink_starts_asks_the_successor() -> None:
    """The mapper thread starts a relink (clears `relinked`, fails every waiter) between a
    fault's look at `relinked` and its waiter's registration: the fault is asked again after the
    relink, not sent to the manager that is gone to wait out fault_timeout."""
    mapper = _mapper_state(3)
    sent: list[m.Message] = []
    waiters = WaiterSet()

    class Racing:
        def register(self, rng: MemoryRange, writable: bool, tagged: bool = False) -> Any:
            mapper.relinked.clear()  # what start_relink does first...
            waiters.fail_all(RELINK)  # ...then this, before the fault's waiter is in the set
            return waiters.register(rng, writable, tagged)

        def discard(self, waiter: Any) -> None:
            waiters.discard(waiter)

    mapper.waiters = Racing()
    mapper.eager = False
    mapper.address_space = 1 << 30
    mapper.dropped = None
    mapper.fault_timeout = 0.2
    mapper.link.features = m.FEATURE_TAGS
    mapper.link.send = sent.append
    with pytest.raises(reconnect.Relink):
        faulting._fault_once(mapper, 0x1000, 0x1001, False)
    assert sent == [] and len(waiters) == 0


def test_a_handover_during_an_eager_replay_waits_and_the_mapper_ends_eager(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """An eager mapper is being sent a replay of many regions (its acks still owed, the mapper
    stopped in the middle) when a handover is asked: the new daemon waits for the replay to end,
    nothing is lost, and the mapper ends eager under the new daemon with every region mapped."""
    count = 600  # a replay long enough to be caught in the middle (stop_in_eager_replay)
    first = start_manager(*REGIONS)
    client = first.client()
    for i in range(count):
        client.add_region(f"e{i}", 0x40000000 + i * 0x10000, 0x10000)
    with membacking.attach(first.runtime_dir, name="writer") as memory:
        for i in range(0, count, 37):
            memory.write_at(0x40000000 + i * 0x10000, f"e{i}".encode())
    worker = spawn_worker(first, "eager")
    stop_in_eager_replay(first, worker)
    try:
        outcome: dict[str, RunningManager] = {}

        def take_over() -> None:
            outcome["second"] = start_manager(*REGIONS, "--takeover", runtime_dir=first.runtime_dir)

        taker = threading.Thread(target=take_over)
        taker.start()
        # the new process asks while the replay still waits on the stopped mapper: refused
        # (it asks again), and the running daemon serves on
        deadline = time.monotonic() + 30
        while "handover refused: changes wait" not in first.log():
            assert time.monotonic() < deadline, first.log()[-2000:]
            time.sleep(0.05)
        assert first.proc.poll() is None and taker.is_alive()
        assert client.stats()["regions"] == count + 2
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert worker.answer() == ""  # the replay ended: eager under the first daemon
    taker.join(60)
    second = outcome["second"]
    assert f"took-over-from={first.pid}" in second.ready_line
    assert first.proc.wait(10) == 0
    new = second.client()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # it registers again, and asks for the replay again
        mappers = new.mappers()
        if mappers and mappers[0]["mode"] == "eager":
            break
        time.sleep(0.05)
    assert [(p["name"], p["mode"]) for p in new.mappers()] == [("eager", "eager")]
    assert len(new.regions()) == count + 2
    mapped = worker.ask("mapped").split(",")
    for i in range(count):
        assert f"{0x40000000 + i * 0x10000:#x}-{0x40000000 + (i + 1) * 0x10000:#x}" in mapped, i
    for i in range(0, count, 37):
        assert bytes.fromhex(worker.ask(f"read {0x40000000 + i * 0x10000:#x} 4")).startswith(
            f"e{i}".encode()
        )
    new.add_region("late", 0x30000000, MiB)  # pushed to it, as to any eager mapper
    assert f"{0x30000000:#x}-{0x30100000:#x}" in worker.ask("mapped").split(",")
