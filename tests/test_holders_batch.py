"""A mapper registering again that holds nothing yet is recorded as the holder of everything it
kept in one batch (`HolderBatch`, `Held.fill`), not mapping by mapping: the same holders,
tallies and held ranges as one by one, and a removal still reaches it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from membacking.manager.backing import MemfdStore
from membacking.manager.held import Held
from membacking.manager.model import HolderBatch, Holders, Send
from membacking.manager.state import ManagerState, region_info
from membacking.manager.statedir import StateDir
from membacking.protocol import messages as m
from membacking.protocol.holdings import holdings_messages
from membacking.protocol.ranges import MemoryRange

MiB = 1 << 20


def _registered(state: ManagerState) -> Any:
    entry = state.register_mapper(f"m{len(state.mappers)}", 1)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    state.handle_mapper(f"s{entry.id}".encode(), m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    return entry


def test_a_mapper_holding_nothing_is_recorded_as_holder_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdir = StateDir(tmp_path / "state")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    state.state_id = b"s" * 16
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        state.add_region(name, 2 * i * MiB, MiB, True)
    ids = [state.regions[n].submappings[0].mappable_id for n in names]
    fds = [x for i in ids for x in (i, *(store.identity(i) or (0, 0)))]
    # out of address order, `a` twice (as a hostile mapper may list it), one stale entry
    maps = [2 * MiB, MiB, ids[1], 0, 1, 0, MiB, ids[0], 0, 1, 0, MiB, ids[0], 0, 1]
    maps += [4 * MiB, MiB, ids[2], 0, 1, 9 * MiB, MiB, ids[0], 0, 1]
    adds: list[int] = []
    add = Holders.add

    def counted(self: Holders, mapper_id: int) -> bool:
        adds.append(mapper_id)
        return add(self, mapper_id)

    monkeypatch.setattr(Holders, "add", counted)
    kept = [MemoryRange(0, MiB), MemoryRange(2 * MiB, 3 * MiB), MemoryRange(4 * MiB, 5 * MiB)]
    batched = [_registered(state), _registered(state)]  # the second reuses the first's check
    for entry in batched:
        for msg in holdings_messages(fds, maps, packed=True):
            out = state.handle_fd_message(entry.id, msg) or []
            assert [e.msg.range for e in out if isinstance(e.msg, m.Unmap)] == [
                MemoryRange(9 * MiB, 10 * MiB)
            ]
        assert list(entry.held) == kept and entry.held.bytes == 3 * MiB
        assert all(entry.held.maps(i) for i in ids) and entry.held.get(kept[0]) == ids[0]
    assert adds == []  # no mapping by mapping
    # one that holds something already is recorded mapping by mapping, to the same effect
    late = _registered(state)
    first, rest = holdings_messages(fds, maps[5:10], True), holdings_messages(fds, maps, True)
    for msg in [*first, *rest]:
        state.handle_fd_message(late.id, msg)
    assert sorted(adds) == [late.id] * 4  # a, then b, a again (already held: False), c
    assert list(late.held) == kept and late.held.bytes == 3 * MiB
    everyone = [e.id for e in batched] + [late.id]
    for name in names:
        region = state.regions[name]
        assert region_info(state, region)["holders"] == everyone
        assert region.tally() == Counter(dict.fromkeys(everyone, 1))
        (piece,) = [mp for _, mp in state.table.items() if mp.region == name]
        assert sorted(piece.holders) == everyone
    out = state.remove_region("b")  # every holder is told, the batched ones too
    told = {e.identity for e in out if isinstance(e, Send) and isinstance(e.msg, m.Unmap)}
    assert told == {f"s{i}".encode() for i in everyone}
    store.close_all()
    sdir.release(remove=True)


def test_a_batch_is_not_recorded_for_a_mapper_counted_anywhere_already() -> None:
    """`HolderBatch.add_new` records nothing (False) for a mapper that holds one of the
    mappings, or is counted in one of their tallies; else every holder and tally as one by
    one."""
    tally: Counter[int] = Counter()
    pieces = [Holders(tally), Holders(tally), Holders(Counter())]
    batch = HolderBatch([*pieces, pieces[0]])  # the same holders twice count once
    assert len(batch) == 3
    pieces[1].add(7)
    assert not batch.add_new(7) and 7 not in pieces[0] and tally[7] == 1
    tally[8] = 1  # counted for another mapping of the region
    assert not batch.add_new(8) and 8 not in pieces[0]
    assert batch.add_new(9)
    assert all(9 in p for p in pieces) and tally[9] == 2 and pieces[2].tally[9] == 1


def test_held_fill_takes_ranges_only_when_it_holds_nothing() -> None:
    ranges = [MemoryRange(0, 4096), MemoryRange(8192, 16384)]
    held = Held()
    assert held.fill(ranges, [1, 2], 12288, Counter([1, 2]))
    ranges.append(MemoryRange(1 << 20, 2 << 20))  # the caller's lists are not taken
    assert list(held) == ranges[:2] and held.bytes == 12288 and held.maps(2)
    assert not held.fill([MemoryRange(1 << 30, (1 << 30) + 4096)], [3], 4096, Counter([3]))
    assert len(held) == 2 and not held.maps(3)
    taken = held.take_later(MemoryRange(0, 16384))  # taken, not yet deleted: it holds nothing
    assert taken is not None and len(held) == 0
    held.forget_bytes(taken.nbytes())
    assert held.fill(ranges[:1], [5], 4096, Counter([5]))
    assert list(held) == ranges[:1] and held.bytes == 4096 and held.maps(5) and not held.maps(1)
