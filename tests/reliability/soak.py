"""What the restart soak and the handover soak share: 8 mapper processes, each writing and
verifying its own pattern and reading everybody's in a loop that never stops, each owning a
slice of `ram0` whose bytes a model follows; a region added before and removed after each
replacement of the daemon; every region checked by checksum around it. The soaks differ only in
how the daemon is replaced (SIGKILL and a plain restart, or `manager run --takeover`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import pytest

import membacking

from conftest import RunningManager, Worker, WorkerError

MiB = 1 << 20
MAPPERS = 8
PATTERN = 4096  # each mapper's own pattern at i * PATTERN, rewritten and verified every round
SLICE = 64 << 10  # each mapper's slice, followed by the model, at SLICES + i * SLICE
SLICES = 1 * MiB
RAM0 = 8 * MiB
DATA = 0x8000000  # a region of random bytes nobody writes: its checksum must never change
DATA_SIZE = 2 * MiB
EXTRA = 0x10000000  # region x<cycle> lives at EXTRA + cycle MiB
REGIONS = ("--region", "ram0=0:8M", "--region", f"data={DATA:#x}:2M")
Start = Callable[..., RunningManager]
Spawn = Callable[..., Worker]


def wait_for_mappers(manager: RunningManager, count: int, timeout: float = 10.0) -> int:
    """Wait until `count` mappers are registered with `manager`; how many are."""
    deadline = time.monotonic() + timeout
    while len(manager.client().mappers()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(manager.client().mappers())


class Soak:
    """The mappers, their model, and the checks made around each replacement of the daemon."""

    def __init__(self, manager: RunningManager, spawn: Spawn) -> None:
        self.manager = manager
        self.workers = [spawn(manager, f"soak{i}") for i in range(MAPPERS)]
        self.pids = [w.pid for w in self.workers]
        self.model = {i: bytearray(bytes([i + 1]) * SLICE) for i in range(MAPPERS)}
        self.gap_faults = 0
        data = hashlib.sha256(b"soak").digest() * (DATA_SIZE // 32)
        with membacking.attach(manager.runtime_dir, name="soak-data") as memory:
            memory.write_at(DATA, data)
        self.data_sha = hashlib.sha256(data).hexdigest()
        for i, worker in enumerate(self.workers):
            worker.ask(f"fill {SLICES + i * SLICE:#x} {i + 1:#x} {SLICE:#x}")
            # its own pattern written and verified, everybody's read, until an access fails
            worker.ask(f"loop 0x0 {MAPPERS * PATTERN:#x} {i * PATTERN:#x} {PATTERN:#x}")

    def add_region(self, cycle: int) -> None:
        """Region x<cycle>, with its name written at its start, mapped by no worker yet."""
        self.manager.client().add_region(f"x{cycle}", EXTRA + cycle * MiB, MiB)
        with membacking.attach(self.manager.runtime_dir, name="marker") as memory:
            memory.write_at(EXTRA + cycle * MiB, f"x{cycle}".encode())

    def checksums(self, cycle: int, after: bool) -> dict[str, str]:
        """sha256 of every region (but the loops' patterns, which each loop verifies itself),
        read by a worker; before the replacement without x<cycle> (the workers' faults on it
        are to fall in the gap)."""
        reader = self.workers[cycle % MAPPERS]
        extra = (cycle - 1, cycle) if after else (cycle - 1,)
        return {
            "ram0": reader.ask(f"sha {MAPPERS * PATTERN:#x} {RAM0 - MAPPERS * PATTERN:#x}"),
            "data": reader.ask(f"sha {DATA:#x} {DATA_SIZE:#x}"),
            **{f"x{c}": reader.ask(f"sha {EXTRA + c * MiB:#x} {MiB:#x}") for c in extra if c >= 0},
        }

    def expected(self, cycle: int, after: bool) -> dict[str, str]:
        """The checksums the model says `checksums` must find."""
        slices = b"".join(bytes(self.model[i]) for i in range(MAPPERS))
        ram0 = bytes(SLICES - MAPPERS * PATTERN) + slices
        ram0 += bytes(RAM0 - MAPPERS * PATTERN - len(ram0))
        sums = {"ram0": hashlib.sha256(ram0).hexdigest(), "data": self.data_sha}
        for c in (cycle - 1, cycle) if after else (cycle - 1,):
            if c >= 0:
                marker = f"x{c}".encode()
                sums[f"x{c}"] = hashlib.sha256(marker + bytes(MiB - len(marker))).hexdigest()
        return sums

    def before(self, cycle: int) -> None:
        """Region x<cycle> added; every region's checksum as the model says."""
        self.add_region(cycle)
        assert self.checksums(cycle, after=False) == self.expected(cycle, after=False), cycle

    def in_the_gap(self, cycle: int) -> None:
        """Each worker writes its slice (mapped memory: done at once) and asks for region
        x<cycle> (a fault: it waits for a daemon); the answers are read by `served`."""
        for i, worker in enumerate(self.workers):
            data = f"c{cycle}w{i}".encode()
            offset = (cycle * 64) % (SLICE - 64)
            worker.send(f"write {SLICES + i * SLICE + offset:#x} {data.hex()}")
            self.model[i][offset : offset + len(data)] = data
            worker.send(f"read {EXTRA + cycle * MiB:#x} {len(f'x{cycle}')}")
        self.gap_faults += MAPPERS

    def served(self, cycle: int) -> None:
        """Every write and fault `in_the_gap` asked for succeeded."""
        for worker in self.workers:
            assert worker.answer() == ""
            assert bytes.fromhex(worker.answer()) == f"x{cycle}".encode()

    def check(self, manager: RunningManager, cycle: int) -> None:
        """After the daemon was replaced: every slice reads back as the model says, read by
        another worker; every region's checksum as expected; then the region of the cycle
        before, held by every worker, is removed: unmapped from all."""
        self.manager = manager
        for i in range(MAPPERS):
            reader = self.workers[(i + cycle + 1) % MAPPERS]
            got = bytes.fromhex(reader.ask(f"read {SLICES + i * SLICE:#x} {SLICE:#x}"))
            assert got == bytes(self.model[i]), (cycle, i)
        assert self.checksums(cycle, after=True) == self.expected(cycle, after=True), cycle
        if cycle:
            assert wait_for_mappers(manager, MAPPERS) == MAPPERS
            removed = manager.client().remove_region(f"x{cycle - 1}")
            assert len(removed["unmapped_from"]) == MAPPERS, removed
            with pytest.raises(WorkerError, match="NoMappingError"):
                self.workers[cycle % MAPPERS].ask(f"read {EXTRA + (cycle - 1) * MiB:#x} 1")

    def finish(self) -> None:
        """No loop ever failed (a failed or wrong access ends it), no worker restarted."""
        for worker, pid in zip(self.workers, self.pids, strict=True):
            assert worker.proc.poll() is None and worker.pid == pid
            reads, _, error = worker.ask("loopstatus").partition(" ")
            assert not error.strip(), error
            assert int(reads) > 0
