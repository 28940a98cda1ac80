"""Changes that hide or show many regions or pieces, in bounded turns: hiding regions sends each
holder one Unmap spanning them (cuts.py), a large activation puts its pieces in the table a
batch per step (placing.py), and whatever reads the table meanwhile finds them in place. After
any interleaving of faults, changes, steps and departures, every mapper maps exactly what the
table says it holds."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
from test_manager_state import RecordingStore, attach, fault_everything

from membacking.manager.cuts import deactivation_runs
from membacking.manager.errors import Refused
from membacking.manager.placing import PIECES_PER_MESSAGE
from membacking.manager.regions import SubMapping
from membacking.manager.state import Effect, ManagerState, Send
from membacking.manager.steps import STEP_MESSAGES
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange

PAGE = 4096
BASE = 1 << 20
SMALL = 400  # small regions of a page each, a page apart
BIG = 1 << 30  # a region of BIG_PIECES one-page pieces, a page apart
BIG_PIECES = 3 * STEP_MESSAGES * PIECES_PER_MESSAGE
BIG_SIZE = 2 * BIG_PIECES * PAGE
AT_ONCE = STEP_MESSAGES * PIECES_PER_MESSAGE  # pieces a step puts in place at most


class Pages:
    """Simulated mappers at page grain: what each maps (page -> mappable id, file offset),
    from the Map, MapEager and Unmap it gets, each acknowledged at once; replies are kept."""

    def __init__(self, state: ManagerState) -> None:
        self.state = state
        self.mapped: dict[bytes, dict[int, tuple[int, int]]] = {}
        self.replies: list[tuple[bytes, m.Message]] = []
        self.sent: Counter[tuple[bytes, type]] = Counter()

    def take(self, effects: list[Effect]) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if not isinstance(effect, Send):
                continue
            msg, who = effect.msg, effect.identity
            self.sent[(who, type(msg))] += 1
            pages = self.mapped.setdefault(who, {})
            if isinstance(msg, m.ControlReply | m.Error):
                self.replies.append((who, msg))
            elif isinstance(msg, m.Map | m.MapEager):
                for page in range(msg.range.start, msg.range.end, PAGE):
                    pages[page] = (msg.mappable_id, msg.file_offset + page - msg.range.start)
                if isinstance(msg, m.MapEager):
                    queue += self.state.handle_mapper(who, m.MapAck(msg.seq, True, ""))
            elif isinstance(msg, m.Unmap):
                for page in [p for p in pages if msg.range.start <= p < msg.range.end]:
                    del pages[page]
                queue += self.state.handle_mapper(who, m.UnmapAck(msg.seq))
            elif isinstance(msg, m.Release):
                queue += self.state.handle_mapper(who, m.UnmapAck(msg.seq))

    def settle(self) -> None:
        """Every step and every piece of work left, until none is."""
        while self.state.has_steps or self.state.has_work:
            if self.state.has_steps:
                self.take(self.state.step())
            else:
                self.state.work()


def check(state: ManagerState, pages: Pages) -> None:
    """The table holds exactly the active regions' pieces; each mapper maps exactly what the
    table says it holds, with the right backing; the tallies count the table's holders."""
    expected: dict[MemoryRange, tuple[int, int]] = {}
    for region in state.regions.values():
        if region.active:
            for sub in region.submappings:
                expected[region.absolute(sub)] = (sub.mappable_id, sub.file_offset)
    table = state.table.items()
    assert {r: (mp.mappable_id, mp.file_offset) for r, mp in table} == expected
    check_holders(state, pages)
    for entry in state.mappers.values():
        if entry.eager:
            assert {r for r, mp in table if entry.id in mp.holders} == set(expected)
    for region in state.regions.values():
        tally = Counter(h for _, mp in table if mp.region == region.name for h in mp.holders)
        assert +region.holder_tally == tally


def check_holders(state: ManagerState, pages: Pages) -> None:
    """Each mapper maps exactly what the table says it holds, with the right backing (at any
    moment: the table may still miss pieces an activation has not put in place)."""
    table = state.table.items()
    for entry in state.mappers.values():
        held = {r for r, mp in table if entry.id in mp.holders}
        assert set(entry.held) == held
        want = {
            page: (mp.mappable_id, mp.file_offset + page - r.start)
            for r, mp in table
            if entry.id in mp.holders
            for page in range(r.start, r.end, PAGE)
        }
        assert entry.stream is not None
        assert pages.mapped.get(entry.stream, {}) == want, entry.name


