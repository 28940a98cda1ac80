"""Guest memory outlives the daemon: SIGKILL and a plain restart on the same runtime directory
bring every region back with every byte (real daemons, real tmpfs files); a clean stop ends it
unless asked to keep it; a state that does not fit is refused, and --fresh discards it."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import membacking
from membacking.manager import journal
from membacking.manager.statedir import default_state_dir
from membacking.runtime import RuntimePaths

from conftest import RunningManager, Worker, run_cli, short_tmpdir

MiB = 1 << 20
Start = Callable[..., RunningManager]
REGIONS = ("--region", "ram0=0:8M", "--region", "rom=0xfff00000:1M:ro")


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def checksums(runtime_dir: Path) -> dict[str, str]:
    """sha256 of every enabled region's bytes, read through a fresh mapper."""
    client = membacking.ControlClient(runtime_dir)
    out = {}
    with membacking.attach(runtime_dir, name="checker") as memory:
        for region in client.regions():
            if region["state"] == "active":
                data = memory.read_at(region["gpa"], region["size"])
                out[region["name"]] = hashlib.sha256(data).hexdigest()
    client.close()
    return out


def state_dir(manager: RunningManager) -> Path:
    return default_state_dir(RuntimePaths.resolve(manager.runtime_dir))


def test_sigkill_and_restart_keep_every_region_and_byte(start_manager: Start) -> None:
    first = start_manager(*REGIONS)
    assert f"state-dir={state_dir(first)} adopted=0" in first.ready_line
    assert {r["memory"] for r in first.client().regions()} == {"shm"}
    client = first.client()
    client.add_region("dev", 0x10000000, 2 * MiB, priority=1)
    client.add_region("hidden", 0x10000000, MiB)  # beneath dev: hidden
    client.add_region("parked", None, MiB, disabled=True)
    client.add_region("doomed", 0x20000000, MiB)
    client.map_range("ram0", 2 * MiB, MiB)  # ram0's middle gets a backing of its own
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0, pattern(1, 8 * MiB))
        memory.write_at(0x10000000, pattern(2, 2 * MiB))
        memory.write_at(0x20000000, b"doomed")
    client.remove_region("doomed")
    before = checksums(first.runtime_dir)
    regions_before = client.regions()
    first.stop(signal.SIGKILL)

    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    assert "adopted=5" in second.ready_line, second.ready_line
    after = second.client().regions()
    assert [{k: r[k] for k in r if k != "holders"} for r in after] == [
        {k: r[k] for k in r if k != "holders"} for r in regions_before
    ]
    assert checksums(second.runtime_dir) == before
    with membacking.attach(second.runtime_dir) as memory:
        assert memory.read_at(0, 8 * MiB) == pattern(1, 8 * MiB)
        with pytest.raises(membacking.ReadOnlyError):
            memory.write_at(0xFFF00000, b"x")
        with pytest.raises(membacking.NoMappingError):
            memory.read_at(0x20000000, 1)  # the removal stands
    # one memory file per backing left, no orphan
    assert len(os.listdir(state_dir(second) / "mem")) == 6  # ram0 x2, rom, dev, hidden, parked
    second.stop()
    assert not state_dir(second).exists()  # a clean stop ends guest memory


def test_kill_during_a_burst_of_changes_restarts_consistent(start_manager: Start) -> None:
    """SIGKILL at an arbitrary moment of adds and removals: the restart adopts what the journal
    says, and no memory file is left that it does not name."""
    first = start_manager(*REGIONS)
    client = first.client()
    for i in range(30):
        client.add_region(f"r{i}", 0x40000000 + i * MiB, MiB)
        if i % 3 == 0:
            client.remove_region(f"r{i}")
    first.proc.send_signal(signal.SIGKILL)  # right after the last reply
    first.proc.wait(10)
    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    names = {r["name"] for r in second.client().regions()}
    assert names == {"ram0", "rom"} | {f"r{i}" for i in range(30) if i % 3}
    assert len(os.listdir(state_dir(second) / "mem")) == len(names)


def test_sigterm_ends_guest_memory_unless_kept(start_manager: Start) -> None:
    first = start_manager(*REGIONS)
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0x100, b"gone")
    assert first.stop() == 0
    second = start_manager(*REGIONS, "--keep-state", runtime_dir=first.runtime_dir)
    assert "adopted=0" in second.ready_line
    with membacking.attach(second.runtime_dir) as memory:
        assert memory.read_at(0x100, 4) == bytes(4)
        memory.write_at(0x100, b"kept")
    assert second.stop() == 0
    assert state_dir(second).exists()
    third = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    assert "adopted=2" in third.ready_line
    with membacking.attach(third.runtime_dir) as memory:
        assert memory.read_at(0x100, 4) == b"kept"


