"""Changes that send many messages do it a bounded batch per step (steps.py): an eager mapper's
replay of every mapping, and the MapEager of many new mappings. Faults are served between the
steps, answers wait for the last batch, and a change arriving mid-replay never leaves a mapper
with memory of a removed region."""

from __future__ import annotations

import pytest
from test_manager_state import RecordingStore, attach, fault_everything, msgs

from membacking.manager.state import Effect, ManagerState, Send, region_info
from membacking.manager.steps import STEP_MESSAGES
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange

PAGE = 4096
BASE = 1 << 20
REGIONS = 5 * STEP_MESSAGES  # five batches' worth


class Mappers:
    """Simulated mappers: what each maps (MapEager and Map in, Unmap out), acknowledging
    every MapEager, Unmap and Release it gets; control replies are kept."""

    def __init__(self, state: ManagerState) -> None:
        self.state = state
        self.mapped: dict[bytes, set[MemoryRange]] = {}
        self.replies: list[m.Message] = []
        self.eager_results: dict[bytes, list[m.EagerResult]] = {}

    def take(self, effects: list[Effect]) -> None:
        """Carry out `effects`, and the acknowledgements they call for, until none is left."""
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if not isinstance(effect, Send):
                continue
            msg, who = effect.msg, effect.identity
            mapped = self.mapped.setdefault(who, set())
            if isinstance(msg, m.ControlReply | m.Error):
                self.replies.append(msg)
            elif isinstance(msg, m.EagerResult):
                self.eager_results.setdefault(who, []).append(msg)
            elif isinstance(msg, m.Map | m.MapEager):
                assert msg.range not in mapped, f"{msg.range} sent twice"
                mapped.add(msg.range)
                if isinstance(msg, m.MapEager):
                    queue += self.state.handle_mapper(who, m.MapAck(msg.seq, True, ""))
            elif isinstance(msg, m.Unmap):
                mapped -= {r for r in mapped if msg.range.contains(r)}
                queue += self.state.handle_mapper(who, m.UnmapAck(msg.seq))
            elif isinstance(msg, m.Release):
                queue += self.state.handle_mapper(who, m.UnmapAck(msg.seq))

    def finish(self) -> int:
        """Run the steps left until none is; returns how many there were."""
        steps = 0
        while self.state.has_steps:
            self.take(self.state.step())
            steps += 1
        return steps


@pytest.fixture
def state() -> ManagerState:
    state = ManagerState(RecordingStore(), address_space=1 << 36)
    for i in range(REGIONS):
        state.add_region(f"r{i:05d}", BASE + 2 * i * PAGE, PAGE, True)
    return state


def region_range(i: int) -> MemoryRange:
    return MemoryRange.from_size(BASE + 2 * i * PAGE, PAGE)


def table_ranges(state: ManagerState) -> set[MemoryRange]:
    return {r for r, _ in state.table.items()}


def count(effects: list[Effect], kind: type) -> int:
    return sum(isinstance(msg, kind) for msg in msgs(effects))


def test_an_eager_replay_is_sent_in_batches_with_faults_served_between(
    state: ManagerState,
) -> None:
    mappers = Mappers(state)
    _, stream, _ = attach(state, "late")
    other_id, other, _ = attach(state, "other")
    first = state.handle_mapper(stream, m.SetEager())
    assert 0 < count(first, m.MapEager) <= STEP_MESSAGES  # not all of them in one turn
    assert state.has_steps
    mappers.take(first)
    assert stream not in mappers.eager_results  # not before the replay is complete
    assert not state.mappers[state.mapper_of(stream) or 0].eager
    steps = 0
    while state.has_steps:
        batch = state.step()
        assert count(batch, m.MapEager) <= STEP_MESSAGES
        mappers.take(batch)
        steps += 1
        # a fault between two steps is answered at once
        served = state.handle_fd_message(other_id, m.SendMappings(region_range(steps)))
        assert [type(msg) for msg in msgs(served or [], other)] == [m.Map]
    assert steps >= REGIONS // STEP_MESSAGES - 1
    assert mappers.eager_results[stream] == [m.EagerResult(True, "")]
    assert mappers.mapped[stream] == table_ranges(state)  # each exactly once (checked in take)


