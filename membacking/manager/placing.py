"""Activated pieces put in the mapping table a batch per turn of the daemon's loop.

Activating thousands of pieces (a region of many pieces enabled or moved, thousands of regions
shown again) put every table entry in place in the request's turn, about 3 us each. A `Place`
step puts a bounded number in place per turn; `Unplaced` knows what is still missing, and
whatever reads the table there (a fault, a cut) has those pieces put in place first, so no
answer ever finds a hole where a region is active.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any

from ..protocol.ranges import MemoryRange
from .model import Effect, Holders, Mapping, Operation
from .regions import Region, SubMapping

if TYPE_CHECKING:
    from .table import Lost, TableState

_GPA = operator.attrgetter("gpa")
#: pieces a step puts in the table per message of its budget (about 3 us each, a message 10)
PIECES_PER_MESSAGE = 3


class Unplaced:
    """Active regions some of whose pieces are not in the table yet, in address order (they
    are active, so they never overlap): for each, the offset intervals still to place (their
    bounds never cut a piece) and the `Place` that owns it."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        #: id of a region -> the Place that owns it (the region is in `_regions`: its id is
        #: not reused meanwhile); one shared value per `add`, no record built per region
        self._owners: dict[int, Place] = {}
        #: id -> offset intervals still to place, for regions placed in part (absent: all)
        self._left: dict[int, list[tuple[int, int]]] = {}

    def __bool__(self) -> bool:
        return bool(self._owners)

    def __len__(self) -> int:
        return len(self._owners)

    def add(self, regions: list[Region], place: Place) -> None:
        """`regions` (in address order) became active; none of their pieces is in the table
        yet. In one extension of the index when they lie past what it has (the usual case)."""
        for region in regions:
            region.active = True
        owners = zip(map(id, regions), repeat(place), strict=False)  # (repeat is endless)
        self._owners.update(owners)
        starts: list[int] = list(map(_GPA, regions))
        if not self._starts or (starts and self._starts[-1] < starts[0]):
            self._starts += starts
            self._regions += regions
            return
        for start, region in zip(starts, regions, strict=True):
            i = bisect.bisect_left(self._starts, start)
            self._starts.insert(i, start)
            self._regions.insert(i, region)

    def owner(self, region: Region) -> Place | None:
        """The `Place` still putting pieces of `region` in the table, if any."""
        return self._owners.get(id(region))

    def discard(self, region: Region) -> None:
        """`region` is no longer active: what was not placed never will be."""
        if self._owners.pop(id(region), None) is not None:
            self._left.pop(id(region), None)
            i = bisect.bisect_left(self._starts, region.gpa or 0)
            assert self._regions[i] is region, "a region moved while its pieces were placed"
            del self._starts[i], self._regions[i]

    def _todo(self, region: Region) -> list[tuple[int, int]]:
        """The offset intervals of `region` still to place."""
        return self._left.get(id(region)) or [(0, region.size)]

    def _overlapping(self, rng: MemoryRange) -> list[Region]:
        i = bisect.bisect_right(self._starts, rng.start) - 1
        if i < 0 or self._starts[i] + self._regions[i].size <= rng.start:
            i += 1
        j = bisect.bisect_left(self._starts, rng.end, lo=i)
        return self._regions[i:j]

    def place_range(self, state: TableState, rng: MemoryRange) -> None:
        """Put every piece overlapping `rng` that is not in the table yet there now."""
        for region in self._overlapping(rng):
            gpa = region.gpa or 0
            lo, hi = max(rng.start, gpa) - gpa, min(rng.end, gpa + region.size) - gpa
            batch: list[tuple[MemoryRange, Mapping]] = []
            self._place(region, lo, hi, batch)
            insert(state, batch)

    def place_some(
        self, region: Region, limit: int, batch: list[tuple[MemoryRange, Mapping]]
    ) -> int:
        """Add up to `limit` pieces of `region` to `batch` (for `insert`), in address order,
        as placed; returns how many (at least 1, counting an interval of no piece, so a
        caller always advances)."""
        place = self._owners[id(region)]
        todo = self._todo(region)
        lo, hi = todo[0]
        pieces = region.submappings
        if len(todo) == 1 and lo == 0 and hi == region.size and len(pieces) <= limit:
            n = len(batch)  # all of it at once (a region of a piece or a few: the usual case)
            entries(region, pieces.slice(0, len(pieces)), batch)
            place.new += [mapping for _, mapping in batch[n:]]
            self.discard(region)
            return max(1, len(pieces))
        i, j = pieces.span(lo, hi)
        k = min(j, i + max(1, limit))
        end = pieces[k - 1].end if k < j else hi
        self._place(region, lo, end, batch)
        return max(1, k - i)

    def finish(self, state: TableState) -> None:
        """Put every piece in place now (a restart's table; a mapper's Holdings checked)."""
        for region in list(self._regions):  # (each one is owned: `discard` takes both)
            assert region.range is not None
            self.place_range(state, region.range)

    def _place(
        self, region: Region, lo: int, hi: int, batch: list[tuple[MemoryRange, Mapping]]
    ) -> None:
        """Add the pieces of `region` overlapping offsets [lo, hi) that are not in the table
        yet to `batch`, which the caller puts in the table at once; from now on nothing in
        [lo, hi) waits (a piece put there later by a change of the region goes in the table
        with that change)."""
        pieces = region.submappings
        i, j = pieces.span(lo, hi)
        if i < j:  # widened to whole pieces: the intervals' bounds never cut one
            lo, hi = min(lo, pieces[i].offset), max(hi, pieces[j - 1].end)
        place = self._owners[id(region)]
        kept: list[tuple[int, int]] = []
        for a, b in self._todo(region):
            if b <= lo or a >= hi:
                kept.append((a, b))
                continue
            n = len(batch)
            entries(region, pieces.slice(*pieces.span(max(a, lo), min(b, hi))), batch)
            place.new += [mapping for _, mapping in batch[n:]]
            if a < lo:
                kept.append((a, lo))
            if hi < b:
                kept.append((hi, b))
        if kept:
            self._left[id(region)] = kept
        else:
            self.discard(region)


