"""The journal's bytes kept up to date change by change. Each region's record and those of its
backings are packed once and kept; a save packs again only the regions the state machine marked
as changed (`TableState.changed_regions`) and joins the kept bytes: the same bytes as
`journal.encode(snapshot.capture(...))`, for work that grows with the change, not the table.
"""

from __future__ import annotations

import bisect
import operator
import os
from collections import Counter

from ..protocol.messages import PRIVATE_MAPPABLE
from .backing import MemfdStore
from .journal import Snapshot, encode_packed, head, pack, pack_region
from .regions import Pieces, Region
from .snapshot import region_fields, sub_record
from .state import ManagerState

_MAPPABLE = operator.attrgetter("mappable_id")


class JournalEncoder:
    """The packed records of one state's regions (by creation order, as `capture` lists them)
    and backings (by mappable id), brought up to date with the changed regions at each save.
    A region's sub-mappings are kept packed one by one too: re-mapping a page of a region of
    10,000 pieces packs the pieces it replaced (`Pieces.changed`), not all 10,000."""

    def __init__(self) -> None:
        self._primed = False
        #: region name -> its order and the mappables it was packed with
        self._packed: dict[str, tuple[int, set[int]]] = {}
        #: region name -> its pieces as packed last (the very `Pieces`), and their bytes
        self._pieces: dict[str, tuple[Pieces, list[bytes]]] = {}
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
            self._drop(name)
            region = state.regions.get(name)
            if region is not None and not region.removing:
                self._add(region, store)
            else:
                self._pieces.pop(name, None)
        changed.clear()
        fields = head(
            Snapshot(
                state_id=state_id,
                uid=os.getuid(),
                runtime_dir=runtime_dir,
                address_space=state.address_space,
                next_mappable_id=state._next_mappable_id,
                next_order=state._next_order,
                next_mapper_id=state._next_mapper_id,
                regions=(),
                backings=(),
                counters={k: v for k, v in state.counters.items() if v},
            )
        )
        return encode_packed(fields, self._regions, self._backings)

    def _drop(self, name: str) -> None:
        packed = self._packed.pop(name, None)
        if packed is None:
            return
        order, mappables = packed
        i = bisect.bisect_left(self._orders, order)
        del self._orders[i], self._regions[i]
        for mappable_id in mappables:
            self._backing_refs[mappable_id] -= 1
            if self._backing_refs[mappable_id] == 0:
                del self._backing_refs[mappable_id]
                j = bisect.bisect_left(self._backing_ids, mappable_id)
                if j < len(self._backing_ids) and self._backing_ids[j] == mappable_id:
                    del self._backing_ids[j], self._backings[j]

    def _packed_pieces(self, name: str, pieces: Pieces) -> list[bytes]:
        """The region's sub-mappings packed, repacking only those replaced since last time."""
        kept = self._pieces.get(name)
        if kept is None or kept[0] is not pieces or not pieces.watched:
            memo = [pack(sub_record(s)) for s in pieces]
            pieces.watched = True
        else:
            memo = kept[1]
            if pieces.changed is not None:
                lo, hi = pieces.changed
                grown = len(pieces) - len(memo)
                memo[lo : hi - grown] = [pack(sub_record(s)) for s in pieces.slice(lo, hi)]
        pieces.changed = None
        self._pieces[name] = (pieces, memo)
        return memo

    def _add(self, region: Region, store: MemfdStore) -> None:
        pieces = region.submappings
        mappables = set(map(_MAPPABLE, pieces))  # in C, not piece by piece
        mappables.discard(PRIVATE_MAPPABLE)
        self._packed[region.name] = (region.order, mappables)
        i = bisect.bisect_left(self._orders, region.order)
        self._orders.insert(i, region.order)
        memo = self._packed_pieces(region.name, pieces)
        self._regions.insert(i, pack_region(region_fields(region), memo))
        new = {i for i in mappables if self._backing_refs[i] == 0}
        self._backing_refs.update(mappables)
        for backing in store.records(new):  # those without a record are not journaled
            j = bisect.bisect_left(self._backing_ids, backing.mappable_id)
            self._backing_ids.insert(j, backing.mappable_id)
            self._backings.insert(j, pack(backing))
