"""The membacking side of each benchmark: accesses, views, plain values, faults, removals held
by N mappers, parallel faulting, faults among 10,000 regions, unmap_range in a region with
10,000 holes, and the manager's memory. Most are probes (one operation per call) that the
runner measures in turn with their baselines.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator

from ..mapper import attach
from .baselines import best_of
from .procs import Manager, Mapper, cpu_seconds, manager, rss
from .thin import ThinMapper
from .turns import Removal, timed

MiB = 1 << 20
#: regions used to measure faults start here, 2 MiB apart
PROBE_BASE = 1 << 32
PROBE_STEP = 2 * MiB


@contextlib.contextmanager
def bulk(size: int) -> Iterator[tuple[dict[str, Callable[[], float]], int, bytearray]]:
    """Probes: read_into, write_at and view+copy of `size` bytes of mapped guest memory; the fd
    of that memory (from `sharing()`) and the buffer the probes copy to and from, so that the
    baseline copies the very same pages into the very same buffer."""
    with manager("--region", f"ram0=0:{size}") as mgr, attach(mgr.dir, name="bench") as memory:
        memory.fill_at(0, 1, size)
        shared = memory.sharing()
        assert shared is not None and len(shared) == 1 and shared[0].size == size
        buf = bytearray(size)
        dst = memoryview(buf)

        def through_view() -> None:
            with memory.view(0, size) as view:
                dst[:] = view

        try:
            probes = {
                "read_into": timed(lambda: memory.read_into(0, buf)),
                "write_at": timed(lambda: memory.write_at(0, buf)),
                "view": timed(through_view),
            }
            yield probes, shared[0].fd, buf
        finally:
            dst.release()
            os.close(shared[0].fd)


def plain(number: int) -> tuple[float, float]:
    """Seconds per read_plain / write_plain of 8 bytes."""
    with manager("--region", "ram0=0:1M") as mgr, attach(mgr.dir, name="bench") as memory:
        memory.write_plain(0x100, "<Q", 1)
        read = best_of(lambda: memory.read_plain(0x100, "<Q"), 5, number)
        write = best_of(lambda: memory.write_plain(0x100, "<Q", 7), 5, number)
        return read, write


def _add_probes(mgr: Manager, count: int, prefix: str = "p") -> list[int]:
    gpas = []
    for i in range(count):
        gpa = PROBE_BASE + i * PROBE_STEP
        mgr.client.add_region(f"{prefix}{i}", gpa, 4096)
        gpas.append(gpa)
    return gpas


@contextlib.contextmanager
def _reader(mgr: Manager, thin: bool) -> Iterator[Callable[[int], object]]:
    """A function reading 8 bytes at a GPA through a new mapper: membacking's own, or a thin
    one (one byte: it reads nothing wider) with `thin`."""
    if thin:
        with ThinMapper(mgr.dir, "bench") as mapper:
            yield mapper.read_at
    else:
        with attach(mgr.dir, name="bench") as memory:
            yield lambda gpa: memory.read_at(gpa, 8)


@contextlib.contextmanager
def first_faults(count: int, thin: bool = False, regions: int = 0) -> Iterator[Callable[[], float]]:
    """A probe (`count` calls at most): a first access to a region never touched (request, fd,
    mmap, access), by membacking's mapper or (`thin`) the thin one. With `regions`, the manager
    holds that many regions in all (fillers besides ram0 and the faulted ones)."""
    args = ["--region", "ram0=0:1M", "--max-regions", str(max(regions, count + 1) + 10)]
    with manager(*args) as mgr:
        for i in range(regions - count - 1):
            mgr.client.add_region(f"f{i}", 4 * MiB + i * 2 * 4096, 4096)
        gpas = iter(_add_probes(mgr, count))
        with _reader(mgr, thin) as read:
            read(0)  # attached and warm: the first probe is no different
            yield timed(lambda: read(next(gpas)))


@contextlib.contextmanager
def held_faults(count: int, thin: bool = False) -> Iterator[Callable[[], float]]:
    """A probe: a fault on a region whose fd the mapper already holds. Each probe takes the next
    of `count` pairs of regions, disables and enables both (so the mapper must fault them back
    in but keeps their fds), faults the first in untimed and times the second: the path has
    just run, as in the floor's and the baseline's warm probes."""
    with manager("--region", "ram0=0:1M", "--max-regions", str(2 * count + 10)) as mgr:
        gpas = _add_probes(mgr, 2 * count)
        with _reader(mgr, thin) as read:
            for gpa in gpas:
                read(gpa)
            pairs = itertools.cycle(range(0, 2 * count, 2))

            def probe() -> float:
                i = next(pairs)
                for name in (f"p{i}", f"p{i + 1}"):
                    mgr.client.disable_region(name)
                    mgr.client.enable_region(name)
                read(gpas[i])
                started = time.perf_counter()
                read(gpas[i + 1])
                return time.perf_counter() - started

            yield probe


@contextlib.contextmanager
def removals(holders: int, thin: bool = False) -> Iterator[Callable[[], Removal]]:
    """A probe: add a region, have each of `holders` mapper processes (membacking's, or thin
    ones with `thin`) touch it, then remove it; timed by the manager itself, from the request
    to the last ack."""
    with manager("--region", "ram0=0:1M") as mgr, contextlib.ExitStack() as stack:
        mappers = []
        for i in range(holders):
            mappers.append(Mapper(mgr.dir, f"m{i}", thin))
            stack.callback(mappers[-1].close)
        pids = [mapper.pid for mapper in mappers]
        # The manager's own sum of removal times, read after each removal: each difference is
        # that removal's time. It is not read just before a removal, so the holders go straight
        # from their touch to it.
        total_us = [mgr.client.stats()["invalidation_us_total"]]

        def probe() -> Removal:
            mgr.client.add_region("victim", PROBE_BASE, 4096)
            for mapper in mappers:
                mapper.call("touch", [PROBE_BASE])
            before = cpu_seconds(pids), cpu_seconds([mgr.pid])
            started = time.perf_counter()
            result = mgr.client.remove_region("victim")
            seen = time.perf_counter() - started
            holder_cpu = (cpu_seconds(pids) - before[0]) / holders
            manager_cpu = cpu_seconds([mgr.pid]) - before[1]
            assert len(result["unmapped_from"]) == holders
            last, total_us[0] = total_us[0], mgr.client.stats()["invalidation_us_total"]
            return Removal((total_us[0] - last) / 1e6, holder_cpu, manager_cpu, seen)

        yield probe


@contextlib.contextmanager
def unmap_ranges(holes: int, count: int) -> Iterator[Callable[[], float]]:
    """A probe (`count` calls at most): an `unmap_range` of one page of a region that has
    `holes` one-page holes already, held whole by a mapper process (so the reply waits for its
    Unmap's ack); timed as the control client sees it. With fewer holes than probes each probe
    cuts into a region of its own, so every one finds exactly `holes`; otherwise all cut into
    one region (which ends with `holes` + `count` holes)."""
    own = holes < count
    regions = count if own else 1
    pages = 2 * (holes + count) + 2
    span = -(-pages * 4096 // PROBE_STEP) * PROBE_STEP
    with manager("--region", "ram0=0:1M", "--max-regions", str(regions + 10)) as mgr:
        holder = Mapper(mgr.dir, "holder")
        try:
            for r in range(regions):
                gpa = PROBE_BASE + r * span
                mgr.client.add_region(f"h{r}", gpa, pages * 4096)
                holder.call("touch", [gpa])  # one Map of the whole region: it holds every piece
                for i in range(holes):
                    mgr.client.unmap_range(f"h{r}", (2 * i + 1) * 4096, 4096)
            probes = itertools.count()

            def probe() -> float:
                i = next(probes)
                name, hole = (f"h{i}", holes) if own else ("h0", holes + i)
                started = time.perf_counter()
                mgr.client.unmap_range(name, (2 * hole + 1) * 4096, 4096)
                return time.perf_counter() - started

            yield probe
        finally:
            holder.close()


def parallel_faults(mappers: int, per_mapper: int, thin: bool = False) -> tuple[float, float]:
    """Faults served per second with `mappers` processes (membacking's mappers, or thin ones
    with `thin`) each faulting distinct regions, and the CPU seconds each fault cost (the
    mapper processes' and the manager's)."""
    with manager("--region", "ram0=0:1M") as mgr:
        gpas = _add_probes(mgr, mappers * per_mapper)
        procs = [Mapper(mgr.dir, f"m{i}", thin) for i in range(mappers)]
        pids = [mgr.pid, *(proc.pid for proc in procs)]
        try:
            for proc in procs:  # untimed: a new mapper is journaled before its first Map
                proc.call("touch", [0])
            cpu_before = cpu_seconds(pids)
            started = time.perf_counter()
            for i, proc in enumerate(procs):
                proc.send("fault_many", gpas[i * per_mapper : (i + 1) * per_mapper])
            for proc in procs:
                status, _ = proc.call_raw(300)
                assert status == "ok"
            elapsed = time.perf_counter() - started
            faults = mappers * per_mapper
            return faults / elapsed, (cpu_seconds(pids) - cpu_before) / faults
        finally:
            for proc in procs:
                proc.close()


def manager_memory(regions: int, mappers: int) -> dict[str, float]:
    """Manager RSS growth per region and per attached mapper (bytes)."""
    with manager("--region", "ram0=0:1M", "--max-regions", str(regions + 10)) as mgr:
        mgr.client.stats()
        time.sleep(0.2)
        base = rss(mgr.pid)
        for i in range(regions):
            mgr.client.add_region(f"r{i}", 4 * MiB + i * 2 * 4096, 4096)
        with_regions = rss(mgr.pid)
        procs = [Mapper(mgr.dir, f"m{i}") for i in range(mappers)]
        try:
            for proc in procs:
                proc.call("touch", [0])
            with_mappers = rss(mgr.pid)
        finally:
            for proc in procs:
                proc.close()
        return {
            "base_rss": float(base),
            "per_region": (with_regions - base) / regions,
            "per_mapper": (with_mappers - with_regions) / mappers,
        }
