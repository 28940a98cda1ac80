"""The membacking side of each benchmark: accesses, views, plain values, faults, removals held
by N mappers, parallel faulting, faults among 10,000 regions, and the manager's memory.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..mapper import attach
from .baselines import best_of
from .procs import Manager, Mapper, cpu_seconds, manager, rss

MiB = 1 << 20
#: regions used to measure faults start here, 2 MiB apart
PROBE_BASE = 1 << 32
PROBE_STEP = 2 * MiB


def bulk(size: int, repeat: int) -> dict[str, float]:
    """Seconds for read_into, write_at and view+copy of `size` bytes of mapped guest memory."""
    with manager("--region", f"ram0=0:{size}") as mgr, attach(mgr.dir, name="bench") as memory:
        memory.fill_at(0, 1, size)
        buf = bytearray(size)
        dst = memoryview(buf)

        def through_view() -> None:
            with memory.view(0, size) as view:
                dst[:] = view

        out = {
            "read_into": best_of(lambda: memory.read_into(0, buf), repeat),
            "write_at": best_of(lambda: memory.write_at(0, buf), repeat),
            "view": best_of(through_view, repeat),
        }
        dst.release()
        return out


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


def _median_first_access(mgr: Manager, gpas: list[int]) -> float:
    """Median seconds of an 8-byte read at each of `gpas`, by one new mapper."""
    with attach(mgr.dir, name="bench") as memory:
        memory.read_at(0, 1)  # attached and warm: the first probe is no different
        samples = []
        for gpa in gpas:
            started = time.perf_counter()
            memory.read_at(gpa, 8)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def first_fault(count: int) -> float:
    """Median seconds of a first access to a region never touched (request, fd, mmap, access)."""
    with manager("--region", "ram0=0:1M") as mgr:
        gpas = _add_probes(mgr, count)
        return _median_first_access(mgr, gpas)


def fault_with_fd(count: int) -> float:
    """Median seconds of a fault on a region whose fd the mapper already holds (the region was
    disabled and enabled again, so the mapper must fault it back in but keeps the fd)."""
    with manager("--region", "ram0=0:1M") as mgr:
        gpas = _add_probes(mgr, count)
        with attach(mgr.dir, name="bench") as memory:
            for gpa in gpas:
                memory.read_at(gpa, 1)
            samples = []
            for i, gpa in enumerate(gpas):
                mgr.client.disable_region(f"p{i}")
                mgr.client.enable_region(f"p{i}")
                started = time.perf_counter()
                memory.read_at(gpa, 8)
                samples.append(time.perf_counter() - started)
        return statistics.median(samples)


@dataclass
class Removal:
    """A region removed while `holders` mapper processes hold it, over several rounds."""

    client_seen: float  #: median seconds, as the control client sees the removal
    inside: float  #: mean seconds inside the manager, from the Unmaps to the last ack
    mapper_cpu: float  #: mean CPU seconds per holder (every thread of its process)
    manager_cpu: float  #: mean CPU seconds of the manager (control request and reply included)


def removal(holders: int, rounds: int) -> Removal:
    """Remove a region held by `holders` mapper processes, acks included, `rounds` times."""
    with manager("--region", "ram0=0:1M") as mgr:
        mappers = [Mapper(mgr.dir, f"m{i}") for i in range(holders)]
        pids = [mapper.pid for mapper in mappers]
        try:
            samples = []
            inside = mapper_cpu = manager_cpu = 0.0
            for _ in range(rounds):
                mgr.client.add_region("victim", PROBE_BASE, 4096)
                for mapper in mappers:
                    mapper.call("touch", [PROBE_BASE])
                before = mgr.client.stats()["invalidation_us_total"]
                cpu_before = cpu_seconds(pids), cpu_seconds([mgr.pid])
                started = time.perf_counter()
                result = mgr.client.remove_region("victim")
                samples.append(time.perf_counter() - started)
                mapper_cpu += cpu_seconds(pids) - cpu_before[0]
                manager_cpu += cpu_seconds([mgr.pid]) - cpu_before[1]
                inside += (mgr.client.stats()["invalidation_us_total"] - before) / 1e6
                assert len(result["unmapped_from"]) == holders
            return Removal(
                statistics.median(samples),
                inside / rounds,
                mapper_cpu / rounds / holders,
                manager_cpu / rounds,
            )
        finally:
            for mapper in mappers:
                mapper.close()


def parallel_faults(mappers: int, per_mapper: int) -> tuple[float, float]:
    """Faults served per second with `mappers` processes each faulting distinct regions, and
    the CPU seconds each fault cost (the mapper processes' and the manager's)."""
    with manager("--region", "ram0=0:1M") as mgr:
        gpas = _add_probes(mgr, mappers * per_mapper)
        procs = [Mapper(mgr.dir, f"m{i}") for i in range(mappers)]
        pids = [mgr.pid, *(proc.pid for proc in procs)]
        try:
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


def fault_among(regions: int, probes: int) -> tuple[float, float]:
    """Median first-fault seconds with `probes` + 1 regions in all (ram0 and the regions
    faulted), and with `regions` in all (fillers besides): two managers, one mapper on each,
    faulting in turn, so that the machine's drift during the run falls on both alike."""
    few_args = ("--region", "ram0=0:1M", "--max-regions", str(probes + 10))
    many_args = ("--region", "ram0=0:1M", "--max-regions", str(regions + 10))
    with manager(*few_args) as few, manager(*many_args) as many:
        for i in range(regions - probes - 1):
            many.client.add_region(f"f{i}", 4 * MiB + i * 2 * 4096, 4096)
        gpas = _add_probes(few, probes)
        _add_probes(many, probes)  # at the same addresses
        samples: tuple[list[float], list[float]] = ([], [])
        with attach(few.dir, name="bench") as on_few, attach(many.dir, name="bench") as on_many:
            on_few.read_at(0, 1)  # attached and warm: the first probe is no different
            on_many.read_at(0, 1)
            for gpa in gpas:
                for memory, out in ((on_few, samples[0]), (on_many, samples[1])):
                    started = time.perf_counter()
                    memory.read_at(gpa, 8)
                    out.append(time.perf_counter() - started)
    return statistics.median(samples[0]), statistics.median(samples[1])


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
