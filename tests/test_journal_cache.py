"""The journal written after each change: packed from the records kept since the last save, it
is byte for byte the journal of the whole table, and its work does not grow with the regions
that did not change."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_manager_state import attach, msgs
from test_region_scaling import _lines_run

from membacking.manager import journal, journalcache
from membacking.manager.backing import MemfdStore
from membacking.manager.journalcache import JournalEncoder, PackedPieces
from membacking.manager.persist import PersistConfig, Persistence
from membacking.manager.snapshot import capture, restore
from membacking.manager.state import Effect, ManagerState
from membacking.manager.statedir import StateDir
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange
from membacking.runtime import RuntimePaths

MiB = 1 << 20
PAGE = 4096


def test_the_kept_records_make_the_journal_of_the_whole_table(tmp_path: Path) -> None:
    """After every kind of change (and the rollbacks an eager mapper's failure makes, a removal
    asked for and completed, a state adopted at start) the encoder's bytes are those of a
    snapshot captured whole."""
    sdir = StateDir(tmp_path / "s")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    encoder = JournalEncoder()

    def check() -> None:
        whole = journal.encode(capture(state, store, b"i" * 16, "/rt"))
        assert encoder.encode(state, store, b"i" * 16, "/rt") == whole

    check()
    for i in range(20):
        state.add_region(f"r{i:02d}", i * MiB, MiB, True, priority=i % 3)
        check()
    state.add_region("off", None, MiB, True, enabled=False)
    state.add_region("file", None, MiB, True, enabled=False, backing="private")
    check()
    state.set_enabled("r03", False)
    check()
    state.set_enabled("off", True, gpa=64 * MiB)
    check()
    state.move_region("r04", 100 * MiB)
    check()
    state.change_mappings("r05", PAGE, PAGE)
    check()
    state.change_mappings("r06", 2 * PAGE, 4 * PAGE, replace=("memfd", None, 0, True))
    check()
    mapper_id, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(MemoryRange(7 * MiB, 8 * MiB)))
    (unmap,) = [x for x in msgs(state.remove_region("r07")) if isinstance(x, m.Unmap)]
    check()  # being removed: left out at once
    state.handle_mapper(stream, m.UnmapAck(unmap.seq))
    assert "r07" not in state.regions
    check()
    state.add_region("r07", 7 * MiB, MiB, True)  # the name again, a new region
    check()
    # an eager mapper that cannot map: the add, then an enable, are rolled back
    eager_stream = stream  # one mapper only: a private region exists

    def answer(effects: list[Effect], fail: str) -> None:
        """Every MapEager and Unmap answered, MapEagers of region `fail` failing."""
        for x in msgs(effects):
            if isinstance(x, m.MapEager):
                ok = state.table.lookup(x.range.start)[1].region != fail  # type: ignore[index]
                answer(state.handle_mapper(eager_stream, m.MapAck(x.seq, ok, "no room")), fail)
            elif isinstance(x, m.Unmap | m.Release):
                answer(state.handle_mapper(eager_stream, m.UnmapAck(x.seq)), fail)

    answer(state.handle_mapper(eager_stream, m.SetEager()), "")
    answer(state.add_region("new", 200 * MiB, MiB, True), "new")
    assert "new" not in state.regions
    check()
    answer(state.set_enabled("r03", True), "r03")
    assert not state.regions["r03"].enabled
    check()
    state.counters["faults"] += 5
    check()
    del mapper_id

    # adopted at start: a new encoder packs the restored regions the first time
    snap = capture(state, store, b"i" * 16, "/rt")
    sdir.write(snap)
    store.close_all()
    sdir.release(remove=False)
    sdir2 = StateDir(tmp_path / "s")
    sdir2.acquire()
    store = MemfdStore(sdir2)
    state = ManagerState(store, address_space=1 << 32)
    restore(snap, state, store)
    encoder = JournalEncoder()
    check()
    state.remove_region("r01")
    state.change_mappings("r02", 0, PAGE)
    check()
    store.close_all()


def test_a_save_after_one_change_does_not_grow_with_the_regions(tmp_path: Path) -> None:
    """The lines of Python a save runs after one `unmap_range` (and after one `add_region`) are
    the same with 50 regions and with 1,000, the re-mapped region having 11 or 241 pieces:
    every region and piece was captured and encoded again on each change (45-80 ms at 10,000
    regions, before the reply could leave)."""
    persist = Persistence(PersistConfig(state_dir=tmp_path / "s"), RuntimePaths(tmp_path / "rt"))
    store = MemfdStore(persist.dir)
    state = ManagerState(store, address_space=1 << 40)
    persist.open(state, store)
    persist.save(state, store)
    costs = []
    for total in (50, 1000):
        while len(state.regions) < total:
            i = len(state.regions)
            state.add_region(f"r{i:04d}", i * MiB, MiB, True)
        holes = 5 if total == 50 else 120  # and the pieces of the region changed
        for i in range(len(state.regions["r0002"].submappings) // 2, holes):
            state.change_mappings("r0002", (2 * i + 1) * PAGE, PAGE)
        persist.save(state, store)
        state.change_mappings("r0002", (2 * holes + 1) * PAGE, PAGE)
        unmap = _lines_run(lambda: persist.save(state, store))
        state.add_region(f"x{total}", (1 << 38) + total * MiB, MiB, True)
        add = _lines_run(lambda: persist.save(state, store))
        costs.append((unmap, add))
    (unmap_50, add_50), (unmap_1000, add_1000) = costs
    assert unmap_1000 <= unmap_50 + 10, costs
    assert add_1000 <= add_50 + 10, costs
    # and what it wrote is the journal of the whole table
    assert persist.dir.read() == capture(state, store, persist.state_id, str(tmp_path / "rt"))
    persist.close(state, store, clean=True)
    store.close_all()


@pytest.mark.parametrize("seed", range(4))
def test_packed_pieces_in_runs_follow_a_plain_list(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """The packed sub-mappings kept in runs (each run's bytes joined once) give the bytes of
    a plain list through random replacements of windows: inside a run, across runs, empty
    ones (insertions), at the end, and of everything."""
    monkeypatch.setattr(journalcache, "RUN", 4)
    rnd = random.Random(seed)
    plain = [bytes([i % 251]) * rnd.randint(1, 3) for i in range(30)]
    runs = PackedPieces(list(plain))
    for step in range(400):
        lo = rnd.randint(0, len(plain))
        hi = min(len(plain), lo + rnd.choice((0, 1, 2, 5, 13)))
        if step % 97 == 96:
            lo, hi = 0, len(plain)  # everything
        new = [bytes([rnd.randrange(256)]) * rnd.randint(1, 3) for _ in range(rnd.randint(0, 9))]
        plain[lo:hi] = new
        runs.replace(lo, hi, new)
        assert len(runs) == len(plain)
        if step % 3 == 0:
            assert runs.joined() == b"".join(plain), step
    assert runs.joined() == b"".join(plain)
    assert sum(map(len, runs.release())) == len(plain)


def test_pieces_replaced_between_saves_in_small_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same journal with runs of 4 pieces: a region's changes cross runs."""
    monkeypatch.setattr(journalcache, "RUN", 4)
    test_pieces_replaced_between_saves_are_packed_again(tmp_path)


def test_pieces_replaced_between_saves_are_packed_again(tmp_path: Path) -> None:
    """A region's sub-mappings are kept packed one by one: random holes and new backings over
    one region, one to four changes between saves (the window of pieces to pack again spans
    them all), give the journal of the whole table after each save."""
    sdir = StateDir(tmp_path / "s")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    encoder = JournalEncoder()
    state.add_region("ram", 0, 256 * PAGE, True)
    state.add_region("other", MiB, PAGE, True)
    rand = random.Random(7)
    for _ in range(120):
        for _ in range(rand.randint(1, 4)):
            offset, size = rand.randrange(256) * PAGE, rand.randint(1, 6) * PAGE
            size = min(size, 256 * PAGE - offset)
            replace = ("memfd", None, 0, True) if rand.random() < 0.4 else None
            state.change_mappings("ram", offset, size, replace=replace)
            if rand.random() < 0.1:  # the region's own fields change too, its pieces not
                state.set_enabled("ram", not state.regions["ram"].enabled)
        whole = journal.encode(capture(state, store, b"i" * 16, "/rt"))
        assert encoder.encode(state, store, b"i" * 16, "/rt") == whole
    assert len(state.regions["ram"].submappings) > 20
    store.close_all()


def test_what_a_removal_lets_go_of_is_freed_on_later_turns_not_in_the_save() -> None:
    """The save after removing a region of 400 pieces neither frees its pieces nor their packed
    records: both go to `work`, freed a batch at a time on later turns of the loop. Freeing
    those of 10,010 pieces made that save the longest, 5 to 6 ms of CPU time."""
    import weakref

    store = MemfdStore()
    state = ManagerState(store, address_space=1 << 36)
    encoder = JournalEncoder()
    state.add_region("ram", 0, 800 * PAGE, True)
    state.add_region("other", 1 << 30, PAGE, True)
    for i in range(399):
        state.change_mappings("ram", (2 * i + 1) * PAGE, PAGE)
    subs = list(state.regions["ram"].submappings)
    assert len(subs) == 400
    encoder.encode(state, store, b"i" * 16, "/rt")
    while state.has_work:
        state.work()
    alive = [weakref.ref(s) for s in subs]
    del subs
    effects = state.remove_region("ram", reply_to=b"c")  # no mapper holds it: done at once
    assert [type(msg) for msg in msgs(effects)] == [m.ControlReply]
    encoder.encode(state, store, b"i" * 16, "/rt")
    assert all(ref() is not None for ref in alive)  # nothing of it was freed by the save
    steps = 0
    while state.has_work:
        state.work(budget=64 * 100)  # about 100 objects a step
        steps += 1
    assert all(ref() is None for ref in alive)
    assert steps >= 8  # 400 pieces and 400 packed records, about 100 at a time
    store.close_all()