def entries(region: Region, subs: list[SubMapping], out: list[tuple[MemoryRange, Mapping]]) -> None:
    """Add to `out` the table entries of `region`'s pieces `subs` (in address order)."""
    gpa = region.gpa
    assert gpa is not None
    tally, name, writable = region.tally(), region.name, region.writable
    for sub in subs:
        start = gpa + sub.offset  # the bounds of a placed region's piece: checked already
        rng = MemoryRange.checked_already(start, start + sub.size)
        mapping = Mapping(
            name, rng, sub.mappable_id, sub.file_offset, sub.writable and writable, Holders(tally)
        )
        out.append((rng, mapping))


def insert(state: TableState, batch: list[tuple[MemoryRange, Mapping]]) -> None:
    """Put `batch` (in address order) in the table: one slice when nothing lies between."""
    if batch:
        state.table.insert_sorted(batch)
        state.table_generation += 1


@dataclass
class Place:
    """Regions a change activated whose pieces go in the table a batch per step (`regions`,
    in address order, from `index` on). Once all are there, the new mappings are pushed to
    the eager mappers and the lazy holders of what was replaced are refilled (`lost`), as an
    activation of a few pieces does at once; the change waits for that too."""

    regions: list[Region]
    op: Operation
    lost: Lost
    #: the table entries put in place so far (by this step or by what read the table first)
    new: list[Mapping] = field(default_factory=list)
    index: int = 0
    key: tuple[int, int] = (0, 0)

    def run(self, state: TableState, budget: int) -> tuple[list[Effect], bool]:
        limit = budget * PIECES_PER_MESSAGE
        unplaced = state.unplaced
        placed = 0
        batch: list[tuple[MemoryRange, Mapping]] = []
        while self.index < len(self.regions) and placed < limit:
            region = self.regions[self.index]
            if unplaced.owner(region) is not self:
                self.index += 1  # all in place (faults brought them), or no longer active
                continue
            # a region costs about a piece of its own (regions of one piece: half a piece each)
            placed += 1 + unplaced.place_some(region, limit - placed, batch)
        insert(state, batch)  # consecutive pieces: usually one slice of the table's lists
        if self.index < len(self.regions):
            return [], False
        new, self.new = self.new, []
        # the push and the refill send their first batches on the next steps, not in this one
        effects = state._push(new, self.op, False) + state._refill(self.lost, self.op, False)
        return effects, True

    def release(self) -> list[Any]:
        """Its list, for the caller to free a batch at a time (`free_later`)."""
        new, self.new = self.new, []
        return new