def small(i: int) -> MemoryRange:
    return MemoryRange.from_size(BASE + 2 * i * PAGE, PAGE)


@pytest.fixture
def state() -> ManagerState:
    state = ManagerState(RecordingStore(), address_space=1 << 36)
    for i in range(SMALL):
        state.add_region(f"r{i:05d}", BASE + 2 * i * PAGE, PAGE, True)
    state.add_region("big", BIG, BIG_SIZE, True, enabled=False)
    for i in range(BIG_PIECES - 1):  # a hole after each page: BIG_PIECES pieces
        state.change_mappings("big", (2 * i + 1) * PAGE, PAGE)
    return state


def lazy_holding_everything(state: ManagerState, pages: Pages, n: int) -> list[tuple[int, bytes]]:
    out = []
    for k in range(n):
        mapper_id, stream, requests = attach(state, f"lazy{k}")
        pages.take(fault_everything(state, requests, MemoryRange(BASE, BIG)))
        out.append((mapper_id, stream))
    return out


def test_hiding_many_regions_sends_each_holder_one_unmap(state: ManagerState) -> None:
    """A region enabled over 400 others that 3 mappers hold: 3 Unmaps (one per holder,
    spanning all 400), not 1,200."""
    pages = Pages(state)
    lazy = lazy_holding_everything(state, pages, 3)
    cover = MemoryRange(BASE, BASE + 2 * SMALL * PAGE)
    effects = state.add_region(
        "cover", cover.start, cover.end - cover.start, True, priority=1, reply_to=b"c"
    )
    unmaps = [e.msg for e in effects if isinstance(e, Send) and isinstance(e.msg, m.Unmap)]
    assert len(unmaps) == len(lazy)
    assert {u.range for u in unmaps} == {MemoryRange(BASE, small(SMALL - 1).end)}
    for mapper_id, _ in lazy:
        assert [n for n, _ in state.mappers[mapper_id].unmapping.values()] == [SMALL]
    pages.take(effects)
    pages.settle()
    assert [type(msg) for _, msg in pages.replies] == [m.ControlReply]
    for _, stream in lazy:  # refilled with the cover, right behind the Unmap
        assert pages.sent[(stream, m.Map)] == SMALL + 1
        assert pages.mapped[stream].keys() >= set(range(cover.start, cover.end, PAGE))
    check(state, pages)


def test_regions_with_a_held_region_between_them_are_cut_apart(state: ManagerState) -> None:
    """Deactivated together, two regions with an active one between them that a mapper holds
    are two cuts (two Unmaps): one Unmap spanning both would take what it keeps."""
    pages = Pages(state)
    lazy = lazy_holding_everything(state, pages, 2)
    runs = deactivation_runs(state, [state.regions[n] for n in ("r00003", "r00004", "r00007")])
    assert [[r.name for r in run] for run in runs] == [["r00003", "r00004"], ["r00007"]]
    for name in ("r00003", "r00004", "r00007"):
        state.regions[name].enabled = False
    op = state.start_op("disable three", None)
    effects = state._reconcile([MemoryRange(BASE, small(8).end)], op)
    for _, stream in lazy:
        unmaps = [e.msg.range for e in effects if isinstance(e, Send) and e.identity == stream]
        assert unmaps == [MemoryRange(small(3).start, small(4).end), small(7)]
    pages.take(effects)
    pages.settle()
    check(state, pages)


