"""The journal's bytes kept up to date change by change. Each region's record and those of its
backings are packed once and kept; a save packs again only the regions the state machine marked
as changed (`TableState.changed_regions`) and joins the kept bytes: the same bytes as
`journal.encode(snapshot.capture(...))`, for work that grows with the change, not the table.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections import Counter
from dataclasses import dataclass

from ..protocol.messages import PRIVATE_MAPPABLE
from .backing import MemfdStore
from .journal import encode_packed, head, pack, pack_region_joined
from .regions import Pieces, Region
from .snapshot import region_fields, snapshot_of, sub_record
from .state import ManagerState

_MAPPABLE = operator.attrgetter("mappable_id")
#: packed sub-mappings per run of `PackedPieces` (a run is split past twice as many)
RUN = 256


class PackedPieces:
    """A region's sub-mappings packed one by one, in runs of about RUN whose joined bytes are
    kept: a change replaces a window of them and joins again only the runs it touched, then
    the region's bytes are a join of the runs. Joining 31,000 pieces' bytes at each save took
    0.8 ms of the 1.3 ms a save of one region of 31,000 pieces cost."""

    __slots__ = ("_joined", "_runs", "_starts")

    def __init__(self, packed: list[bytes]) -> None:
        self._runs: list[list[bytes]] = []
        self._joined: list[bytes | None] = []
        self._starts: list[int] = []
        self._fill(packed)

    def _fill(self, packed: list[bytes]) -> None:
        self._runs = [packed[i : i + RUN] for i in range(0, len(packed), RUN)]
        self._joined = [None] * len(self._runs)
        self._index()

    def _index(self) -> None:
        self._starts = list(itertools.accumulate((len(r) for r in self._runs), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def replace(self, lo: int, hi: int, new: list[bytes]) -> None:
        """Put `new` in place of the pieces [lo, hi)."""
        starts, runs = self._starts, self._runs
        if not runs:  # (all removed earlier): start over from `new`
            self._fill(new)
            return
        # the runs holding lo and hi - 1 (the last run takes what is appended at the end)
        i = max(0, min(bisect.bisect_right(starts, lo) - 1, len(runs) - 1))
        j = max(i, min(bisect.bisect_right(starts, max(hi - 1, lo)) - 1, len(runs) - 1))
        merged = list(itertools.chain.from_iterable(runs[i : j + 1]))  # (in C)
        base = starts[i]
        merged[lo - base : hi - base] = new
        if len(merged) > 2 * RUN:
            parts = [merged[k : k + RUN] for k in range(0, len(merged), RUN)]
        else:
            parts = [merged] if merged else []
        runs[i : j + 1] = parts
        self._joined[i : j + 1] = [None] * len(parts)
        self._index()

    def joined(self) -> bytes:
        """Every piece's bytes, in order."""
        joined = self._joined
        for k, part in enumerate(joined):
            if part is None:
                joined[k] = b"".join(self._runs[k])
        return b"".join(joined)  # type: ignore[arg-type]

    def release(self) -> list[list[bytes]]:
        """Its runs, for the caller to free a batch at a time (`free_later`)."""
        runs, self._runs, self._joined, self._starts = self._runs, [], [], [0]
        return runs


@dataclass
class _Kept:
    """What is kept of one region: the very region and `Pieces` packed, each sub-mapping's
    bytes and mappable id (in the pieces' order), and how many pieces use each mappable."""

    region: Region
    pieces: Pieces
    packed: PackedPieces
    ids: list[int]
    uses: Counter[int]


