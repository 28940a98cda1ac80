"""The sweep that finds which regions a change deactivates and activates (`regions.changes`
over the placement index's entries), checked against the rule applied pair by pair, with the
regions' flags changed behind the table's back so that there is something to change."""

from __future__ import annotations

import random

import pytest
from test_manager_state import MiB, RecordingStore
from test_region_scaling import _brute_desired_active, _brute_overlapping, _nested_regions

from membacking.manager import regions
from membacking.manager.state import ManagerState
from membacking.protocol.ranges import MemoryRange


@pytest.fixture
def state() -> ManagerState:
    return ManagerState(RecordingStore(), address_space=1 << 32)


def _check_changes(state: ManagerState, window: MemoryRange) -> None:
    """`changes` over the index's entries for `window` names exactly the regions whose active
    flag differs from the pairwise rule's verdict, in address order; the entries are those
    a walk finds, in (start, longest first) order."""
    near = state.placed.near(window)
    assert [e[3].name for e in near] == [
        r.name
        for r in sorted(state.regions.values(), key=lambda r: (r.gpa or 0, -r.size, r.name))
        if r.name in _brute_overlapping(state, window)
    ]
    verdict = _brute_desired_active([e[3] for e in near], window)
    down, up = regions.changes(near)
    assert [r.name for r in down] == [
        e[3].name for e in near if e[3].active and not verdict[e[3].name]
    ]
    assert [r.name for r in up] == [
        e[3].name for e in near if not e[3].active and verdict[e[3].name]
    ]


@pytest.mark.parametrize("seed", range(6))
def test_changes_agree_with_the_pairwise_rule(state: ManagerState, seed: int) -> None:
    """The sweep that finds which regions must go down or come up (skipping what an eligible
    region contains in one slice) answers what comparing every pair answers, with the
    enabled flags changed behind the table's back so that there is something to change."""
    rnd = random.Random(100 + seed)
    names = _nested_regions(state, rnd)
    assert len(names) >= 40
    for _ in range(20):
        flipped = rnd.sample(names, len(names) // 4)
        for name in flipped:
            state.regions[name].enabled = not state.regions[name].enabled
        for _ in range(20):
            start = rnd.randrange(0, 8 * MiB) & ~4095
            _check_changes(state, MemoryRange(start, start + (4096 << rnd.randrange(0, 12))))
        _check_changes(state, MemoryRange(0, 1 << 32))
        for name in flipped:
            state.regions[name].enabled = not state.regions[name].enabled
    _check_changes(state, MemoryRange(4096, 4096))  # an empty window
