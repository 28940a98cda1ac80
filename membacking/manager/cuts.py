"""Cuts: active pieces taken out of the mapping table and unmapped from their holders.

A cut takes the table's entries in a range out in one slice and sends each holder one Unmap
spanning what it held there. Regions deactivated together (a region enabled over thousands of
others) with nothing in the table between them are cut as one span: one Unmap per holder.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from ..protocol import messages as m
from ..protocol.ranges import MemoryRange
from .held import Taken
from .model import Effect, MapperEntry, Mapping, Operation, Send
from .regions import Region, piece_count

if TYPE_CHECKING:
    from .table import Lost, TableState

_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)


def cut(
    state: TableState, region: Region, rng: MemoryRange, op: Operation, lost: Lost
) -> list[Effect]:
    """Take `rng`, inside active `region`, out of the table: Unmap the cut pieces to their
    holders (only to them), one Unmap per holder spanning the pieces it held (everything in
    `rng` leaves the table, so the span covers nothing it keeps): a region of 1,000 pieces
    held by 24 mappers sent 24,000 Unmaps and held the loop for 316 ms. The holders come
    from the region's tally, and each takes its pieces out of its held ranges with one
    slice (`Held.take`): no Python runs per piece and holder (2.3 us each did: 1.66 s for
    10,010 pieces held by 72 mappers)."""
    if state.unplaced:  # pieces not put in the table yet are put there first (placing.py)
        state.unplaced.place_range(state, rng)
    removed = state.table.remove_overlapping(rng)
    state.table_generation += 1
    if not removed:
        return []
    tally = region.tally()  # active regions never overlap: all of `removed` is its own
    assert removed[0][1].holders.tally is tally and removed[-1][1].holders.tally is tally
    holders = sorted(tally)
    whole = 0  # the bytes of every piece cut, for a holder that held them all
    for mrange, mapping in removed[:: max(len(removed) - 1, 1)]:  # the first and the last
        if mrange.start >= rng.start and mrange.end <= rng.end:
            continue
        for part in mrange.subtract(rng):  # a piece straddling the cut keeps its outside
            kept = Mapping(
                mapping.region,
                part,
                mapping.mappable_id,
                mapping.file_offset + (part.start - mrange.start),
                mapping.writable,
                mapping.holders.copy(),
            )
            state.table.insert(part, kept)
            for holder in kept.holders:
                state._held_of(holder)[part] = kept.mappable_id
    # The removed mappings leave the table: their holder sets are not emptied one by one
    # (the tally comes down by what each holder took, below), and they are freed on later
    # turns (`work`): freeing 10,010 of them took about 8 ms of CPU time.
    state.free_later(removed)
    effects: list[Effect] = []
    for holder in holders:
        entry = state.mappers.get(holder)
        # the ranges leave its Held now, but their deletion (a memmove of its lists and a
        # count of their mappables: 0.1 ms for 10,000 of 30,000) waits for `work`
        taken = state._held_of(holder).take_later(rng)
        if taken is None:
            continue
        left = tally[holder] - taken.count
        if left > 0:
            tally[holder] = left
        else:
            del tally[holder]
        if entry is None:
            continue  # departed (its marks are still being taken off): nothing to send
        if taken.count == len(removed):  # it held every piece: their bytes are counted once
            whole = whole or _bytes_of(region, rng, removed)
            nbytes = whole
        else:
            nbytes = taken.nbytes()
        effects.append(_unmap(state, entry, taken, rng, nbytes, op, lost))
    return effects


def cut_regions(
    state: TableState, regions: list[Region], op: Operation, lost: Lost
) -> list[Effect]:
    """Deactivate `regions` (placed, active, in address order, the table holding nothing
    between them) as one cut of their span: each holder gets one Unmap spanning what it held
    of them all (nothing else it holds lies inside: the table has nothing else there), and its
    held ranges leave in one window. Hiding 2,000 regions held by 72 mappers sent 144,000
    Unmaps, one per region and holder, and held the loop for about 1.5 s."""
    first, last = regions[0].range, regions[-1].range
    assert first is not None and last is not None
    span = MemoryRange.checked_already(first.start, last.end)
    unplaced = state.unplaced
    pending = bool(unplaced)
    for region in regions:
        region.active = False
        if pending:
            unplaced.discard(region)
        # every mapping of the region leaves the table: none of its holders counts for it
        # (emptying 2,000 tallies here touched 2,000 dicts: `work` does it, or a reader)
        region.stale_tally = True
    state.stale_tallies.append(list(regions))
    removed = state.table.remove_overlapping(span)
    state.table_generation += 1
    if not removed:
        return []
    state.free_later(removed)
    spans = list(map(_FIRST, removed))  # (the bytes of them all: no Python call per entry)
    whole = sum(map(_SECOND, spans)) - sum(map(_FIRST, spans))
    effects: list[Effect] = []
    # the holders are the mappers holding anything in the span: a bisection of each one's held
    # ranges, not a union of the regions' tallies (one entry per region and holder)
    for holder in sorted([*state.mappers, *state.departed]):
        taken = state._held_of(holder).take_later(span)
        entry = state.mappers.get(holder)
        if taken is None or entry is None:
            continue  # holds none of it, or departed (its marks are being taken off)
        nbytes = whole if taken.count == len(removed) else taken.nbytes()
        effects.append(_unmap(state, entry, taken, span, nbytes, op, lost))
    return effects


def _unmap(
    state: TableState,
    entry: MapperEntry,
    taken: Taken,
    rng: MemoryRange,
    nbytes: int,
    op: Operation,
    lost: Lost,
) -> Send:
    """The Unmap of what a cut of `rng` took from a live holder (`nbytes` as it held them)."""
    state._unsettled[entry.id] = None  # its ranges' deletion waits for `work`
    entry.held.forget_bytes(nbytes)
    # the pieces it loses: its ranges, the first and the last cut to `rng`
    if taken.first.start < rng.start or taken.last.end > rng.end:
        nbytes -= taken.clip(rng)
    release = state._releasable(entry, op.destroy)
    seq = state._seq(entry, op)
    entry.unmapping[seq] = (taken.count, nbytes)
    state.counters["unmaps_sent"] += 1
    op.unmapped_from.add(entry.id)
    lost.setdefault(entry.id, []).append(taken)
    return state._to_mapper(entry, m.Unmap(seq, taken.span, release))


def deactivation_runs(state: TableState, regions: list[Region]) -> list[list[Region]]:
    """Active `regions` to deactivate (in address order), in runs with nothing in the table
    between two neighbours (one lookup per neighbour): each run can be cut as one span."""
    if len(regions) > 1 and not state.unplaced:
        # every active region has all its pieces in the table: when the table has no more
        # entries in their span than they have pieces, nothing else lies between them
        first, last = regions[0], regions[-1]
        assert first.gpa is not None and last.gpa is not None
        span = MemoryRange.checked_already(first.gpa, last.gpa + last.size)
        if state.table.count_overlapping(span) == piece_count(regions):
            return [regions]
    runs: list[list[Region]] = []
    end = -1
    for region in regions:
        assert region.gpa is not None
        if runs and (
            end == region.gpa
            or state.table.first_overlap(MemoryRange.checked_already(end, region.gpa)) is None
        ):
            runs[-1].append(region)
        else:
            runs.append([region])
        end = region.gpa + region.size
    return runs


def _bytes_of(region: Region, rng: MemoryRange, removed: list[tuple[MemoryRange, Any]]) -> int:
    """The bytes of the table entries a cut removed: the region's own total when the cut
    took all of it (a deactivation), else their sum."""
    if rng == region.range and len(removed) == len(region.submappings):
        return region.submappings.bytes
    return sum(r.end - r.start for r, _ in removed)