def test_changes_mid_replay_leave_no_memory_of_a_removed_region(state: ManagerState) -> None:
    mappers = Mappers(state)
    _, stream, _ = attach(state, "late")
    mappers.take(state.handle_mapper(stream, m.SetEager()))
    assert state.has_steps
    sent = set(mappers.mapped[stream])
    early = next(i for i in range(REGIONS) if region_range(i) in sent)
    late = REGIONS - 1  # not reached yet
    assert region_range(late) not in sent
    # removals of a region sent already and of one not reached yet; a region re-mapped
    # ahead of the replay; a region added ahead of it and one behind it
    mappers.take(state.remove_region(f"r{early:05d}", reply_to=b"c1"))
    mappers.take(state.remove_region(f"r{late:05d}", reply_to=b"c2"))
    mappers.take(
        state.change_mappings(f"r{late - 1:05d}", 0, PAGE, b"c3", replace=("memfd", None, 0, True))
    )
    mappers.take(state.add_region("ahead", BASE + 2 * REGIONS * PAGE, PAGE, True, reply_to=b"c4"))
    mappers.take(state.add_region("behind", BASE - PAGE, PAGE, True, reply_to=b"c5"))
    # every change waits for the upgrading mapper's acks only, not for the whole replay
    assert [type(r) for r in mappers.replies] == [m.ControlReply] * 5
    assert region_range(early) not in mappers.mapped[stream]
    mappers.finish()
    assert mappers.eager_results[stream] == [m.EagerResult(True, "")]
    assert region_range(late) not in mappers.mapped[stream]
    assert mappers.mapped[stream] == table_ranges(state)
    entry = state.mappers[state.mapper_of(stream) or 0]
    assert set(entry.held) == table_ranges(state)


def test_a_mapper_gone_mid_replay_ends_it(state: ManagerState) -> None:
    mappers = Mappers(state)
    mapper_id, stream, _ = attach(state, "late")
    mappers.take(state.handle_mapper(stream, m.SetEager()))
    assert [op.what for op in state.unfinished()] == [f"upgrade mapper {mapper_id}"]
    state.handle_mapper(stream, m.Detach())
    assert state.step() == []
    assert not state.has_steps and state.unfinished() == []
    assert all(mapper_id not in region_info(state, r)["holders"] for r in state.regions.values())
    while state.has_work:  # its marks among the table's holders go on later turns
        state.work()
    for _, mapping in state.table.items():
        assert mapper_id not in mapping.holders
    assert all(mapper_id not in r.holder_tally for r in state.regions.values())


def test_activating_many_regions_pushes_to_eager_mappers_in_batches(
    state: ManagerState,
) -> None:
    mappers = Mappers(state)
    _, stream, _ = attach(state, "eager")
    mappers.take(state.handle_mapper(stream, m.SetEager()))
    mappers.finish()
    assert mappers.eager_results[stream] == [m.EagerResult(True, "")]
    cover = MemoryRange(BASE, BASE + 2 * REGIONS * PAGE)
    mappers.take(state.add_region("cover", cover.start, cover.end - cover.start, True, priority=1))
    mappers.finish()  # (its held ranges of the regions hidden are deleted first, in steps)
    assert mappers.mapped[stream] == {cover}
    mappers.replies.clear()
    effects = state.set_enabled("cover", False, reply_to=b"c")
    assert count(effects, m.MapEager) <= STEP_MESSAGES
    assert state.has_steps
    mappers.take(effects)
    assert mappers.replies == []  # not before every region was pushed and acknowledged
    # a region removed before its turn came is never pushed
    mappers.take(state.remove_region(f"r{REGIONS - 1:05d}", reply_to=b"c2"))
    assert [type(r) for r in mappers.replies] == [m.ControlReply]
    mappers.finish()
    assert [type(r) for r in mappers.replies] == [m.ControlReply] * 2
    assert mappers.mapped[stream] == table_ranges(state)
    assert len(mappers.mapped[stream]) == REGIONS - 1