def test_a_large_activation_puts_its_pieces_in_place_in_steps(state: ManagerState) -> None:
    """Enabling a region of 864 pieces puts none in the table in the request's turn and at
    most a step's worth in each step after it; a fault anywhere in it meanwhile is answered
    with the piece there (put in place first); eager mappers get every piece and the answer
    comes after the last."""
    pages = Pages(state)
    eager_id, eager, _ = attach(state, "eager")
    pages.take(state.handle_mapper(eager, m.SetEager()))
    pages.settle()
    lazy_id, _, requests = attach(state, "lazy")
    effects = state.set_enabled("big", True, reply_to=b"c")
    assert len(state.table) == SMALL  # none yet: they go in place on the next turns
    assert sum(isinstance(e, Send) and isinstance(e.msg, m.MapEager) for e in effects) == 0
    pages.take(effects)
    sub = state.regions["big"].submappings[BIG_PIECES - 1]
    last = state.regions["big"].absolute(sub)  # the last piece, not in place yet
    out = state.handle_mapper(requests, m.SendMappings(MemoryRange.from_size(last.start, PAGE)))
    assert [e.msg for e in out if isinstance(e, Send)] == [
        m.Map(last, sub.mappable_id, sub.file_offset, True)
    ]
    pages.take(out)
    hole = MemoryRange.from_size(BIG + 2 * 500 * PAGE + PAGE, PAGE)
    out = state.handle_mapper(requests, m.SendMappings(hole))
    assert [e.msg for e in out if isinstance(e, Send)] == [m.NoMapping(hole)]
    steps = 0
    while state.has_steps:
        assert pages.replies == []
        before = len(state.table)
        pages.take(state.step())
        assert len(state.table) - before <= AT_ONCE
        steps += 1
    assert steps >= BIG_PIECES // AT_ONCE
    assert [type(msg) for _, msg in pages.replies] == [m.ControlReply]
    assert state.mappers[lazy_id].held.items() == [(last, sub.mappable_id)]
    assert len(state.mappers[eager_id].held) == SMALL + BIG_PIECES
    pages.settle()
    check(state, pages)


def test_changes_mid_activation(state: ManagerState) -> None:
    """A hole punched, a piece replaced, the region moved, disabled and removed while its
    pieces are still being put in place: each change sees them all, and what is not put in
    place by then never is."""
    pages = Pages(state)
    _, eager, _ = attach(state, "eager")
    pages.take(state.handle_mapper(eager, m.SetEager()))
    ((lazy_id, _),) = lazy_holding_everything(state, pages, 1)
    pages.settle()
    pages.take(state.set_enabled("big", True, reply_to=b"c1"))
    late = 2 * (BIG_PIECES - 3) * PAGE  # an offset not in place yet
    pages.take(state.change_mappings("big", late, PAGE, b"c2"))
    pages.take(
        state.change_mappings("big", late + 2 * PAGE, PAGE, b"c3", replace=("memfd", None, 0, True))
    )
    subs = state.regions["big"].submappings
    replaced = subs[subs.span(late + 2 * PAGE, late + 3 * PAGE)[0]]
    assert (replaced.offset, replaced.file_offset) == (late + 2 * PAGE, 0)
    hit = state.table.lookup(BIG + late + 2 * PAGE)
    assert hit is not None and hit[1].mappable_id == replaced.mappable_id
    assert state.table.lookup(BIG + late) is None  # the hole
    pages.take(state.step())
    assert len([r for r, mp in state.table.items() if mp.region == "big"]) < BIG_PIECES
    check_holders(state, pages)
    pages.take(state.move_region("big", 2 * BIG, reply_to=b"c4"))
    pages.take(state.step())
    pages.take(fault_everything(state, b"lazy0-r", MemoryRange(2 * BIG, 3 * BIG)))
    # the fault over the whole region put every piece in place and mapped each
    assert len(state.mappers[lazy_id].held) == SMALL + BIG_PIECES - 1
    check_holders(state, pages)
    pages.take(state.step())
    pages.take(state.set_enabled("big", False, reply_to=b"c5"))
    assert not any(mp.region == "big" for _, mp in state.table.items())
    pages.take(state.set_enabled("big", True, reply_to=b"c6"))
    pages.take(state.step())
    pages.take(state.remove_region("big", reply_to=b"c7"))
    pages.settle()
    assert sorted(who for who, _ in pages.replies) == [f"c{i}".encode() for i in range(1, 8)]
    assert all(isinstance(msg, m.ControlReply) for _, msg in pages.replies)
    assert "big" not in state.regions and not state.unplaced
    check(state, pages)


def test_uncovering_many_regions_puts_them_in_place_and_refills_in_steps(
    state: ManagerState,
) -> None:
    """Disabling a region that hid 400 others that a lazy mapper held (as the cover): they go
    in the table a batch per step, a fault meanwhile is answered, and the holder is refilled
    with all of them before the answer."""
    pages = Pages(state)
    cover = MemoryRange(BASE, BASE + 2 * SMALL * PAGE)
    state.add_region("cover", cover.start, cover.end - cover.start, True, priority=1)
    ((lazy_id, lazy),) = lazy_holding_everything(state, pages, 1)
    pages.settle()
    effects = state.set_enabled("cover", False, reply_to=b"c")
    assert len(state.table) <= AT_ONCE < SMALL
    pages.take(effects)
    pages.take(state.handle_mapper(b"lazy0-r", m.SendMappings(small(SMALL - 1))))
    assert pages.mapped[lazy].keys() == {small(SMALL - 1).start}
    while state.has_steps:
        assert pages.replies == []
        pages.take(state.step())
    assert [type(msg) for _, msg in pages.replies] == [m.ControlReply]
    assert len(state.mappers[lazy_id].held) == SMALL
    pages.settle()
    check(state, pages)


