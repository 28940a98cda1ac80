"""Reliability: 8 mapper processes write and read guest memory (each its own pattern in a loop
that never stops and reads everybody's, their slices, each other's slices) while the daemon is
handed over (`manager run --takeover`) again and again, with a region added before and removed
after each handover (soak.py, as the restart soak). Each worker asks for the new region as soon
as the old daemon has logged that it hands over: those faults fall in the gap (counted when sent
before the new daemon's ready line). Nothing may be lost: every region's checksum is as the
model says before and after, every such fault succeeds, no access to mapped memory fails, no
mapper process restarts. MEMBACKING_SOAK_HANDOVERS sets the number of handovers (default 5; the
measured table uses 20)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from soak import MAPPERS, REGIONS, Soak, Spawn, Start
from test_faults import record

from conftest import RunningManager

HANDOVERS = int(os.environ.get("MEMBACKING_SOAK_HANDOVERS", "5"))


def hand_over(
    start: Start, old: RunningManager, soak: Soak, cycle: int
) -> tuple[RunningManager, bool]:
    """`manager run --takeover` from `old`; the workers' gap accesses are sent the moment the
    old daemon logs that it hands over (it serves nothing from then on). The new daemon, and
    whether they were all sent before it was ready."""
    taken: dict[str, RunningManager] = {}

    def take_over() -> None:
        taken["new"] = start(*REGIONS, "--takeover", runtime_dir=old.runtime_dir)

    taker = threading.Thread(target=take_over)
    taker.start()
    deadline = time.monotonic() + 60
    while "handing over to pid" not in old.log() and time.monotonic() < deadline:
        time.sleep(0.001)
    soak.in_the_gap(cycle)
    in_gap = taker.is_alive()  # the new one had not said it was ready yet
    taker.join(60)
    new = taken["new"]
    assert f"took-over-from={old.pid}" in new.ready_line, new.ready_line
    assert old.proc.wait(10) == 0
    return new, in_gap


@pytest.mark.timeout(120 + 15 * HANDOVERS)
def test_mappers_ride_through_repeated_handovers(start_manager: Start, spawn_worker: Spawn) -> None:
    manager = start_manager(*REGIONS)
    soak = Soak(manager, spawn_worker)
    in_gap = 0
    took: list[float] = []
    for cycle in range(HANDOVERS):
        soak.before(cycle)
        started = time.monotonic()
        manager, sent_in_gap = hand_over(start_manager, manager, soak, cycle)
        in_gap += sent_in_gap * MAPPERS
        soak.served(cycle)
        took.append(time.monotonic() - started)
        soak.check(manager, cycle)
    soak.finish()
    record(
        f"manager handed over (`manager run --takeover`) {HANDOVERS} times under {MAPPERS} "
        "mapper processes (each writing and verifying its own pattern and reading everybody's "
        "in a loop, writing its slice as the old daemon hands over; a region added before and "
        "removed after each handover)",
        HANDOVERS,
        f"old daemon exited 0 each time; 0 failed accesses to mapped memory; 0 mapper "
        f"restarts; {soak.gap_faults}/{soak.gap_faults} faults asked for once the old daemon "
        f"had logged its handover succeeded ({in_gap} of them before the new one was ready)",
        "nothing: every region's checksum as before (slices also read back by another mapper)",
        (0, 0),
        (0, 0),
    )
    print(
        f"faults asked in the gap: {in_gap}/{soak.gap_faults}; takeover start -> every gap "
        f"fault answered: {[round(t * 1000) for t in took]} ms"
    )
