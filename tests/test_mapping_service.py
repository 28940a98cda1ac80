"""The mapping service end to end: real manager, real mapper processes, real memfds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import membacking
from membacking import GuestMemoryError, NoMappingError, ReadOnlyError

from conftest import RunningManager, Worker, WorkerError

MiB = 1 << 20
Spawn = Callable[..., Worker]


def memfd_refs(text: str, region: str) -> list[str]:
    # a memfd, or a file of the state directory: mem/<id>.membacking:<region>
    return re.findall(rf"(?:memfd:|/mem/\d+\.)membacking:{region}\b.*", text)


def test_writes_by_one_mapper_are_seen_by_another(
    manager: RunningManager, spawn_worker: Spawn
) -> None:
    a = spawn_worker(manager, "a")
    b = spawn_worker(manager, "b")
    a.ask("write 0x1000 deadbeef")
    assert b.ask("read 0x1000 4") == "deadbeef"
    b.ask("write 0x3ffffff ff")  # last byte of ram0
    assert a.ask("read 0x3fffffc 4") == "000000ff"
    a.ask("fill 0x2000 0x5a 5000")
    assert b.ask("read 0x2000 3") == "5a5a5a" and b.ask("read 0x3387 2") == "5a00"
    holders = {r["name"]: r["holders"] for r in manager.client().regions()}
    assert holders == {"ram0": [a.mapper_id, b.mapper_id], "rom": []}


def test_untouched_region_is_not_mapped(manager: RunningManager, spawn_worker: Spawn) -> None:
    worker = spawn_worker(manager, "w")
    assert not memfd_refs(worker.maps(), "ram0")  # attached, nothing touched yet
    worker.ask("read 0x0 1")
    maps = worker.maps()
    assert len(memfd_refs(maps, "ram0")) == 1
    assert not memfd_refs(maps, "rom")
    assert worker.ask("mapped") == "0x0-0x4000000"


def test_write_to_read_only_region_is_refused(manager: RunningManager, spawn_worker: Spawn) -> None:
    worker = spawn_worker(manager, "w")
    assert worker.ask("read 0xfff00000 4") == "00000000"
    with pytest.raises(WorkerError, match=r"ReadOnlyError GPA 0xfff00010 is mapped read-only"):
        worker.ask("write 0xfff00010 01")
    # a fresh mapper whose first access is the write gets the same clean error
    other = spawn_worker(manager, "w2")
    with pytest.raises(WorkerError, match=r"ReadOnlyError GPA 0xfff00000 is mapped read-only"):
        other.ask("write 0xfff00000 01")
    assert "r--s" in next(line for line in worker.maps().splitlines() if "membacking:rom" in line)


def test_outside_every_region_and_address_space(
    manager: RunningManager, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(manager, "w")
    with pytest.raises(WorkerError, match=r"NoMappingError no region backs GPA 0x4000000"):
        worker.ask("read 0x4000000 1")
    with pytest.raises(WorkerError, match=r"OutOfRangeError GPA 0x10000000000"):
        worker.ask("read 0x10000000000 1")
    # an access that starts mapped and runs off the end fails at the first unbacked byte
    with pytest.raises(WorkerError, match=r"NoMappingError no region backs GPA 0x4000000"):
        worker.ask("read 0x3fffff0 32")


def test_removal_waits_for_every_mapper_then_leaves_no_trace(
    start_manager: Callable[..., RunningManager], spawn_worker: Spawn
) -> None:
    running = start_manager("--region", "ram0=0:16M", "--region", "victim=0x1000000:8M")
    workers = [spawn_worker(running, f"w{i}") for i in range(3)]
    for worker in workers:
        worker.ask("loop 0x1000000 4096")
        assert memfd_refs(worker.maps(), "victim")
        assert any("membacking:victim" in t for t in worker.fd_targets())
    result = running.client().remove_region("victim")
    assert sorted(result["unmapped_from"]) == sorted(w.mapper_id for w in workers)
    for worker in workers:
        # the ack came before the reply: nothing of the memfd is left in the process
        assert not memfd_refs(worker.maps(), "victim"), worker.maps()
        assert not [t for t in worker.fd_targets() if "membacking:victim" in t]
        reads, _, error = worker.ask("loopstatus").partition(" ")
        deadline = time.monotonic() + 10
        while not error and time.monotonic() < deadline:
            time.sleep(0.01)
            reads, _, error = worker.ask("loopstatus").partition(" ")
        assert int(reads) > 0
        assert error == "NoMappingError no region backs GPA 0x1000000"
        assert worker.proc.poll() is None  # no crash
        assert worker.ask("read 0x0 2") == "0000"  # and it keeps working
    assert [r["name"] for r in running.client().regions()] == ["ram0"]


def test_access_spanning_two_adjacent_regions(
    start_manager: Callable[..., RunningManager], spawn_worker: Spawn
) -> None:
    running = start_manager("--region", "a=0:1M", "--region", "b=1M:1M", "--region", "c=2M:1M")
    writer = spawn_worker(running, "writer")
    writer.ask("write 0xffff8 0102030405060708")
    writer.ask("write 0x100000 090a0b0c0d0e0f10")
    faults_before = running.client().stats()["faults"]
    reader = spawn_worker(running, "reader")
    # one access needs two mappings: one fault, a waiter trimmed by the first Map
    assert reader.ask("read 0xffff8 16") == "0102030405060708090a0b0c0d0e0f10"
    assert running.client().stats()["faults"] == faults_before + 1
    assert reader.ask("mapped") == "0x0-0x100000,0x100000-0x200000"
    # spanning all three regions and into a gap fails at the gap, after mapping what exists
    with pytest.raises(WorkerError, match="no region backs GPA 0x300000"):
        reader.ask("read 0x1ffffc 0x100008")


def test_unmap_racing_fill_in(start_manager: Callable[..., RunningManager]) -> None:
    """Faults and removals of the same region, over and over: every removal completes, no
    access crashes, and nothing of a removed region stays mapped or open."""
    running = start_manager("--region", "ram0=0:1M")
    client = running.client()
    stop = threading.Event()
    outcomes: dict[str, int] = {"ok": 0, "nomapping": 0}
    with membacking.attach(running.runtime_dir, name="racer") as memory:

        def reader() -> None:
            while not stop.is_set():
                try:
                    memory.read_at(0x100000, 8)
                    outcomes["ok"] += 1
                except NoMappingError:
                    outcomes["nomapping"] += 1

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(40):
                client.add_region("flip", 0x100000, 0x10000)
                time.sleep(0.002 * (i % 4))
                client.remove_region("flip")
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        assert outcomes["nomapping"] > 0
        assert all(
            not r.overlaps(membacking.MemoryRange(0x100000, 0x110000))
            for r, _ in memory.mapped_ranges()
        )
        targets = [
            os.readlink(f"/proc/self/fd/{fd}")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        ]
        assert not [t for t in targets if "membacking:flip" in t]
        maps = Path("/proc/self/maps").read_text()
        assert "membacking:flip" not in maps
    assert client.stats()["removals"] == 40


def test_view_defers_the_unmap_ack_until_the_block_ends(manager: RunningManager) -> None:
    client = manager.client()
    client.add_region("dev", 0x10000000, 0x10000)
    done = threading.Event()
    with membacking.attach(manager.runtime_dir, name="viewer") as memory:
        memory.write_at(0x10000000, b"view")
        with memory.view(0x10000000, 4096) as view:
            assert bytes(view[:4]) == b"view"
            remover = threading.Thread(target=lambda: (client.remove_region("dev"), done.set()))
            remover.start()
            assert not done.wait(0.5)  # the mapper holds its ack while the view is open
            assert bytes(view[:4]) == b"view"  # and the memory is still there
            with pytest.raises(NoMappingError):  # new accesses no longer reach it
                memory.read_at(0x10000000, 4)
        assert done.wait(10)
        remover.join()
        assert view.__class__ is memoryview
        with pytest.raises(ValueError):
            view[0]  # released at the end of the block


def test_views_are_read_only_unless_asked_to_write(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir) as memory:
        with memory.view(0x5000, 8) as view:  # writable memory, but no write asked for
            assert view.readonly
            with pytest.raises(TypeError):
                view[:] = b"12345678"
        assert memory.read_at(0x5000, 8) == bytes(8)
        with memory.view(0x5000, 8, write=True) as view:
            assert not view.readonly
            view[:] = b"12345678"
        assert memory.read_at(0x5000, 8) == b"12345678"
        with memory.view(0xFFF00000, 8) as rom:
            assert rom.readonly
        with pytest.raises(ReadOnlyError), memory.view(0xFFF00000, 8, write=True):
            pass


def test_plain_values_and_buffers(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_plain(0x100, "<Q", 0x1122334455667788)
        assert memory.read_plain(0x100, "<Q") == 0x1122334455667788
        assert memory.read_at(0x100, 2) == b"\x88\x77"
        memory.write_plain(0x200, "<HH", (1, 2))
        assert memory.read_plain(0x200, "<HH") == (1, 2)
        buf = bytearray(16)
        memory.read_into(0x100, buf)
        assert buf[:8] == bytes.fromhex("8877665544332211")
        with pytest.raises(ValueError, match="invalid struct format"):
            memory.read_plain(0, "<Z")
        with pytest.raises(ValueError, match="must not be negative"):
            memory.read_at(-1, 4)
        with pytest.raises(TypeError):
            memory.read_at("0", 4)  # type: ignore[arg-type]
        with pytest.raises(membacking.OutOfRangeError, match="outside"):
            memory.read_at(0, 1 << 50)  # refused, not allocated


def test_manager_killed_mappers_keep_what_they_have(
    manager: RunningManager, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(manager, "survivor", "--reconnect", "0")  # not waiting for a successor
    worker.ask("write 0x0 cafe")
    manager.stop(signal.SIGKILL)
    time.sleep(0.3)
    assert worker.ask("read 0x0 2") == "cafe"  # mapped memory keeps working
    with pytest.raises(WorkerError, match="ManagerGoneError"):
        worker.ask("read 0xfff00000 1")  # a new fault cannot be served
    with pytest.raises(membacking.ManagerUnavailableError, match="no membacking manager"):
        membacking.attach(manager.runtime_dir)


def test_a_slice_that_outlives_its_view_keeps_the_memory_pinned(manager: RunningManager) -> None:
    """Slices of a view must not outlive the block, but one that does must never crash the
    process: the range stays pinned, so its Unmap is acknowledged only once the slice is gone."""
    client = manager.client()
    client.add_region("dev", 0x10000000, 0x10000)
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_at(0x10000000, b"kept")
        with memory.view(0x10000000, 4096) as view:
            leaked = view[0:16]
        result: dict[str, object] = {}
        remover = threading.Thread(target=lambda: result.update(client.remove_region("dev")))
        remover.start()
        time.sleep(0.5)
        assert remover.is_alive()  # the Unmap waits for the slice
        assert bytes(leaked[:4]) == b"kept"  # still the region's memory, no SIGSEGV
        del leaked
        remover.join(10)
        assert not remover.is_alive() and result["name"] == "dev"
        with pytest.raises(NoMappingError):
            memory.read_at(0x10000000, 4)
        with memory.view(0x1000, 64, write=True) as view:  # views that stay in their block
            view[:2] = b"ok"  # are let go
        assert memory.read_at(0x1000, 2) == b"ok"
        with memory.view(0x1000, 64) as view:
            past_detach = view[0:2]
    # detach left the address space in place for it (no SIGSEGV), but not the guest memory:
    # a detached mapper is no holder a removal waits for
    assert bytes(past_detach) == b"\0\0"


def test_detached_memory_refuses_access(manager: RunningManager) -> None:
    memory = membacking.attach(manager.runtime_dir)
    memory.write_at(0, b"x")
    memory.detach()
    memory.detach()  # idempotent
    with pytest.raises(GuestMemoryError, match="detached"):
        memory.read_at(0, 1)
    assert manager.client().mappers() == []


REMAP_UNDER_A_WRITABLE_VIEW = """
import sys, threading, time
import membacking
from membacking.control_client import ControlClient
client = ControlClient(sys.argv[1])
size, split = int(sys.argv[2]), sys.argv[3] == "split"
client.add_region("dev", 0x10000000, 0x10000)
with membacking.attach(sys.argv[1]) as mem:
    mem.write_at(0x10000000, b"old")
    with mem.view(0x10000000, 4096, write=True) as view:
        done = threading.Event()
        def replace():
            client.map_range("dev", 0, size, readonly=True)
            done.set()
        threading.Thread(target=replace, daemon=True).start()
        deadline = time.monotonic() + 10
        while mem.mapped_ranges()[0][1] and time.monotonic() < deadline:
            time.sleep(0.01)  # until the read-only backing is mapped under the open view
        view[0:4] = b"boom"  # must not fault
        if split:  # cut the private copy in two while the view is open
            client.unmap_range("dev", 0x1000, 0x1000)
    done.wait(10)
    assert done.is_set(), "the replacement did not complete"
    assert mem.read_at(0x10000000, 4) == bytes(4), "the view's writes outlived it"