def test_shutdown_answers_a_change_still_sending(state: ManagerState) -> None:
    mappers = Mappers(state)
    _, stream, _ = attach(state, "eager")
    mappers.take(state.handle_mapper(stream, m.SetEager()))
    mappers.finish()
    cover = MemoryRange(BASE, BASE + 2 * REGIONS * PAGE)
    mappers.take(state.add_region("cover", cover.start, cover.end - cover.start, True, priority=1))
    mappers.finish()
    mappers.take(state.set_enabled("cover", False, reply_to=b"waiting"))
    assert state.has_steps
    out = state.shutdown("stopping")
    assert any(
        isinstance(e, Send) and e.identity == b"waiting" and isinstance(e.msg, m.Error) for e in out
    )
    assert not state.has_steps


def test_many_cuts_of_one_holder_are_settled_a_few_at_a_time(state: ManagerState) -> None:
    """Each cut leaves a holder a window of held ranges to delete later (`work`): a step
    deletes a bounded number of windows, not all of them (200 windows of each of 72 holders
    took 20 to 35 ms of CPU time in one step)."""
    from membacking.manager.later import WORK_PER_WINDOW

    mappers = Mappers(state)
    mapper_id, _, requests = attach(state, "lazy")
    everything = MemoryRange(BASE, BASE + 2 * REGIONS * PAGE)
    mappers.take(fault_everything(state, requests, everything))
    held = state.mappers[mapper_id].held
    assert len(held) == REGIONS
    for i in range(1, REGIONS):  # a removal each: a cut each
        mappers.take(state.remove_region(f"r{i:05d}", reply_to=b"c"))
    assert held.windows == REGIONS - 1 and len(held) == 1
    state.work(budget=10 * WORK_PER_WINDOW)
    assert 0 < held.windows < REGIONS - 1  # some settled, not all
    assert state.has_work
    while state.has_work:
        state.work(budget=10 * WORK_PER_WINDOW)
    assert held.windows == 0 and [r for r, _ in held.items()] == [region_range(0)]
    assert held.mappables() == {state.regions["r00000"].submappings[0].mappable_id}
    # what it holds is read right between two steps too
    mappers.take(state.remove_region("r00000", reply_to=b"c"))
    assert len(held) == 0 and held.items() == []


def test_windows_taken_wait_in_order_and_a_cut_across_them_settles_first() -> None:
    """A `Held` keeps the windows cuts took in address order (a cut finds its neighbours by
    bisection, not by a scan of every window); a cut over ranges an earlier cut took and that
    are not deleted yet settles them first; a partial settle deletes the last windows."""
    from membacking.manager.held import Held

    held = Held()
    pages = [MemoryRange.from_size(i * PAGE, PAGE) for i in range(8)]
    for i, r in enumerate(pages):
        held[r] = i
    for i in (5, 1, 3):  # out of address order
        taken = held.take_later(pages[i])
        assert taken is not None and taken.count == 1
    assert held.windows == 3 and len(held) == 5
    assert held.settle(1) == 1  # the last window: pages[5]
    assert held.windows == 2 and held.later == 2
    taken = held.take_later(MemoryRange(PAGE, 4 * PAGE))  # across pages 1 and 3, taken before
    assert taken is not None and taken.count == 1  # page 2 only: 1 and 3 were settled first
    assert held.settle() == 1
    assert [r for r, _ in held.items()] == [pages[0], pages[4], pages[6], pages[7]]
    assert held.bytes == 8 * PAGE  # the caller takes the bytes off (forget_bytes)