def run_manager(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("manager", "run", *args, runtime_dir=runtime_dir, timeout=30)


def killed_after_writing(start_manager: Start, *extra: str) -> RunningManager:
    """A manager that served `old` at GPA 0, then was SIGKILLed (its state left behind)."""
    first = start_manager(*REGIONS, *extra)
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0, b"old")
    first.stop(signal.SIGKILL)
    return first


def test_a_state_that_does_not_fit_is_refused_until_fresh(start_manager: Start) -> None:
    first = killed_after_writing(start_manager)
    sdir = state_dir(first)
    kept = sorted(os.listdir(sdir / "mem"))

    refused = run_manager(first.runtime_dir, *REGIONS, "--address-space", "64G")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "address space" in refused.stderr and "--fresh" in refused.stderr
    other = run_manager(first.runtime_dir, "--region", "ram0=0:16M")
    assert other.returncode == 1 and "Traceback" not in other.stderr
    said = " ".join(other.stderr.split())
    # what the state holds, what was asked, the ways out; and no "adopted" before the refusal.
    # RAM in a state directory is named as `membacking regions` names it (shm), not memfd
    assert (
        f"region 'ram0' in the state in {sdir} is 8 MiB (0x800000 bytes) at 0x0, shm, but "
        "--region/config asks for 16 MiB (0x1000000 bytes) at 0x0, shm." in said
    ), said
    assert "Start without that region in --region/config to keep the state" in said, said
    assert "or with --fresh to discard the state" in said, said
    assert "adopted" not in other.stderr, other.stderr
    assert sorted(os.listdir(sdir / "mem")) == kept  # nothing changed by a refusal
    with socket.socket() as taken:  # refused at its last step: a metrics port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        late = run_manager(first.runtime_dir, "--metrics-port", str(taken.getsockname()[1]))
    assert late.returncode == 1 and "cannot serve metrics" in late.stderr, late.stderr
    assert "adopted" not in late.stderr, late.stderr
    adopting = start_manager(runtime_dir=first.runtime_dir)  # no --region: the state as it is
    assert "adopted=2" in adopting.ready_line and "adopted the state in" in adopting.log()
    listed = {row.split()[0]: row.split() for row in adopting.cli("regions").stdout.splitlines()}
    assert "shm" in listed["ram0"] and "memfd" not in listed["ram0"]  # as the refusal said
    adopting.stop(signal.SIGKILL)

    journal = sdir / "journal"
    data = bytearray(journal.read_bytes())
    data[-1] ^= 0xFF
    journal.write_bytes(bytes(data))
    corrupt = run_manager(first.runtime_dir, *REGIONS)
    assert corrupt.returncode == 1 and "checksum" in corrupt.stderr, corrupt.stderr

    fresh = start_manager(*REGIONS, "--fresh", runtime_dir=first.runtime_dir)
    assert "adopted=0" in fresh.ready_line
    with membacking.attach(fresh.runtime_dir) as memory:
        assert memory.read_at(0, 3) == bytes(3)


def test_memory_without_its_journal_is_refused_until_fresh(start_manager: Start) -> None:
    """A state directory whose journal is gone but whose memory files are there is refused,
    not started over silently (that discarded the guest's memory)."""
    first = killed_after_writing(start_manager)
    sdir = state_dir(first)
    kept = sorted(os.listdir(sdir / "mem"))
    (sdir / "journal").unlink()
    refused = run_manager(first.runtime_dir, *REGIONS)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    said = " ".join(refused.stderr.split())
    assert f"holds {len(kept)} memory files" in said and "but no journal" in said, said
    assert "--fresh" in said, said
    assert sorted(os.listdir(sdir / "mem")) == kept  # nothing changed by the refusal
    fresh = start_manager(*REGIONS, "--fresh", runtime_dir=first.runtime_dir)
    assert "adopted=0" in fresh.ready_line


def test_the_runtime_directory_by_another_name_adopts_the_same_state(
    start_manager: Start, tmp_path: Path
) -> None:
    """Restarted through a symlink to its runtime directory, a manager finds the state the
    first one kept: the default state directory follows the directory, not the name (it
    started fresh on zeroed memory)."""
    first = killed_after_writing(start_manager)
    link = tmp_path / "rt-link"
    link.symlink_to(first.runtime_dir)
    second = start_manager(*REGIONS, runtime_dir=link)
    assert "adopted=2" in second.ready_line, second.ready_line
    with membacking.attach(first.runtime_dir) as memory:
        assert memory.read_at(0, 3) == b"old"


