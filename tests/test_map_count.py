"""A mapper keeps its VMAs below vm.max_map_count with headroom: the bound its chunk table keeps
(checked against the kernel's own count of a real reservation's pieces), and a fault past the
budget failing cleanly in a live mapper that stays healthy."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable

import pytest

from membacking.ffi import Reservation
from membacking.mapper import chunks as chunks_module
from membacking.mapper.chunks import (
    ENV_MAP_HEADROOM,
    ENV_MAX_MAP_COUNT,
    REPORT_EVERY,
    Chunk,
    ChunkTable,
    MapCountBudget,
    vma_bound,
)
from membacking.protocol.ranges import PAGE_SIZE, MemoryRange

from conftest import RunningManager, Worker, WorkerError

Spawn = Callable[..., Worker]
Start = Callable[..., RunningManager]


def vmas_in(reservation: Reservation, size: int) -> int:
    """The kernel's VMAs inside the reservation (a line each in /proc/self/maps)."""
    base = reservation.base
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start < base + size and base < end:
                count += 1
    return count


@pytest.mark.parametrize("seed", range(4))
def test_the_bound_covers_what_the_kernel_counts(seed: int) -> None:
    """Map and unmap random chunks (memfd and anonymous, read-only and writable, adjacent and
    not) the way the mapper does, and compare with the kernel's count after every step."""
    rnd = random.Random(seed)
    pages = 256
    size = pages * PAGE_SIZE
    reservation = Reservation(size)
    table = ChunkTable()
    fd = os.memfd_create("map-count-test")
    os.ftruncate(fd, size)
    try:
        for _ in range(300):
            first = rnd.randrange(pages)
            rng = MemoryRange(first * PAGE_SIZE, min(pages, first + rnd.randint(1, 8)) * PAGE_SIZE)
            if rnd.random() < 0.3:  # an Unmap
                table.cut(rng)
                reservation.unmap(rng.start, rng.len)
            else:  # a Map
                writable = rnd.random() < 0.5
                table.cut(rng)
                if rnd.random() < 0.5:
                    reservation.map_fd(rng.start, rng.len, fd, rng.start, writable)
                    table.insert(rng, Chunk(1, rng.start, writable))
                else:
                    reservation.map_anon(rng.start, rng.len, writable)
                    table.insert(rng, Chunk(0, 0, writable))
            assert vmas_in(reservation, size) <= vma_bound(len(table))
        assert len(table) > 10  # the pattern did fragment the reservation
    finally:
        os.close(fd)
        reservation.release()


def test_the_budget_refuses_only_what_would_go_past_it() -> None:
    budget = MapCountBudget(limit=100, headroom=79)  # 21 VMAs: 10 chunks
    table = ChunkTable()
    for i in range(10):
        rng = MemoryRange(i * 2 * PAGE_SIZE, (i * 2 + 1) * PAGE_SIZE)
        assert budget.refuses(table, rng) is None
        table.insert(rng, Chunk(1, 0, True))
    why = budget.refuses(table, MemoryRange(40 * PAGE_SIZE, 41 * PAGE_SIZE))
    assert why is not None
    assert "vm.max_map_count (100)" in why and "23 VMAs" in why and "79" in why
    # replacing a chunk exactly, or a range covering two, adds nothing
    assert budget.refuses(table, MemoryRange(0, PAGE_SIZE)) is None
    assert budget.refuses(table, MemoryRange(0, 3 * PAGE_SIZE)) is None
    # a new chunk punching a hole in a wider one splits it: two more chunks, not one
    table = ChunkTable()
    for i in range(8):
        table.insert(MemoryRange(i * 2 * PAGE_SIZE, (i * 2 + 1) * PAGE_SIZE), Chunk(1, 0, True))
    table.insert(MemoryRange(60 * PAGE_SIZE, 64 * PAGE_SIZE), Chunk(1, 0, True))  # 9 chunks
    assert budget.refuses(table, MemoryRange(40 * PAGE_SIZE, 41 * PAGE_SIZE)) is None  # 10
    assert budget.refuses(table, MemoryRange(61 * PAGE_SIZE, 62 * PAGE_SIZE)) is not None  # 11


def test_refused_maps_are_logged_a_line_a_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A huge access past the budget is refused a Map at a time: the first refusal is logged,
    then a line a second at most, counting the refusals it did not log (one line each made
    26,000 lines of one access)."""
    budget = MapCountBudget(limit=100, headroom=79)
    log = logging.getLogger("membacking.test.budget")
    now = [1000.0]
    monkeypatch.setattr(chunks_module.time, "monotonic", lambda: now[0])
    rng = MemoryRange(0, PAGE_SIZE)
    with caplog.at_level(logging.ERROR, logger=log.name):
        for _ in range(500):
            budget.report(log, 7, rng, "past the budget")
        now[0] += REPORT_EVERY
        budget.report(log, 7, rng, "past the budget")
        now[0] += REPORT_EVERY / 2
        budget.report(log, 7, rng, "past the budget")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"mapper 7: cannot map {rng}: past the budget",
        f"mapper 7: cannot map {rng}: past the budget (499 more Maps refused since the last "
        "report)",
    ]


def test_environment_overrides_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MAX_MAP_COUNT, "1000")
    monkeypatch.setenv(ENV_MAP_HEADROOM, "100")
    budget = MapCountBudget.from_environment()
    assert (budget.limit, budget.headroom, budget.allowed) == (1000, 100, 900)
    monkeypatch.delenv(ENV_MAX_MAP_COUNT)
    monkeypatch.delenv(ENV_MAP_HEADROOM)
    budget = MapCountBudget.from_environment()
    with open("/proc/sys/vm/max_map_count") as f:
        assert budget.limit == int(f.read())
    assert budget.headroom > 4096  # the default, plus what this process has mapped already


def test_a_fault_past_the_budget_fails_and_the_mapper_stays_healthy(
    start_manager: Start, spawn_worker: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 separate one-page regions; a mapper allowed 21 VMAs (10 chunks) maps 10 of them, the
    11th fault fails naming the limit, and everything else keeps working: what is mapped, new
    allocations, and faults again once an Unmap made room."""
    running = start_manager()
    client = running.client()
    gpas = [0x100000 + i * 0x10000 for i in range(24)]
    for i, gpa in enumerate(gpas):
        client.add_region(f"r{i}", gpa, PAGE_SIZE)
    monkeypatch.setenv(ENV_MAX_MAP_COUNT, "100")
    monkeypatch.setenv(ENV_MAP_HEADROOM, "79")
    worker = spawn_worker(running, "fragmented")
    for i, gpa in enumerate(gpas[:10]):
        worker.ask(f"write {gpa:#x} {i:02x}")
    with pytest.raises(WorkerError) as refused:
        worker.ask(f"write {gpas[10]:#x} ff")
    text = str(refused.value)
    assert text.startswith("GuestMemoryError") and "vm.max_map_count (100)" in text
    assert "23 VMAs" in text
    # healthy: what is mapped still reads, a large allocation works, it still answers
    for i, gpa in enumerate(gpas[:10]):
        assert worker.ask(f"read {gpa:#x} 1") == f"{i:02x}"
    assert len(worker.ask(f"read {gpas[0]:#x} 4096")) == 8192
    # an Unmap frees a chunk: the refused fault then succeeds
    client.remove_region("r0")
    worker.ask(f"write {gpas[10]:#x} ff")
    assert worker.ask(f"read {gpas[10]:#x} 1") == "ff"
    assert worker.proc.poll() is None
