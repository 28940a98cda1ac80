"""Region logic at scale, with no sockets: the placement index and the sweep that decides which
regions are active, each checked against a brute-force model, and shown not to walk every
region."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterable
from types import FrameType

import pytest
from test_manager_state import MiB, RecordingStore, fault_everything

from membacking.manager import later, regions
from membacking.manager import state as state_module
from membacking.manager import table as table_module
from membacking.manager.errors import Refused
from membacking.manager.regions import Region
from membacking.manager.state import ManagerState
from membacking.protocol.ranges import MemoryRange


@pytest.fixture
def state() -> ManagerState:
    return ManagerState(RecordingStore(), address_space=1 << 32)


def _brute_overlapping(state: ManagerState, window: MemoryRange) -> set[str]:
    return {
        r.name
        for r in state.regions.values()
        if r.gpa is not None and r.gpa < window.end and window.start < r.gpa + r.size
    }


def test_placement_index_follows_adds_moves_and_removals(state: ManagerState) -> None:
    """The index that spares add/move a walk over every region answers exactly what a walk
    would, for nested and disjoint regions of many sizes, through moves and removals."""
    rnd = random.Random(7)
    state.add_region("ram", 0, 512 * MiB, True)
    names = []
    for i in range(120):
        size = 4096 << rnd.randrange(0, 12)
        gpa = rnd.randrange(0, (1 << 32) - size) & ~(size - 1)
        priority = 1 + rnd.randrange(0, 3) if gpa + size <= 512 * MiB else 0
        try:
            state.add_region(f"r{i}", gpa, size, True, priority=priority)
            names.append(f"r{i}")
        except Refused:
            pass  # broke the nesting rule: refused, as before the index
    for name in rnd.sample(names, 20):
        region = state.regions[name]
        with contextlib.suppress(Refused):  # some moves would break the nesting rule
            state.set_enabled(name, True, gpa=(region.gpa or 0) + region.size)
    for name in rnd.sample(names, 20):
        state.remove_region(name)  # no mapper holds anything: removed at once
    assert len(names) > 60 and len(state.placed) == len(state.regions)
    for _ in range(300):
        start = rnd.randrange(0, 1 << 32) & ~4095
        window = MemoryRange(start, min(1 << 32, start + (4096 << rnd.randrange(0, 16))))
        got = {r.name for r in state.placed.overlapping(window)}
        assert got == _brute_overlapping(state, window), window
    empty = MemoryRange(4096, 4096)  # an empty window: the regions that contain its start
    assert {r.name for r in state.placed.overlapping(empty)} == {
        r.name
        for r in state.regions.values()
        if r.gpa is not None and r.gpa < 4096 < r.gpa + r.size
    }


def _brute_desired_active(near: list[Region], window: MemoryRange) -> dict[str, bool]:
    """The rule itself, pair by pair: active unless an eligible overlapping region shadows it."""
    out = {}
    for region in near:
        rng = region.range
        if rng is None or not rng.overlaps(window):
            continue
        eligible = region.enabled and not region.removing
        out[region.name] = eligible and not any(
            other is not region
            and other.enabled
            and not other.removing
            and other.range is not None
            and other.range.overlaps(rng)
            and regions.shadows(other, region)
            for other in near
        )
    return out


def _nested_regions(state: ManagerState, rnd: random.Random) -> list[str]:
    """150 tries at random regions (nested stacks of priorities, a fifth on the range of an
    existing one): the names of those the nesting rule let in."""
    names = []
    for i in range(150):
        size = 4096 << rnd.randrange(0, 10)
        gpa = rnd.randrange(0, 8 * MiB) & ~(size - 1)
        if names and rnd.random() < 0.2:  # the same range as an existing region
            other = state.regions[rnd.choice(names)]
            gpa, size = other.gpa or 0, other.size
        try:
            state.add_region(f"r{i}", gpa, size, True, priority=rnd.randrange(0, 4))
            names.append(f"r{i}")
        except Refused:
            pass  # broke the nesting rule
    return names


@pytest.mark.parametrize("seed", range(6))
def test_desired_active_agrees_with_the_pairwise_rule(state: ManagerState, seed: int) -> None:
    """The sweep that decides which regions are active answers what comparing every pair
    answers, for nested stacks of priorities, identical ranges, disabled and moved regions."""
    rnd = random.Random(seed)
    names = _nested_regions(state, rnd)
    for name in rnd.sample(names, len(names) // 3):
        state.set_enabled(name, False)
    for name in rnd.sample(names, 10):
        region = state.regions[name]
        with contextlib.suppress(Refused):
            state.set_enabled(name, True, gpa=(region.gpa or 0) + region.size)
    assert len(names) >= 40
    every = list(state.placed.overlapping(MemoryRange(0, 1 << 32)))
    windows = [MemoryRange(0, 1 << 32)]
    for _ in range(200):
        start = rnd.randrange(0, 8 * MiB) & ~4095
        windows.append(MemoryRange(start, start + (4096 << rnd.randrange(0, 12))))
    for window in windows:
        near = [r for r in every if r.range is not None and r.range.overlaps(window)]
        # the regions the changes left active are those the pairwise rule makes active, and
        # the sweep finds nothing more to change
        assert {r.name: r.active for r in near} == _brute_desired_active(near, window)
        assert regions.changes(state.placed.near(window)) == ([], [])
    # and the table follows it: exactly the regions the rule makes active are active
    assert {r.name for r in every if r.active} == {
        name for name, on in _brute_desired_active(every, windows[0]).items() if on
    }


def test_desired_active_is_not_quadratic(state: ManagerState) -> None:
    """2,000 regions inside a higher-priority one that is disabled: comparing every pair took
    4.5 s; the sweep reads each region's range a bounded number of times (counted, not timed)."""
    state.add_region("big", 0, 4000 * 4096, True, priority=1)
    for i in range(2000):
        state.add_region(f"s{i}", i * 2 * 4096, 4096, True)
    reads = 0
    real_range = Region.range

    def counting(region: Region) -> MemoryRange | None:
        nonlocal reads
        reads += 1
        return real_range.fget(region)  # type: ignore[attr-defined,no-any-return]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Region, "range", property(counting))
        state.set_enabled("big", False)
        assert all(state.regions[f"s{i}"].active for i in range(2000))
        state.set_enabled("big", True)
        assert not any(state.regions[f"s{i}"].active for i in range(2000))
    assert reads < 20 * 2001, reads  # pairwise: millions