def test_a_restart_without_the_state_dir_given_before_is_refused(start_manager: Start) -> None:
    """Started again without the --state-dir of the manager before, a daemon would start fresh
    in the default one while the guest's memory waits in the other: it is refused, naming it;
    with that --state-dir the state is adopted, and --fresh starts without it."""
    state = Path("/dev/shm") / f"mb-test-pointer-{os.getpid()}"
    try:
        first = killed_after_writing(start_manager, "--state-dir", str(state))
        refused = run_manager(first.runtime_dir, *REGIONS)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        said = " ".join(refused.stderr.split())
        assert f"kept its state in {state}" in said and f"--state-dir {state}" in said, said
        second = start_manager(*REGIONS, "--state-dir", str(state), runtime_dir=first.runtime_dir)
        assert "adopted=2" in second.ready_line
        with membacking.attach(second.runtime_dir) as memory:
            assert memory.read_at(0, 3) == b"old"
        second.stop(signal.SIGKILL)
        fresh = start_manager(*REGIONS, "--fresh", runtime_dir=first.runtime_dir)
        assert "adopted=0" in fresh.ready_line
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_restart_without_the_state_dir_is_refused_also_over_an_older_default_state(
    start_manager: Start,
) -> None:
    """The default state directory holds an older state (a manager killed there) and the next
    manager, started --fresh with another --state-dir, was killed too: started again without
    that --state-dir, a daemon adopted the older state (the memory --fresh had discarded). It
    is refused, naming both; the default one is adopted only when named."""
    state = Path("/dev/shm") / f"mb-test-newer-{os.getpid()}"
    try:
        first = killed_after_writing(start_manager)
        newer = start_manager(
            *REGIONS, "--fresh", "--state-dir", str(state), runtime_dir=first.runtime_dir
        )
        with membacking.attach(newer.runtime_dir) as memory:
            memory.write_at(0, b"new")
        newer.stop(signal.SIGKILL)
        refused = run_manager(first.runtime_dir, *REGIONS)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        said = " ".join(refused.stderr.split())
        assert f"kept its state in {state}" in said and "holds an older state" in said, said
        default = state_dir(first)
        older = start_manager(*REGIONS, "--state-dir", str(default), runtime_dir=first.runtime_dir)
        with membacking.attach(older.runtime_dir) as memory:
            assert memory.read_at(0, 3) == b"old"  # named on purpose: adopted
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_state_kept_at_a_clean_stop_stays_noted_in_the_runtime_directory(
    start_manager: Start,
) -> None:
    """A --keep-state stop keeps the runtime directory's note of the state directory (a second
    close of the state at exit took it): the next start without that --state-dir is refused
    rather than started fresh beside it, and one with it adopts the state."""
    state = Path("/dev/shm") / f"mb-test-keep-note-{os.getpid()}"
    try:
        first = start_manager(*REGIONS, "--keep-state")
        assert first.stop() == 0
        note = first.runtime_dir / "state-dir"
        assert note.read_text().strip() == str(state_dir(first))  # the default one
        second = start_manager(  # (without --fresh: refused, the default one is kept)
            *REGIONS,
            "--fresh",
            "--keep-state",
            "--state-dir",
            str(state),
            runtime_dir=first.runtime_dir,
        )
        with membacking.attach(second.runtime_dir) as memory:
            memory.write_at(0, b"old")
        assert second.stop() == 0
        assert note.read_text().strip() == str(state)
        refused = run_manager(first.runtime_dir, *REGIONS)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"kept its state in {state}" in " ".join(refused.stderr.split())
        third = start_manager(*REGIONS, "--state-dir", str(state), runtime_dir=first.runtime_dir)
        with membacking.attach(third.runtime_dir) as memory:
            assert memory.read_at(0, 3) == b"old"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_state_dir_that_is_a_typo_or_the_runtime_dir_is_refused(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    missing = tmp_path / "no" / "such" / "state"
    refused = run_manager(runtime, *REGIONS, "--state-dir", str(missing))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{tmp_path / 'no' / 'such'} does not exist" in " ".join(refused.stderr.split())
    assert not (tmp_path / "no").exists()  # nothing created
    for state in (runtime, tmp_path):  # the runtime directory, or one holding it
        same = run_manager(runtime, *REGIONS, "--state-dir", str(state))
        assert same.returncode == 2 and "is (or holds) the runtime directory" in same.stderr


def test_a_missing_memory_file_or_a_foreign_directory_is_refused(start_manager: Start) -> None:
    first = start_manager(*REGIONS)
    first.stop(signal.SIGKILL)
    sdir = state_dir(first)
    victim = sorted(os.listdir(sdir / "mem"))[0]
    os.unlink(sdir / "mem" / victim)
    missing = run_manager(first.runtime_dir, *REGIONS)
    assert missing.returncode == 1 and "cannot open" in missing.stderr, missing.stderr
    os.chown(sdir, 12345, 12345)
    foreign = run_manager(first.runtime_dir, *REGIONS)
    assert foreign.returncode == 1 and "belongs to uid 12345" in foreign.stderr, foreign.stderr


def test_no_state_keeps_memfds_and_writes_nothing(start_manager: Start) -> None:
    runtime_dir = short_tmpdir()
    manager = start_manager(*REGIONS, "--no-state", runtime_dir=runtime_dir)
    assert "state-dir=none" in manager.ready_line
    assert not default_state_dir(RuntimePaths.resolve(runtime_dir)).exists()
    fds = os.listdir(f"/proc/{manager.pid}/fd")
    targets = {os.readlink(f"/proc/{manager.pid}/fd/{fd}") for fd in fds}
    assert any(t.startswith("/memfd:membacking:ram0") for t in targets), targets
    listed = manager.cli("regions").stdout.splitlines()[1].split()
    assert listed[0] == "ram0" and listed[7] == "memfd", listed  # BACKING: no state file


def test_no_state_warns_of_a_state_left_by_a_crash(start_manager: Start) -> None:
    """--no-state cannot use a state a killed manager left, but says it is there (the guest
    memory in it stays allocated), how big it is, and how to adopt or remove it."""
    first = start_manager(*REGIONS)
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0, pattern(3, 2 * MiB))
    first.stop(signal.SIGKILL)
    sdir = state_dir(first)
    second = start_manager(*REGIONS, "--no-state", runtime_dir=first.runtime_dir)
    log = " ".join(second.log().split())
    assert f"--no-state ignores the state left in {sdir}" in log, log
    assert "2 memory files, 2 MiB in use (9 MiB of guest memory)" in log, log
    assert "start without --no-state" in log and f"state remove --force {sdir}" in log, log
    assert second.stop() == 0
    assert (sdir / "journal").exists()  # left alone
    third = start_manager(*REGIONS, runtime_dir=first.runtime_dir)  # adopts it
    assert "adopted=2" in third.ready_line
    assert third.stop() == 0  # a clean stop ends the state
    fourth = start_manager(*REGIONS, "--no-state", runtime_dir=first.runtime_dir)
    assert "ignores the state" not in fourth.log()
    assert fourth.stop() == 0