def test_a_push_deletes_a_mappers_many_cuts_a_few_per_step_before_it_sends(
    state: ManagerState,
) -> None:
    """An eager mapper's first MapEager after hundreds of cuts would delete every window of
    held ranges they left in one turn (about 3 us each); the push deletes a bounded number per
    step first, then sends."""
    from membacking.manager.steps import WINDOWS_PER_MESSAGE

    mappers = Mappers(state)
    mapper_id, stream, _ = attach(state, "eager")
    mappers.take(state.handle_mapper(stream, m.SetEager()))
    mappers.finish()
    held = state.mappers[mapper_id].held
    for i in range(1, REGIONS):  # a removal each: a cut (a window of held ranges) each
        mappers.take(state.remove_region(f"r{i:05d}", reply_to=b"c"))
    assert held.windows == REGIONS - 1
    new = MemoryRange.from_size(BASE + 2 * REGIONS * PAGE, PAGE)
    first = state.add_region("new", new.start, PAGE, True)
    # the request's own turn deleted at most a step's worth of the 479 windows, sent nothing
    assert held.windows > 0
    assert REGIONS - 1 - held.windows <= STEP_MESSAGES * WINDOWS_PER_MESSAGE
    assert count(first, m.MapEager) == 0 and state.has_steps
    mappers.take(first)
    windows = held.windows
    while state.has_steps:
        mappers.take(state.step())
        assert windows - held.windows <= STEP_MESSAGES * WINDOWS_PER_MESSAGE
        windows = held.windows
    assert mappers.mapped[stream] == {region_range(0), new}


@pytest.mark.parametrize("seed", range(40))
def test_held_ranges_taken_and_settled_in_batches_match_a_model(seed: int) -> None:
    """Windows taken in any order, deleted a few at a time (one copy of the lists for many):
    what is held, and the mappables counted, match a plain dict."""
    import random

    from membacking.manager.held import Held

    rnd = random.Random(seed)
    held, model = Held(), {}
    for i in range(60):
        rng, mappable_id = MemoryRange.from_size(i * PAGE, PAGE), rnd.randrange(5)
        held[rng] = model[rng] = mappable_id
    for _ in range(rnd.randrange(1, 15)):
        a = rnd.randrange(60)
        cut = MemoryRange(a * PAGE, min(60, a + rnd.randrange(1, 4)) * PAGE)
        held.take_later(cut)
        model = {r: i for r, i in model.items() if not r.overlaps(cut)}
        if rnd.random() < 0.2:
            held.settle(rnd.randrange(1, 4))
    while held.windows:
        held.settle(rnd.randrange(1, 5))
    assert dict(held.items()) == model
    assert held.mappables() == set(model.values())


def test_a_refill_of_many_runs_looks_at_a_bounded_number_per_step(state: ManagerState) -> None:
    """A refill of 480 runs (each one region the lazy holder lost, each finding that region in
    the table again): a step looks at a bounded number of them, and the change answers after
    the last one."""
    from membacking.manager.steps import LOOK_FACTOR, RUN_LOOKS, Refill

    mappers = Mappers(state)
    mapper_id, stream, _ = attach(state, "lazy")
    op = state.start_op("refill", b"c")
    op.on_done = lambda op: state._reply(op, "done")
    runs = [(mapper_id, [region_range(i)]) for i in range(REGIONS)]
    mappers.take(state.steps.begin(Refill(runs, op)))
    assert mappers.replies == []  # not before the refill is complete
    most = LOOK_FACTOR * STEP_MESSAGES // (RUN_LOOKS + 1) + 1
    refill = state.steps._queue[0]
    assert isinstance(refill, Refill) and len(refill.runs) == REGIONS
    assert refill.index <= most
    while state.has_steps:
        before = refill.index
        mappers.take(state.step())
        assert refill.index - before <= most
    # its runs are freed a batch at a time by `work`, not all at once as the step returns
    assert refill.runs == [] and any(len(batch) == REGIONS for batch in state._trash)
    assert mappers.mapped[stream] == table_ranges(state)
    assert mappers.replies == [m.ControlReply("done")]