def test_many_regions_are_added_without_walking_them_all(
    state: ManagerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a region hands the nesting check and the reconciliation only the regions near it
    (found by the index), not every region: 10,000 adds took 130 s when they walked them all."""
    for i in range(2000):
        state.add_region(f"f{i}", 4 * MiB + i * 8192, 4096, True)
    given: list[int] = []

    def nesting(name: str, rng: MemoryRange, priority: int, others: Iterable[Region]) -> None:
        seen = list(others)
        given.append(len(seen))
        regions.check_nesting(name, rng, priority, seen)

    def changes(near: list[regions.Near]) -> tuple[list[Region], list[Region]]:
        given.append(len(near))
        return regions.changes(near)

    monkeypatch.setattr(state_module, "check_nesting", nesting)
    monkeypatch.setattr(table_module, "changes", changes)
    state.add_region("last", 4 * MiB + 2000 * 8192, 4096, True)
    assert given == [0, 1]  # nothing near it; then itself
    with pytest.raises(Refused):
        state.add_region("clash", 4 * MiB + 8192, 8192, True)  # overlaps f1 unnested
    assert given[2] == 1


def test_a_removal_does_not_walk_what_each_holder_holds(
    state: ManagerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a holder may close a destroyed mappable's fd was decided by collecting every
    mappable it held, once per Unmap: 38 us per removal with 1,000 mappings held, 194 us with
    4,096. It is a count lookup now: nothing walks the held ranges."""
    from test_manager_state import attach

    from membacking.manager.held import Held
    from membacking.protocol import messages as m

    mapper_id, stream, requests = attach(state, "m1")
    for i in range(1000):
        state.add_region(f"r{i}", i * 8192, 4096, True)
    fault_everything(state, requests, MemoryRange(0, 1000 * 8192))
    assert len(state.mappers[mapper_id].held) == 1000

    def walked(self: Held) -> None:
        raise AssertionError("the held ranges were walked")

    monkeypatch.setattr(Held, "__iter__", walked)
    monkeypatch.setattr(Held, "items", walked)
    effects = state.remove_region("r500")
    unmaps = [e.msg for e in effects if isinstance(getattr(e, "msg", None), m.Unmap)]
    assert len(unmaps) == 1 and unmaps[0].release == (501,)  # its fd is closed with it
    state.handle_mapper(stream, m.UnmapAck(unmaps[0].seq))
    assert "r500" not in state.regions


def test_desired_active_beside_a_region_being_removed(state: ManagerState) -> None:
    """While a removal waits for its Unmaps, new regions may be placed across the region being
    removed without nesting in it. The sweep must still answer what the pairwise rule does."""
    from test_manager_state import attach

    from membacking.protocol import messages as m

    page = 4096
    _, stream, requests = attach(state, "m1")
    state.add_region("R", 0, 16 * page, True, priority=5)
    state.add_region("in", 2 * page, 2 * page, True, priority=1)
    state.handle_mapper(requests, m.SendMappings(MemoryRange(0, 16 * page)))
    effects = state.remove_region("R")  # its Unmap is not acknowledged yet
    assert state.regions["R"].removing
    state.add_region("N", 8 * page, 16 * page, True, priority=5)  # across R's end
    state.add_region("L", 12 * page, 8 * page, True, priority=0)  # inside N, across R's end
    state.add_region("H", page, 4 * page, True, priority=9)  # inside R, around "in"
    every = list(state.placed.overlapping(MemoryRange(0, 1 << 32)))
    windows = (MemoryRange(0, 1 << 32), MemoryRange(0, 4 * page), MemoryRange(10 * page, 20 * page))
    for window in windows:
        near = [r for r in every if r.range is not None and r.range.overlaps(window)]
        # the regions the changes left active are those the pairwise rule makes active, and
        # the sweep finds nothing more to change
        assert {r.name: r.active for r in near} == _brute_desired_active(near, window)
        assert regions.changes(state.placed.near(window)) == ([], [])
    assert {r.name for r in every if r.active} == {"N", "H"}
    from test_region_changes import _check_changes

    for flip in ("N", "H", "L"):  # and what changes if a region's flag changed
        state.regions[flip].enabled = not state.regions[flip].enabled
        for window in windows:
            _check_changes(state, window)
        state.regions[flip].enabled = not state.regions[flip].enabled
    for effect in effects:
        msg = getattr(effect, "msg", None)
        if isinstance(msg, m.Unmap):
            state.handle_mapper(stream, m.UnmapAck(msg.seq))
    assert "R" not in state.regions


def _lines_run(action: Callable[[], object]) -> int:
    """How many lines of Python `action` runs (every loop turn and comprehension item counts):
    work counted, not timed."""
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal count
        if event == "line":
            count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(previous)
    return count


@pytest.mark.parametrize("replace", [False, True], ids=["unmap_range", "map_range"])
def test_a_change_does_not_grow_with_the_holes_already_made(replace: bool) -> None:
    """An unmap_range (or map_range) with a lazy holder of the whole region, acknowledged, up to
    its reply: the work after 2,000 holes is the work after 10. The pieces were walked, sorted
    and listed in full on every change (3,000 holes took 26 s; holes 2,000-3,000 cost 14 ms each
    in a real daemon)."""
    from test_manager_state import attach

    from membacking.protocol import messages as m

    page = 4096
    state = ManagerState(RecordingStore(), address_space=1 << 36)
    _, stream, requests = attach(state, "m1")
    state.add_region("ram", 0, 8192 * page, True)
    state.handle_mapper(requests, m.SendMappings(MemoryRange(0, 8192 * page)))
    holes = 0

    def change() -> None:
        nonlocal holes
        rng = ((2 * holes + 1) * page, page)
        args = {"replace": ("memfd", None, 0, True)} if replace else {}
        effects = state.change_mappings("ram", *rng, reply_to=b"client", **args)  # type: ignore[arg-type]
        for effect in effects:
            msg = getattr(effect, "msg", None)
            if isinstance(msg, m.Unmap):
                effects += state.handle_mapper(stream, m.UnmapAck(msg.seq))
        replies = [e.msg for e in effects if isinstance(getattr(e, "msg", None), m.ControlReply)]
        pieces = 2 * holes + 3 if replace else holes + 2
        assert len(replies) == 1 and replies[0].result["pieces"] == pieces
        assert replies[0].result["holders"] == [1]
        holes += 1

    def cost_of_next() -> int:
        return _lines_run(change)

    for _ in range(10):
        change()
    early = cost_of_next()
    while holes < 2000:
        change()
    late = cost_of_next()
    # the holder holds every piece: the kept ones, and (lazy) the new ones refilled behind
    assert state.regions["ram"].holder_tally == {1: len(state.regions["ram"].submappings)}
    assert late <= early * 1.1 + 20, (early, late)


def test_removing_a_region_of_many_pieces_sends_one_unmap_per_holder(
    state: ManagerState,
) -> None:
    """A region with 500 holes held whole by 3 mappers: its removal (and a disable) unmaps
    each holder once over the span of its pieces, where it sent an Unmap per piece and holder
    (1,000 pieces and 24 holders: 24,000 Unmaps, 316 ms of the loop)."""
    from test_manager_state import attach

    from membacking.protocol import messages as m

    page = 4096
    mappers = [attach(state, f"m{i}") for i in range(3)]
    state.add_region("holes", 0, 1002 * page, True)
    state.add_region("other", 2000 * page, page, True)
    for mapper_id, _, _ in mappers:
        fault_everything(state, mapper_id, MemoryRange(0, 2001 * page))
    for i in range(500):
        effects = state.change_mappings("holes", (2 * i + 1) * page, page)
        for effect in effects:
            msg = getattr(effect, "msg", None)
            if isinstance(msg, m.Unmap):
                identity = effect.identity  # type: ignore[union-attr]
                state.handle_mapper(identity, m.UnmapAck(msg.seq))
    assert len(state.regions["holes"].submappings) == 501
    actions = {
        MemoryRange(0, 1002 * page): lambda: state.set_enabled("holes", False),
        MemoryRange(2000 * page, 2001 * page): lambda: state.remove_region("other"),
    }
    for span, action in actions.items():
        unmaps = [
            (e.identity, e.msg)  # type: ignore[union-attr]
            for e in action()
            if isinstance(getattr(e, "msg", None), m.Unmap)
        ]
        assert len({identity for identity, _ in unmaps}) == len(unmaps) == 3
        assert {msg.range for _, msg in unmaps} == {span}
        for identity, msg in unmaps:
            state.handle_mapper(identity, m.UnmapAck(msg.seq))
    assert not state.regions["holes"].active and "other" not in state.regions
    assert all(len(state.mappers[i].held) == 0 for i, _, _ in mappers)


def test_a_removal_does_not_grow_as_pieces_times_holders() -> None:
    """Removing a region runs lines of Python per piece or per holder, never per piece and
    holder: the lines 190 more pieces add are the same with 2 holders and with 12. Every piece's
    holders were walked and each holder's ranges popped one by one (2.3 us per piece and
    holder: 1.66 s for 10,010 pieces held by 72 mappers, in one turn of the loop)."""
    from test_manager_state import attach

    from membacking.protocol import messages as m

    page = 4096

    def cost(pieces: int, holders: int) -> int:
        state = ManagerState(RecordingStore(), address_space=1 << 36)
        pages = 2 * pieces
        state.add_region("ram", 0, pages * page, True)
        streams = []
        for h in range(holders):
            _, stream, requests = attach(state, f"m{h}")
            state.handle_mapper(requests, m.SendMappings(MemoryRange(0, pages * page)))
            streams.append(stream)
        for i in range(pieces - 1):
            state.change_mappings("ram", (2 * i + 1) * page, page)
        region = state.regions["ram"]
        assert len(region.submappings) == pieces
        assert region.holder_tally == {h + 1: pieces for h in range(holders)}
        effects: list[object] = []
        lines = _lines_run(lambda: effects.extend(state.remove_region("ram", reply_to=b"c")))
        unmaps = [e.msg for e in effects if isinstance(getattr(e, "msg", None), m.Unmap)]
        assert len(unmaps) == holders  # one each, over all of its pieces
        for h, stream in enumerate(streams):  # answered, and the Unmaps of the holes before
            for seq in list(state.mappers[h + 1].unacked):
                state.handle_mapper(stream, m.UnmapAck(seq))
        assert "ram" not in state.regions and not region.holder_tally
        assert all(len(e.held) == 0 and e.held.bytes == 0 for e in state.mappers.values())
        return lines

    few_holders = cost(200, 2) - cost(10, 2)
    many_holders = cost(200, 12) - cost(10, 12)
    assert many_holders <= few_holders * 1.1 + 50, (few_holders, many_holders)


def test_a_big_removal_leaves_its_bookkeeping_to_later_turns_and_serves_faults_meanwhile() -> None:
    """Removing a region of 301 pieces held by 4 mappers: every holder gets its Unmap in the
    removal's own turn, but deleting each holder's held ranges, and freeing the table entries,
    wait for `work`, which the daemon's loop runs a bounded step at a time between messages
    (10,010 pieces held by 72 mappers held the loop for 20 to 53 ms in one turn). Between the
    steps a fault of the removed range gets NoMapping, a region added in its place is mapped,
    and once the work is done every holder holds exactly what it was mapped since."""
    from test_manager_state import attach

    from membacking.protocol import messages as m

    page, pieces = 4096, 301
    state = ManagerState(RecordingStore(), address_space=1 << 36)
    state.add_region("ram", 0, 2 * pieces * page, True)
    mappers = [attach(state, f"m{h}") for h in range(4)]
    for _, _, requests in mappers:
        state.handle_mapper(requests, m.SendMappings(MemoryRange(0, 2 * pieces * page)))
    for i in range(pieces - 1):
        state.change_mappings("ram", (2 * i + 1) * page, page)
    while state.has_work:  # what the holes left
        state.work()
    assert len(state.regions["ram"].submappings) == pieces

    effects = state.remove_region("ram", reply_to=b"client")
    unmaps = {e.identity: e.msg for e in effects if isinstance(getattr(e, "msg", None), m.Unmap)}  # type: ignore[union-attr]
    assert set(unmaps) == {stream for _, stream, _ in mappers}
    for mapper_id, _, _ in mappers:
        held = state.mappers[mapper_id].held
        assert held.later == pieces and len(held) == 0 and held.bytes == 0  # taken, not deleted
    assert state.has_work

    first_id, _, first_requests = mappers[0]
    steps = 0
    while state.has_work:
        done = state.work(pieces)  # a step: about one holder's ranges
        assert 0 < done <= 2 * pieces + later.WORK_PER_WINDOW  # its ranges, a window
        steps += 1
        if steps == 1:  # served between two steps, as the daemon's loop does
            gone = state.handle_mapper(first_requests, m.SendMappings(MemoryRange(0, page)))
            assert [e.msg for e in gone] == [m.NoMapping(MemoryRange(0, page))]
            state.add_region("new", 0, page, True)
            got = state.handle_mapper(first_requests, m.SendMappings(MemoryRange(0, page)))
            maps = [e.msg for e in got if isinstance(getattr(e, "msg", None), m.Map)]
            assert [mp.range for mp in maps] == [MemoryRange(0, page)]
    assert steps >= len(mappers)  # one holder's ranges at most per step, beyond the budget

    replies = []
    for identity, unmap in unmaps.items():
        assert isinstance(unmap, m.Unmap)
        replies += state.handle_mapper(identity, m.UnmapAck(unmap.seq))
    assert [type(e.msg) for e in replies] == [m.ControlReply]
    assert "ram" not in state.regions
    new_id = state.regions["new"].submappings[0].mappable_id
    for mapper_id, _, _ in mappers:
        held = state.mappers[mapper_id].held
        expect = [(MemoryRange(0, page), new_id)] if mapper_id == first_id else []
        assert held.later == 0 and held.items() == expect
        assert held.bytes == sum(r.end - r.start for r, _ in expect)
    assert state.regions["new"].holder_tally == {first_id: 1}
    assert state.has_work  # the removed region's pieces, let go of as it completed
    while state.has_work:
        state.work()