def test_no_state_warns_of_a_state_left_in_the_state_dir_given_before(
    start_manager: Start,
) -> None:
    """The state a killed manager kept in a --state-dir of its own (named in the runtime
    directory's note) is warned of too: it was only in the default place."""
    sdir = Path("/dev/shm") / f"mb-test-left-{os.getpid()}-{time.monotonic_ns()}"
    try:
        first = start_manager(*REGIONS, "--state-dir", str(sdir))
        with membacking.attach(first.runtime_dir) as memory:
            memory.write_at(0, b"kept")
        first.stop(signal.SIGKILL)
        second = start_manager(*REGIONS, "--no-state", runtime_dir=first.runtime_dir)
        log = " ".join(second.log().split())
        assert f"--no-state ignores the state left in {sdir}" in log, log
        assert f"with --state-dir {sdir}: the state is adopted" in log, log
    finally:
        shutil.rmtree(sdir, ignore_errors=True)


def test_custom_state_dir(start_manager: Start, tmp_path: Path) -> None:
    custom = Path("/dev/shm") / f"mb-test-{os.getpid()}-{tmp_path.name}"
    try:
        first = start_manager(*REGIONS, "--state-dir", str(custom))
        with membacking.attach(first.runtime_dir) as memory:
            memory.write_at(0x10, b"custom")
        first.stop(signal.SIGKILL)
        assert (custom / "journal").exists()
        second = start_manager(*REGIONS, "--state-dir", str(custom), runtime_dir=first.runtime_dir)
        with membacking.attach(second.runtime_dir) as memory:
            assert memory.read_at(0x10, 6) == b"custom"
    finally:
        import shutil

        shutil.rmtree(custom, ignore_errors=True)


def test_a_start_that_fails_leaves_no_state_behind() -> None:
    runtime_dir = short_tmpdir()
    sdir = default_state_dir(RuntimePaths.resolve(runtime_dir))
    failed = run_manager(runtime_dir, "--region", "ram0=0:1M", "--region", "ram1=0x80000:1M")
    assert failed.returncode == 1 and "overlaps" in failed.stderr, failed.stderr
    assert not sdir.exists()


