"""Reliability: 8 mapper processes write and read guest memory (each its own pattern in a loop
that never stops and reads everybody's, their slices, each other's slices) while the daemon is
SIGKILLed and restarted again and again, with a region added before and removed after each
restart (soak.py). Nothing may be lost: every region's checksum is as the model says before and
after, every fault made in a gap succeeds after it, no access to mapped memory fails, no mapper
process restarts. MEMBACKING_SOAK_KILLS sets the number of kills (default 2; the measured table
uses 20)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from soak import MAPPERS, REGIONS, Soak, Spawn, Start
from test_faults import record

KILLS = int(os.environ.get("MEMBACKING_SOAK_KILLS", "2"))


@pytest.mark.timeout(120 + 30 * KILLS)  # 20 kills with 8 workers take minutes on 2 cores
def test_mappers_ride_through_repeated_daemon_kills(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    manager = start_manager(*REGIONS)
    soak = Soak(manager, spawn_worker)
    gaps: list[float] = []
    for cycle in range(KILLS):
        soak.before(cycle)
        manager.stop(signal.SIGKILL)
        # the gap: mapped memory is written and read; new faults wait for the next daemon
        soak.in_the_gap(cycle)
        manager = start_manager(*REGIONS, runtime_dir=manager.runtime_dir)
        ready = time.monotonic()
        soak.served(cycle)
        gaps.append(time.monotonic() - ready)
        soak.check(manager, cycle)
    soak.finish()
    record(
        f"manager SIGKILLed and restarted {KILLS} times under {MAPPERS} mapper processes "
        "(each writing and verifying its own pattern and reading everybody's in a loop, "
        "writing its slice in each gap; a region added before and removed after each restart)",
        KILLS,
        f"0 failed accesses to mapped memory; 0 mapper restarts; {soak.gap_faults}/"
        f"{soak.gap_faults} faults made in the gaps succeeded after them; every mapper served "
        f"again {max(gaps) * 1000:.0f} ms at most after the new daemon was ready",
        "nothing: every region's checksum as before (slices also read back by another mapper)",
        (0, 0),
        (0, 0),
    )
    print(f"gaps (ready -> every gap fault answered): {[round(g * 1000) for g in gaps]} ms")
