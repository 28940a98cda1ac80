"""The journal's bytes kept up to date change by change. Each region's record and those of its
backings are packed once and kept; a save packs again only the regions the state machine marked
as changed (`TableState.changed_regions`) and joins the kept bytes: the same bytes as
`journal.encode(snapshot.capture(...))`, for work that grows with the change, not the table.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter

from ..protocol.messages import PRIVATE_MAPPABLE
from .backing import MemfdStore
from .journal import RegionRecord, Snapshot, encode_packed, head, pack
from .snapshot import region_record
from .state import ManagerState


class JournalEncoder:
    """The packed records of one state's regions (by creation order, as `capture` lists them)
    and backings (by mappable id), brought up to date with the changed regions at each save."""

    def __init__(self) -> None:
        self._primed = False
        #: region name -> (its order, the mappables it was packed with)
        self._packed: dict[str, tuple[int, frozenset[int]]] = {}
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
                self._add(region_record(region), store)
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

    def _add(self, record: RegionRecord, store: MemfdStore) -> None:
        mappables = frozenset(
            s.mappable_id for s in record.submappings if s.mappable_id != PRIVATE_MAPPABLE
        )
        self._packed[record.name] = (record.order, mappables)
        i = bisect.bisect_left(self._orders, record.order)
        self._orders.insert(i, record.order)
        self._regions.insert(i, pack(record))
        new = {i for i in mappables if self._backing_refs[i] == 0}
        self._backing_refs.update(mappables)
        for backing in store.records(new):  # those without a record are not journaled
            j = bisect.bisect_left(self._backing_ids, backing.mappable_id)
            self._backing_ids.insert(j, backing.mappable_id)
            self._backings.insert(j, pack(backing))