def test_answers_take_their_mapeager_records_as_they_come(state: ManagerState) -> None:
    """A change that pushed many MapEager frees their records one answer at a time, not all
    in its last answer's turn."""
    pages = Pages(state)
    for k in range(2):
        _, eager, _ = attach(state, f"eager{k}")
        pages.take(state.handle_mapper(eager, m.SetEager()))
    pages.settle()
    effects = state.set_enabled("big", True, reply_to=b"c")
    (op,) = state.unfinished()
    records = 0
    pages.take(effects)
    while state.has_steps:
        pages.take(state.step())
        records = max(records, len(op.eager))
    assert pages.replies and op.eager == {}
    assert records <= STEP_MESSAGES


@pytest.mark.parametrize("seed", range(12))
def test_random_interleavings_leave_every_mapper_as_the_table_says(
    state: ManagerState, seed: int
) -> None:
    rnd = random.Random(seed)
    pages = Pages(state)
    cover = MemoryRange(BASE, BASE + 2 * SMALL * PAGE)
    state.add_region("cover", cover.start, cover.end - cover.start, True, priority=1)
    _, eager, _ = attach(state, "eager")
    pages.take(state.handle_mapper(eager, m.SetEager()))
    lazy = {k: attach(state, f"lazy{k}") for k in range(3)}
    names = 3
    asked = 0
    for _ in range(120):
        what = rnd.random()
        gpa = rnd.choice([BASE, BIG, 2 * BIG])
        try:
            if what < 0.3 and lazy:
                _, stream, requests = lazy[rnd.choice(list(lazy))]
                page = gpa + rnd.randrange(BIG_SIZE // PAGE) * PAGE
                if page not in pages.mapped.get(stream, {}):
                    fault = m.SendMappings(MemoryRange.from_size(page, PAGE))
                    pages.take(state.handle_mapper(requests, fault))
            elif what < 0.5:
                if state.has_steps:
                    pages.take(state.step())
                else:
                    state.work()
            elif what < 0.58:
                name = rnd.choice(["big", "cover"])
                on = rnd.random() < 0.6
                pages.take(state.set_enabled(name, on, reply_to=b"c"))
                asked += 1
            elif what < 0.64:
                pages.take(state.move_region("big", rnd.choice([BIG, 2 * BIG]), reply_to=b"c"))
                asked += 1
            elif what < 0.72:
                offset = rnd.randrange(BIG_SIZE // PAGE - 4) * PAGE
                replace = ("memfd", None, 0, True) if rnd.random() < 0.5 else None
                size = PAGE * rnd.randrange(1, 4)
                pages.take(state.change_mappings("big", offset, size, b"c", replace=replace))
                asked += 1
            elif what < 0.78 and lazy:
                k = rnd.choice(list(lazy))
                _, stream, _ = lazy.pop(k)
                pages.take(state.handle_mapper(stream, m.Detach()))
                pages.mapped.pop(stream, None)
            elif what < 0.84:
                lazy[names] = attach(state, f"lazy{names}")
                names += 1
            elif what < 0.9:
                i = rnd.randrange(SMALL)
                name = f"r{i:05d}"
                if name in state.regions:
                    pages.take(state.remove_region(name, reply_to=b"c"))
                else:
                    pages.take(state.add_region(name, small(i).start, PAGE, True, reply_to=b"c"))
                asked += 1
            elif what < 0.93 and lazy:
                k = rnd.choice(list(lazy))
                _, stream, _ = lazy.pop(k)  # eager from now on
                pages.take(state.handle_mapper(stream, m.SetEager()))
        except Refused:
            pass  # (not asked: refused at once)
        check_holders(state, pages)  # at every moment, not only at the end
    pages.settle()
    assert len(pages.replies) == asked
    check(state, pages)


def test_holdings_reported_mid_activation_are_checked_against_every_piece() -> None:
    """A mapper registering again reports what it maps while an activation is still putting
    pieces in place: those pieces go in place first, so what it holds of them is kept, not
    unmapped as if the table did not have it."""

    class Store(RecordingStore):
        def identity(self, mappable_id: int) -> tuple[int, int]:
            return (1, mappable_id)

    state = ManagerState(Store(), address_space=1 << 36)
    state.state_id = b"s" * 16
    state.add_region("big", BIG, BIG_SIZE, True, enabled=False)
    for i in range(BIG_PIECES - 1):
        state.change_mappings("big", (2 * i + 1) * PAGE, PAGE)
    state.set_enabled("big", True)
    assert state.unplaced and len(state.table) < BIG_PIECES
    sub = state.regions["big"].submappings[BIG_PIECES - 2]
    last = state.regions["big"].absolute(sub)
    entry = state.register_mapper("back", 1)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    state.handle_mapper(b"st", m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    held = (last.start, last.end - last.start, sub.mappable_id, sub.file_offset, 1)
    out = state.handle_fd_message(entry.id, m.Holdings((sub.mappable_id, 1, sub.mappable_id), held))
    assert [e.msg for e in out or [] if isinstance(e, Send)] == []
    assert state.mappers[entry.id].held.items() == [(last, sub.mappable_id)]
    assert not state.unplaced and len(state.table) == BIG_PIECES


def test_a_mapper_departed_before_a_hide_is_passed_by(state: ManagerState) -> None:
    """A mapper gone with its marks among the table's holders not taken off yet (later.py):
    hiding the regions it held sends it nothing, takes its ranges like a live holder's, and
    leaves no mark of it anywhere once the work is done."""
    pages = Pages(state)
    (gone_id, gone), (_, stay) = lazy_holding_everything(state, pages, 2)
    pages.take(state.handle_mapper(gone, m.Detach()))
    assert gone_id in state.departed
    cover = MemoryRange(BASE, BASE + 2 * SMALL * PAGE)
    effects = state.add_region("cover", cover.start, cover.end - cover.start, True, priority=1)
    assert [e.identity for e in effects if isinstance(e, Send) and isinstance(e.msg, m.Unmap)] == [
        stay
    ]
    pages.mapped.pop(gone)
    pages.take(effects)
    pages.settle()
    assert not state.departed
    assert all(gone_id not in mp.holders for _, mp in state.table.items())
    check(state, pages)


def test_regions_shown_again_before_their_tallies_were_emptied_count_afresh(
    state: ManagerState,
) -> None:
    """Regions hidden together keep their holders' counts until a later turn empties them:
    a listing meanwhile names no holder, and showing them again before that counts afresh."""
    from membacking.manager.state import region_info

    pages = Pages(state)
    lazy_holding_everything(state, pages, 2)
    cover = MemoryRange(BASE, BASE + 2 * SMALL * PAGE)
    pages.take(state.add_region("cover", cover.start, cover.end - cover.start, True, priority=1))
    while state.has_steps:  # the cover's refill (no work: that would empty the tallies)
        pages.take(state.step())
    assert state.stale_tallies
    assert region_info(state, state.regions["r00005"])["holders"] == []
    assert region_info(state, state.regions["cover"])["holders"] == [1, 2]
    pages.take(state.set_enabled("cover", False, reply_to=b"c"))
    while state.has_steps:  # no work in between: the tallies are emptied as they are read
        pages.take(state.step())
    assert [type(msg) for _, msg in pages.replies] == [m.ControlReply]
    check(state, pages)
    assert region_info(state, state.regions["r00005"])["holders"] == [1, 2]


def test_a_move_does_not_walk_the_regions_pieces(
    state: ManagerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moving a region of many pieces looks at none of them in the request's turn (which
    GPA it may go to follows from its mappables: looking at each of 10,010 took 3 ms)."""
    from membacking.manager.regions import Pieces

    pages = Pages(state)
    pages.take(state.set_enabled("big", True))
    pages.settle()
    walked: list[int] = []
    real = Pieces.__iter__

    def counted(self: Pieces) -> Iterator[SubMapping]:
        walked.append(len(self))
        return real(self)

    monkeypatch.setattr(Pieces, "__iter__", counted)
    effects = state.move_region("big", 2 * BIG, reply_to=b"c")
    assert walked == []
    monkeypatch.undo()
    pages.take(effects)
    pages.settle()
    assert [type(msg) for _, msg in pages.replies] == [m.ControlReply]
    check(state, pages)
