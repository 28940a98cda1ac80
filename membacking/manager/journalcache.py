"""The journal's bytes kept up to date change by change. Each region's record and those of its
backings are packed once and kept; a save packs again only the regions the state machine marked
as changed (`TableState.changed_regions`) and joins the kept bytes: the same bytes as
`journal.encode(snapshot.capture(...))`, for work that grows with the change, not the table.
"""

from __future__ import annotations

import bisect
import operator
from collections import Counter
from dataclasses import dataclass

from ..protocol.messages import PRIVATE_MAPPABLE
from .backing import MemfdStore
from .journal import encode_packed, head, pack, pack_region
from .regions import Pieces, Region
from .snapshot import region_fields, snapshot_of, sub_record
from .state import ManagerState

_MAPPABLE = operator.attrgetter("mappable_id")


@dataclass
class _Kept:
    """What is kept of one region: the very region and `Pieces` packed, each sub-mapping's
    bytes and mappable id (in the pieces' order), and how many pieces use each mappable."""

    region: Region
    pieces: Pieces
    packed: list[bytes]
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
                state.free_later(kept.packed)  # on later turns, not in this save
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
        kept = _Kept(region, pieces, [pack(sub_record(s)) for s in pieces], ids, Counter(ids))
        pieces.watched, pieces.changed = True, None
        self._kept[region.name] = kept
        i = bisect.bisect_left(self._orders, region.order)
        self._orders.insert(i, region.order)
        self._regions.insert(i, pack_region(region_fields(region), kept.packed))
        self._ref(kept.uses, store)

    def _update(self, kept: _Kept, store: MemfdStore) -> None:
        """Pack a region again, and only the pieces replaced since it was packed last."""
        region, pieces = kept.region, kept.pieces
        assert pieces is region.submappings and pieces.watched
        if pieces.changed is not None:
            lo, hi = pieces.changed
            old = hi - (len(pieces) - len(kept.packed))  # where the window ended before
            subs = pieces.slice(lo, hi)
            kept.packed[lo:old] = [pack(sub_record(s)) for s in subs]
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
        self._regions[i] = pack_region(region_fields(region), kept.packed)

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
