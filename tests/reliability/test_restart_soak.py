"""Reliability: 8 mapper processes write and read guest memory (their own slices and each
other's, and a reader loop each that never stops) while the daemon is SIGKILLed and restarted
again and again, with a region added before and removed after each restart. Nothing may be lost:
every slice reads back as the model says, every fault made in a gap succeeds after it, and no
access to mapped memory fails. MEMBACKING_SOAK_KILLS sets the number of kills (default 2; the
measured table uses 20)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from test_faults import record

import membacking

from conftest import RunningManager, Worker, WorkerError

MiB = 1 << 20
SLICE = 64 << 10
MAPPERS = 8
KILLS = int(os.environ.get("MEMBACKING_SOAK_KILLS", "2"))
EXTRA = 0x10000000  # region x<cycle> lives at EXTRA + cycle MiB
Start = Callable[..., RunningManager]
Spawn = Callable[..., Worker]


@pytest.mark.timeout(120 + 30 * KILLS)  # 20 kills with 8 workers take minutes on 2 cores
def test_mappers_ride_through_repeated_daemon_kills(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    manager = start_manager("--region", "ram0=0:8M")
    workers = [spawn_worker(manager, f"soak{i}") for i in range(MAPPERS)]
    model = {i: bytearray(SLICE) for i in range(MAPPERS)}
    for i, worker in enumerate(workers):
        worker.ask(f"fill {i * SLICE:#x} {i + 1:#x} {SLICE:#x}")
        model[i][:] = bytes([i + 1]) * SLICE
        worker.ask(f"loop {i * SLICE:#x} 4096")  # reads its slice until an access fails
    gaps: list[float] = []
    gap_faults = 0
    for cycle in range(KILLS):
        client = manager.client()
        client.add_region(f"x{cycle}", EXTRA + cycle * MiB, MiB)
        with membacking.attach(manager.runtime_dir, name="marker") as memory:
            memory.write_at(EXTRA + cycle * MiB, f"x{cycle}".encode())
        manager.stop(signal.SIGKILL)
        # the gap: mapped memory is written and read; new faults wait for the next daemon
        for i, worker in enumerate(workers):
            data = f"c{cycle}w{i}".encode()
            offset = (cycle * 64) % (SLICE - 64)
            worker.ask(f"write {i * SLICE + offset:#x} {data.hex()}")
            model[i][offset : offset + len(data)] = data
            worker.send(f"read {EXTRA + cycle * MiB:#x} {len(f'x{cycle}')}")
        gap_faults += MAPPERS
        manager = start_manager("--region", "ram0=0:8M", runtime_dir=manager.runtime_dir)
        ready = time.monotonic()
        for worker in workers:
            assert bytes.fromhex(worker.answer()) == f"x{cycle}".encode()
        gaps.append(time.monotonic() - ready)
        # every slice, read by another mapper: one memory, nothing lost
        for i in range(MAPPERS):
            reader = workers[(i + cycle + 1) % MAPPERS]
            got = bytes.fromhex(reader.ask(f"read {i * SLICE:#x} {SLICE:#x}"))
            assert got == bytes(model[i]), (cycle, i)
        if cycle:  # the region of the cycle before, held by every mapper: unmapped from all
            deadline = time.monotonic() + 10
            while len(manager.client().mappers()) < MAPPERS and time.monotonic() < deadline:
                time.sleep(0.05)
            removed = manager.client().remove_region(f"x{cycle - 1}")
            assert len(removed["unmapped_from"]) == MAPPERS, removed
            with pytest.raises(WorkerError, match="NoMappingError"):
                workers[cycle % MAPPERS].ask(f"read {EXTRA + (cycle - 1) * MiB:#x} 1")
    for worker in workers:
        reads, _, error = worker.ask("loopstatus").partition(" ")
        assert not error.strip(), error
        assert int(reads) > 0
    record(
        f"manager SIGKILLed and restarted {KILLS} times under {MAPPERS} mapper processes "
        "(own and others' slices written and read, a region added before and removed after "
        "each restart)",
        KILLS,
        f"0 failed accesses to mapped memory; {gap_faults}/{gap_faults} faults made in the "
        f"gaps succeeded after them; every mapper served again {max(gaps) * 1000:.0f} ms at "
        "most after the new daemon was ready",
        "nothing: every slice read back as written, by another mapper",
        (0, 0),
        (0, 0),
    )
    print(f"gaps (ready -> every gap fault answered): {[round(g * 1000) for g in gaps]} ms")
