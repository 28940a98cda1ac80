"""The region manager, eager mappers and backings with a real daemon and real mapper processes."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import membacking
from membacking import ControlError, MembackingError
from membacking.manager.backing import hugepage_size

from conftest import RunningManager, Worker, WorkerError

MiB = 1 << 20
Spawn = Callable[..., Worker]
Start = Callable[..., RunningManager]


def mapped(worker: Worker) -> list[str]:
    answer = worker.ask("mapped")
    return answer.split(",") if answer else []


def test_eager_replay_on_attach_and_push_on_add(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "a=0:1M", "--region", "b=0x200000:1M")
    eager = spawn_worker(running, "eager", "--eager")
    lazy = spawn_worker(running, "lazy")
    assert mapped(eager) == ["0x0-0x100000", "0x200000-0x300000"]  # replayed at attach
    assert mapped(lazy) == []
    client = running.client()
    added = client.add_region("c", 0x400000, MiB)
    assert added["holders"] == [eager.mapper_id]  # the add returned after the eager MapAck
    assert mapped(eager)[-1] == "0x400000-0x500000"
    assert mapped(lazy) == []
    assert {p["name"]: p["mode"] for p in client.mappers()} == {"eager": "eager", "lazy": "lazy"}
    # an eager mapper has nothing to wait for: an unbacked access fails at once, without
    # asking the manager
    faults = client.stats()["faults"]
    with pytest.raises(WorkerError, match=r"NoMappingError .*eager mapper"):
        eager.ask("read 0x800000 1")
    assert client.stats()["faults"] == faults


def test_eager_replay_larger_than_the_fd_socket_buffer(start_manager: Start) -> None:
    """Every MapEager of a replay brings its fd on the fd socket, more than the socket buffer
    holds: the daemon keeps the rest back without blocking, and every region arrives."""
    count = 1000
    running = start_manager("--region", "ram=0:1M")
    client = running.client()
    for i in range(1, count):
        client.add_region(f"r{i}", i * MiB, 64 << 10)
    with membacking.attach(running.runtime_dir, name="writer") as writer:
        for i in range(count):
            writer.write_at(i * MiB, f"region {i}".encode())
    with membacking.attach(running.runtime_dir, name="eager", eager=True) as eager:
        assert len(eager.mapped_ranges()) == count
        for i in range(count):
            assert eager.read_at(i * MiB, 12).rstrip(b"\0") == f"region {i}".encode()
    assert client.stats()["fds_sent"] == 2 * count


def test_eager_failure_rolls_back(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "a=0:1M")
    good = spawn_worker(running, "good", "--eager")
    bad = spawn_worker(running, "bad", "--eager")
    bad.ask("nofile 0")  # the next fd sent to it cannot be received
    with pytest.raises(ControlError) as failed:
        running.client().add_region("x", 0x400000, MiB)
    assert failed.value.code == "map-failed"
    assert f"mapper {bad.mapper_id} (bad)" in str(failed.value)
    assert mapped(good) == ["0x0-0x100000"]  # rolled back: x is gone from the good one too
    assert mapped(bad) == ["0x0-0x100000"]
    assert [r["name"] for r in running.client().regions()] == ["a"]
    assert running.client().stats()["rollbacks"] == 1


def test_fd_dropped_at_the_open_file_limit_comes_again_once_there_is_room(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """The kernel drops an fd sent to a process at its open-file limit: the access fails and
    says why, and once the process has room the next access gets the fd (ResendFd), instead of
    waiting for one the manager believes it sent."""
    running = start_manager("--region", "a=0:1M")
    worker = spawn_worker(running, "w")
    worker.ask("nofile 0")
    with pytest.raises(WorkerError, match="dropped on arrival: this process is at its open-file"):
        worker.ask("read 0x0 1")
    worker.ask("nofile 16")
    worker.ask("write 0x10 " + b"back".hex())
    assert bytes.fromhex(worker.ask("read 0x10 4")) == b"back"
    assert mapped(worker) == ["0x0-0x100000"]
    # the dropped one, and once more after the limit was raised, whichever of the grant and its
    # Map the mapper read first (the grant often overtakes the Map)
    assert running.client().stats()["fds_sent"] == 2


def test_upgrade_to_eager_in_place(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "a=0:1M", "--region", "b=0x200000:1M")
    worker = spawn_worker(running, "w")
    worker.ask("read 0x0 1")
    assert mapped(worker) == ["0x0-0x100000"]
    worker.ask("eager")
    assert mapped(worker) == ["0x0-0x100000", "0x200000-0x300000"]
    running.client().add_region("c", 0x400000, MiB)
    assert mapped(worker)[-1] == "0x400000-0x500000"


def test_failed_upgrade_stays_lazy(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "a=0:1M", "--region", "b=0x200000:1M")
    worker = spawn_worker(running, "w")
    worker.ask("read 0x0 1")
    worker.ask("nofile 0")
    with pytest.raises(WorkerError, match="could not become eager"):
        worker.ask("eager")
    assert mapped(worker) == ["0x0-0x100000"]
    assert running.client().mappers()[0]["mode"] == "lazy"


def test_disable_shows_the_region_beneath_with_its_contents(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    running = start_manager()
    client = running.client()
    client.add_region("flash", 0, 4 * MiB, priority=1)
    client.add_region("low", MiB, MiB, priority=0)
    worker = spawn_worker(running, "w")
    worker.ask(f"write {MiB:#x} " + b"FLASH".hex())
    client.disable_region("flash")
    assert worker.ask(f"read {MiB:#x} 5") == "0000000000"  # low's (zero) memory shows through
    worker.ask(f"write {MiB:#x} " + b"LOW".hex())
    with pytest.raises(WorkerError, match="NoMappingError no region backs GPA 0x0"):
        worker.ask("read 0x0 1")  # only low is visible now
    client.enable_region("flash")
    assert bytes.fromhex(worker.ask(f"read {MiB:#x} 5")) == b"FLASH"
    client.disable_region("flash")
    assert bytes.fromhex(worker.ask(f"read {MiB:#x} 3")) == b"LOW"
    with pytest.raises(ControlError, match="must lie inside"):
        client.add_region("bad", 3 * MiB, 2 * MiB, priority=0)


def test_move_keeps_contents(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "ram=0:1M")
    client = running.client()
    client.add_region("bar", 0x10000000, 0x10000, disabled=True)
    worker = spawn_worker(running, "w")
    with pytest.raises(WorkerError, match="NoMappingError"):
        worker.ask("read 0x10000000 1")
    client.enable_region("bar")
    worker.ask("write 0x10000000 " + b"bar!".hex())
    client.move_region("bar", 0x20000000)
    assert bytes.fromhex(worker.ask("read 0x20000000 4")) == b"bar!"
    with pytest.raises(WorkerError, match="NoMappingError no region backs GPA 0x10000000"):
        worker.ask("read 0x10000000 1")
    assert not [r for r in mapped(worker) if r.startswith("0x10000000")]


def test_partial_unmap_and_atomic_replace_under_readers(
    start_manager: Start, tmp_path: Path
) -> None:
    running = start_manager("--region", "ram=0:16M")
    client = running.client()
    new_content = tmp_path / "new.bin"
    new_content.write_bytes(b"N" * MiB)
    failures: list[str] = []
    seen: set[bytes] = set()
    stop = threading.Event()
    with membacking.attach(running.runtime_dir, name="readers") as memory:
        memory.fill_at(0, ord("O"), 16 * MiB)

        def read_loop(gpa: int) -> None:
            while not stop.is_set():
                try:
                    seen.add(memory.read_at(gpa, 4))
                except MembackingError as exc:
                    failures.append(f"{gpa:#x}: {exc}")

        threads = [
            threading.Thread(target=read_loop, args=(gpa,))
            for gpa in (4 * MiB, 4 * MiB + 0x1234, 5 * MiB - 4, 8 * MiB)
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.1)
            result = client.map_range("ram", 4 * MiB, MiB, file=new_content)
            time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert failures == []  # never a hole
        assert seen == {b"OOOO", b"NNNN"}
        assert memory.read_at(4 * MiB - 2, 4) == b"OONN"
        assert [(m["offset"], m["size"]) for m in result["mappings"]] == [
            (0, 4 * MiB),
            (4 * MiB, MiB),
            (5 * MiB, 11 * MiB),
        ]
        # the pieces on either side keep their memory; a partial unmap leaves a hole
        client.unmap_range("ram", 8 * MiB, MiB)
        with pytest.raises(membacking.NoMappingError, match="GPA 0x800000"):
            memory.read_at(8 * MiB, 1)
        assert memory.read_at(9 * MiB, 2) == b"OO" and memory.read_at(5 * MiB, 1) == b"O"
        assert memory.read_at(4 * MiB, 1) == b"N"


def test_file_backing_survives_the_daemon(start_manager: Start, tmp_path: Path) -> None:
    path = tmp_path / "guest.img"
    running = start_manager()
    running.client().add_region("disk", 0, 2 * MiB, file=path)  # created, sized
    assert path.stat().st_size == 2 * MiB
    with membacking.attach(running.runtime_dir) as memory:
        memory.write_at(0x1000, b"persist")
    running.stop()
    assert path.read_bytes()[0x1000:0x1007] == b"persist"
    again = start_manager()
    again.client().add_region("disk", 0, 2 * MiB, file=path)
    with membacking.attach(again.runtime_dir) as memory:
        assert memory.read_at(0x1000, 7) == b"persist"
    short = tmp_path / "short.img"
    short.write_bytes(b"x" * 4096)
    with pytest.raises(ControlError, match=r"short.img is 4096 bytes; region s needs 8192"):
        again.client().add_region("s", 0x400000, 8192, file=short)
    with pytest.raises(ControlError, match="is not a regular file"):
        again.client().add_region("d", 0x400000, 4096, file=tmp_path)
    with pytest.raises(ControlError, match="read-only region needs an existing file"):
        again.client().add_region("r", 0x400000, 4096, file=tmp_path / "nope", readonly=True)


def test_hugetlb_without_a_pool_fails_at_creation(manager: RunningManager) -> None:
    with pytest.raises(ControlError) as err:
        manager.client().add_region("huge", 0x40000000, 2 * hugepage_size(), hugetlb=True)
    free = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("HugePages_Free")
        )
    )
    if free >= 2:
        pytest.skip("this machine has a hugetlb pool; the refusal cannot be provoked")
    assert err.value.code == "no-memory"
    assert "not enough huge pages for huge: it needs 2 pages" in str(err.value)
    assert [r["name"] for r in manager.client().regions()] == ["ram0", "rom"]
    with pytest.raises(ControlError, match="multiple of the 2 MiB huge page size"):
        manager.client().add_region("odd", 0x40000000, MiB, hugetlb=True)


def test_hugetlb_region_works_where_a_pool_exists(manager: RunningManager) -> None:
    free = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("HugePages_Free")
        )
    )
    if free < 1:
        pytest.skip("no hugetlb pool on this machine (HugePages_Free is 0)")
    manager.client().add_region("huge", 0x40000000, hugepage_size(), hugetlb=True)
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_at(0x40000000, b"huge")
        assert memory.read_at(0x40000000, 4) == b"huge"


def test_read_only_is_enforced_by_the_kernel(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir) as memory:
        shared = memory.sharing()
        assert shared is not None
        by_gpa = {s.gpa: s for s in shared}
        rom, ram = by_gpa[0xFFF00000], by_gpa[0]
        try:
            assert not rom.writable and ram.writable
            with pytest.raises(PermissionError):  # the fd is O_RDONLY: no writable mapping
                mmap.mmap(
                    rom.fd, rom.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            with pytest.raises(OSError):
                os.write(rom.fd, b"x")
            readable = mmap.mmap(rom.fd, rom.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            readable.close()
            # a third party (vhost-user backend, DMA engine) sees the same RAM
            third = mmap.mmap(
                ram.fd,
                ram.size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=ram.file_offset,
            )
            third[0x40:0x45] = b"third"
            assert memory.read_at(0x40, 5) == b"third"
            third.close()
        finally:
            for s in shared:
                os.close(s.fd)


def test_sharing_named_regions_maps_and_holds_only_those(manager: RunningManager) -> None:
    """`sharing(["ram0"])` lends (and so maps and holds) ram0 alone: a launcher that lends one
    region holds no other, so a removal of another never waits for it (nor evicts it)."""
    with membacking.attach(manager.runtime_dir, name="lender") as memory:
        shared = memory.sharing(["ram0"])
        assert shared is not None
        try:
            assert [(s.gpa, s.size) for s in shared] == [(0, 64 * MiB)]
            assert [r.start for r, _ in memory.mapped_ranges()] == [0]
            [me] = manager.client().mappers()
            assert me["held"] == [[0, 64 * MiB]]
            assert manager.client().remove_region("rom")["unmapped_from"] == []
        finally:
            for s in shared:
                os.close(s.fd)


def test_private_ram_single_mapper(start_manager: Start) -> None:
    running = start_manager()
    with membacking.attach(running.runtime_dir, name="vm") as memory:
        running.client().add_region("ram", 0, 4 * MiB, private=True)
        assert memory.sharing() is None
        memory.write_at(0x1000, b"private")
        assert memory.read_at(0x1000, 7) == b"private"
        memory.decommit(0, 2 * 4096)
        assert memory.read_at(0x1000, 7) == bytes(7)  # decommitted pages read back as zero
        memory.commit(0, 4 * MiB)
        memory.commit(0, 4 * MiB)  # idempotent
        memory.write_at(0x2000, b"again")
        assert memory.read_at(0x2000, 5) == b"again"
        advice = memory.madvise_hugepage(0, 4 * MiB)
        assert isinstance(advice, bool)
        assert running.client().mappers()[0]["mode"] == "private"
        with pytest.raises(MembackingError, match="only one mapper"):
            membacking.attach(running.runtime_dir, name="second")
        assert "membacking" not in "".join(
            line
            for line in Path("/proc/self/maps").read_text().splitlines()
            if line.startswith(f"{memory._mapper.reservation.base:x}")
        )


def test_guest_memory_is_kept_out_of_core_dumps(
    manager: RunningManager, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(manager, "w")
    worker.ask("read 0x0 1")
    smaps = Path(f"/proc/{worker.pid}/smaps").read_text().split("\n")
    header = next(
        i
        for i, line in enumerate(smaps)
        if any(word.endswith("membacking:ram0") for word in line.split())
    )
    flags = next(line for line in smaps[header:] if line.startswith("VmFlags:"))
    assert " dd" in flags  # MADV_DONTDUMP


def test_the_listing_gathers_every_page(start_manager: Start) -> None:
    """The manager lists regions and a region's pieces a page at a time; ControlClient.regions()
    puts every page together, in address order, each region with all its pieces."""
    running = start_manager("--region", "holes=0:4M")
    client = running.client()
    for i in range(300):
        client.add_region(f"r{i}", (1 << 30) - (i + 1) * MiB, 64 << 10)
    for i in range(300):
        reply = client.unmap_range("holes", (2 * i + 1) * 4096, 4096)
    assert reply["pieces"] == 301 and len(reply["mappings"]) == 2  # around the change only
    regions = client.regions()
    assert [r["name"] for r in regions] == ["holes"] + [f"r{i}" for i in reversed(range(300))]
    holes = regions[0]
    assert holes["pieces"] == 301
    assert [p["offset"] // 4096 for p in holes["mappings"]] == [0, *range(2, 601, 2)]
    assert all(len(r["mappings"]) == 1 for r in regions[1:])
    with membacking.attach(running.runtime_dir, name="reader") as memory:
        for piece in holes["mappings"]:
            memory.read_at(piece["offset"], 1)
        (mapper,) = client.mappers()
        assert mapper["ranges"] == 301 and mapper["bytes"] == 4 * MiB - 300 * 4096
        assert [r[0] for r in mapper["held"]] == [p["offset"] for p in holes["mappings"]]