print("survived")
"""


@pytest.mark.parametrize(("size", "split"), [(0x1000, "whole"), (0x2000, "split")])
def test_a_writable_view_survives_a_read_only_remap(
    manager: RunningManager, size: int, split: str
) -> None:
    """A range replaced by a read-only backing while a writable view of it is open: writes
    through the view go to a private copy (no SIGSEGV) and never reach the new backing, which
    replaces the copy once the view closes, also when part of it was unmapped meanwhile."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            REMAP_UNDER_A_WRITABLE_VIEW,
            str(manager.runtime_dir),
            str(size),
            split,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "survived"


@pytest.mark.parametrize("bad", [0, -1, -0.5, None, "30", True])
def test_timeouts_must_be_positive_numbers(bad: object) -> None:
    """A timeout that a lock would read as 'forever' (-1) or reject (None) is refused up front,
    before any connection is made."""
    for keyword in ("fault_timeout", "timeout"):
        with pytest.raises(membacking.MembackingError, match=f"{keyword} must be a positive"):
            membacking.attach("/nonexistent-runtime-dir", **{keyword: bad})  # type: ignore[arg-type]


def test_a_view_ending_after_detach_writes_to_no_reused_fd(
    manager: RunningManager, tmp_path: Path
) -> None:
    """A view whose range has an Unmap waiting when the mapper detaches: ending it afterwards
    must not wake the closed mapper thread through a pipe number another file has taken since."""
    from membacking.control_client import ControlClient

    memory = membacking.attach(manager.runtime_dir, name="late-view")
    mapper = memory._mapper
    memory.write_at(0x3000, b"abc")
    block = memory.view(0x3000, 4096)
    block.__enter__()
    client = ControlClient(manager.runtime_dir)
    unmapping = threading.Thread(target=lambda: client.unmap_range("ram0", 0x3000, 4096))
    unmapping.start()
    deadline = time.monotonic() + 10
    while not mapper._pending_unmaps and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mapper._pending_unmaps  # the Unmap waits for the view
    old_wake = mapper._wake_w
    memory.detach()
    unmapping.join(10)
    files = []
    try:
        for i in range(64):  # until a new file has the pipe's old number
            files.append(open(tmp_path / f"victim{i}", "wb"))  # noqa: SIM115
            if files[-1].fileno() == old_wake:
                break
        block.__exit__(None, None, None)
        for f in files:
            f.close()
        assert all(not (tmp_path / f"victim{i}").read_bytes() for i in range(len(files)))
    finally:
        for f in files:
            f.close()