class JournalEncoder:
    """The packed records of one state's regions (by creation order, as `capture` lists them)
    and backings (by mappable id), brought up to date with the changed regions at each save.
    A region's sub-mappings are kept packed one by one too: re-mapping a page of a region of
    10,000 pieces packs the pieces it replaced (`Pieces.changed`), not all 10,000. One encoder
    follows a state (it takes the pieces' windows for itself)."""

    def __init__(self) -> None:
        self._primed = False
        self._kept: dict[str, _Kept] = {}
        self._orders: list[int] = []  # sorted, beside the packed regions
        self._regions: list[bytes] = []
        self._backing_refs: Counter[int] = Counter()  # mappable -> packed regions using it
        self._backing_ids: list[int] = []  # sorted, beside the packed backings
        self._backings: list[bytes] = []

    def encode(
        self, state: ManagerState, store: MemfdStore, state_id: bytes, runtime_dir: str
    ) -> bytes:
        """The journal's bytes for `state` now. The first call packs every region (a state
        adopted at start was built without marks); later ones only those marked since."""
        changed = state.changed_regions
        if not self._primed:
            changed.update(state.regions)
            self._primed = True
        for name in sorted(changed):  # repeating one (after an error below) is harmless
            region = state.regions.get(name)
            live = region is not None and not region.removing
            kept = self._kept.get(name)
            if kept is not None and (not live or kept.region is not region):
                self._drop(name)  # removed (or removed and added again)
                state.free_later(kept.packed.release())  # on later turns, not in this save
                kept = None
            if region is None or not live:
                continue
            if kept is None:
                self._add(region, store)
            else:
                self._update(kept, store)
        changed.clear()
        fields = head(snapshot_of(state, state_id, runtime_dir, (), ()))
        return encode_packed(fields, self._regions, self._backings)

    def _drop(self, name: str) -> None:
        kept = self._kept.pop(name)
        i = bisect.bisect_left(self._orders, kept.region.order)
        del self._orders[i], self._regions[i]
        self._unref(kept.uses)

    def _add(self, region: Region, store: MemfdStore) -> None:
        pieces = region.submappings
        ids = list(map(_MAPPABLE, pieces))  # in C, not piece by piece
        packed = PackedPieces([pack(sub_record(s)) for s in pieces])
        kept = _Kept(region, pieces, packed, ids, Counter(ids))
        pieces.watched, pieces.changed = True, None
        self._kept[region.name] = kept
        i = bisect.bisect_left(self._orders, region.order)
        self._orders.insert(i, region.order)
        self._regions.insert(i, self._region_bytes(kept))
        self._ref(kept.uses, store)

    def _update(self, kept: _Kept, store: MemfdStore) -> None:
        """Pack a region again, and only the pieces replaced since it was packed last."""
        region, pieces = kept.region, kept.pieces
        assert pieces is region.submappings and pieces.watched
        if pieces.changed is not None:
            lo, hi = pieces.changed
            old = hi - (len(pieces) - len(kept.packed))  # where the window ended before
            subs = pieces.slice(lo, hi)
            kept.packed.replace(lo, old, [pack(sub_record(s)) for s in subs])
            gone = kept.ids[lo:old]
            kept.ids[lo:old] = new = [s.mappable_id for s in subs]
            pieces.changed = None
            # the mappables it started or stopped using, from the window alone
            started = Counter({i: 1 for i in new if i not in kept.uses})
            kept.uses.subtract(gone)
            kept.uses.update(new)
            stopped: Counter[int] = Counter()
            for mappable_id in set(gone):
                if kept.uses[mappable_id] <= 0:
                    del kept.uses[mappable_id]
                    stopped[mappable_id] = 1
            self._unref(stopped)
            self._ref(started, store)
        i = bisect.bisect_left(self._orders, region.order)
        self._regions[i] = self._region_bytes(kept)

    @staticmethod
    def _region_bytes(kept: _Kept) -> bytes:
        packed = kept.packed
        return pack_region_joined(region_fields(kept.region), len(packed), packed.joined())

    def _ref(self, uses: Counter[int], store: MemfdStore) -> None:
        """Mappables a region started to use: their backings join the journal's."""
        new = {i for i in uses if i != PRIVATE_MAPPABLE and self._backing_refs[i] == 0}
        self._backing_refs.update(i for i in uses if i != PRIVATE_MAPPABLE)
        for backing in store.records(new):  # those without a record are not journaled
            j = bisect.bisect_left(self._backing_ids, backing.mappable_id)
            self._backing_ids.insert(j, backing.mappable_id)
            self._backings.insert(j, pack(backing))

    def _unref(self, uses: Counter[int]) -> None:
        """Mappables a region stopped using: backings no region uses leave the journal."""
        for mappable_id in uses:
            if mappable_id == PRIVATE_MAPPABLE:
                continue
            self._backing_refs[mappable_id] -= 1
            if self._backing_refs[mappable_id] <= 0:
                del self._backing_refs[mappable_id]
                j = bisect.bisect_left(self._backing_ids, mappable_id)
                if j < len(self._backing_ids) and self._backing_ids[j] == mappable_id:
                    del self._backing_ids[j], self._backings[j]