def test_a_removal_is_journaled_after_its_acks_or_within_a_second_and_before_its_answer(
    start_manager: Start, spawn_worker: Callable[..., Worker]
) -> None:
    """The daemon handles a removal's acks as they come and journals the change before it
    answers (the journal is not written while the holders work); a holder that does not answer
    delays the journal by at most the daemon's one-second tick."""
    manager = start_manager("--region", "ram0=0:8M")
    manager.client().add_region("dyn", 0x20000000, 1 << 20)
    worker = spawn_worker(manager, "slow")
    worker.ask("write 0x20000000 " + b"dyn".hex())
    journaled = state_dir(manager) / "journal"

    def names() -> set[str]:
        snapshot = journal.read(journaled)
        assert snapshot is not None
        return {record.name for record in snapshot.regions}

    assert names() == {"ram0", "dyn"}
    os.kill(worker.pid, signal.SIGSTOP)  # it will not acknowledge the Unmap for a while
    outcome: dict[str, Any] = {}
    remover = threading.Thread(
        target=lambda: outcome.update(
            membacking.ControlClient(manager.runtime_dir).remove_region("dyn")
        )
    )
    remover.start()
    try:
        deadline = time.monotonic() + 10
        while not manager.client().status()["waiting_on"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert manager.client().status()["waiting_on"]
        # (whether the journal still names it at this moment depends on where the daemon's
        # one-second tick fell: not asserted)
        deadline = time.monotonic() + 10
        while "dyn" in names() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert names() == {"ram0"}  # journaled by the tick, still unanswered
        assert remover.is_alive()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        remover.join(30)
    assert outcome["unmapped_from"] == [worker.mapper_id]


def test_a_region_moved_while_running_comes_back_where_it_was_moved(start_manager: Start) -> None:
    """A `region move` (as the example configuration suggests for device memory) survives a
    crash and a handover with the same --region/config: where a region is placed is the
    state's, as whether it is enabled; a different size, backing or file is still refused."""
    regions = ("--region", "ram0=0:8M", "--region", "bar0=0xe0000000:1M")
    first = start_manager(*regions)
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0xE0000000, b"bar")
    moved = run_cli("region", "move", "bar0", "0xd0000000", runtime_dir=first.runtime_dir)
    assert moved.returncode == 0, moved.stderr
    first.stop(signal.SIGKILL)
    second = start_manager(*regions, runtime_dir=first.runtime_dir)
    assert "stays where it was placed while running (0xd0000000" in second.log()
    third = start_manager(*regions, "--takeover", runtime_dir=first.runtime_dir)
    assert second.proc.wait(10) == 0
    placed = {r["name"]: r["gpa"] for r in third.client().regions()}
    assert placed == {"ram0": 0, "bar0": 0xD0000000}
    with membacking.attach(first.runtime_dir) as memory:
        assert memory.read_at(0xD0000000, 3) == b"bar"
    other = ("--region", "ram0=0:8M", "--region", "bar0=0xe0000000:2M")
    done = run_cli("manager", "run", "--takeover", *other, runtime_dir=first.runtime_dir)
    assert done.returncode == 1 and "region 'bar0'" in done.stderr, done.stderr


def test_a_restart_with_a_lower_max_regions_keeps_every_region_and_says_so(
    start_manager: Start,
) -> None:
    """--max-regions below what the state holds: the regions are kept (the limit bounds
    growth; refusing would strand the memory), the log says so and what to do, and an add is
    refused with the limit's error."""
    first = killed_after_writing(start_manager)
    second = start_manager("--max-regions", "1", runtime_dir=first.runtime_dir)
    said = " ".join(second.log().split())
    assert "holds 2 regions, more than its limit of 1 (--max-regions)" in said, said
    assert "no region can be added until 2 are removed" in said
    assert "(or start with that limit at 3 or more to add one)" in said
    assert {r["name"] for r in second.client().regions()} == {"ram0", "rom"}
    with membacking.attach(second.runtime_dir) as memory:
        assert memory.read_at(0, 3) == b"old"
    added = run_cli("region", "add", "more", "0x40000000", "1M", runtime_dir=second.runtime_dir)
    said = " ".join(added.stderr.split())
    assert added.returncode == 1 and "Traceback" not in said
    assert "holds 2 regions, its limit (--max-regions) is 1: remove 2 first" in said, said
    assert second.client().stats()["refused"] == {"limit": 1}
