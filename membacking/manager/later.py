"""Bookkeeping a departed mapper leaves for later turns of the daemon's loop.

When a mapper detaches, dies or is evicted, the table's entries it held still name it among
their holders; `forget_departed` takes those marks off a batch at a time (`TableState.work`),
so a mapper holding 10,000 mappings no longer holds the loop for its departure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol.ranges import MemoryRange

if TYPE_CHECKING:
    from .table import TableState

#: how much of what changes leave to later turns one `TableState.work` call does: held ranges
#: deleted (a few ns each), or table entries freed (WORK_PER_ENTRY units each: about 0.5 us)
WORK_BUDGET = 100_000
WORK_PER_ENTRY = 64
#: units per window of held ranges a cut took (about 3 us each)
WORK_PER_WINDOW = 384
#: units per range of a window of held ranges of several mappables (their counts are updated
#: one by one: about 0.2 us each; a window of one mappable's ranges costs a unit per range)
WORK_PER_MAPPABLE = 24
#: units of `TableState.work` per holding taken off (a lookup and a set removal: about 1.5 us)
WORK_PER_HOLDING = 192


def forget_departed(state: TableState, budget: int) -> int:
    """Take the marks of departed mappers off the table's entries, about `budget` units of
    work (at least one batch); returns the units done. Until then a departed mapper still
    counts in its regions' tallies, which nothing answered reads (region_info skips ids that
    are no mapper's; a cut takes its ranges as it does a live holder's, sending nothing)."""
    done = 0
    while state.departed and done < budget:
        mapper_id, held = next(iter(state.departed.items()))
        ranges = held.page(0, max(1, (budget - done) // WORK_PER_HOLDING))
        for rng in ranges:
            hit = state.table.lookup(rng.start)
            if hit is not None and hit[0] == rng:
                hit[1].holders.discard(mapper_id)
        if ranges:
            held.take(MemoryRange.checked_already(ranges[0].start, ranges[-1].end))
        done += max(1, len(ranges)) * WORK_PER_HOLDING
        if not len(held):
            del state.departed[mapper_id]
    return done


def do_work(state: TableState, budget: int) -> int:
    """`TableState.work`: delete the held ranges cuts took (a holder at a time, a bounded
    number of its windows), take departed mappers' marks off, empty the tallies of regions
    hidden together (cuts.py), then free what changes let go of (`free_later`); about
    `budget` units. Returns the units done."""
    done = 0
    while state._unsettled and done < budget:
        mapper_id = next(iter(state._unsettled))
        entry = state.mappers.get(mapper_id)
        if entry is None:
            del state._unsettled[mapper_id]
            continue
        held = entry.held
        # each window (a cut) costs a deletion from its lists and a count: 200 windows
        # of each of 72 holders (a region hiding 200 others) took 20 to 35 ms in one call,
        # and so would 70 windows of 2,000 regions hidden at once
        done += held.settle_within(budget - done, WORK_PER_WINDOW, WORK_PER_MAPPABLE)
        if not held.later:
            del state._unsettled[mapper_id]
    done += forget_departed(state, budget - done) if state.departed else 0
    while state.stale_tallies and done < budget:
        batch = state.stale_tallies[-1]
        n = max(1, (budget - done) // WORK_PER_ENTRY)
        for region in batch[-n:]:
            region.tally()  # (one activated since emptied it already)
        del batch[-n:]
        done += n * WORK_PER_ENTRY
        if not batch:
            state.stale_tallies.pop()
    while state._trash and done < budget:
        batch = state._trash[-1]
        n = max(1, (budget - done) // WORK_PER_ENTRY)
        del batch[-n:]
        done += n * WORK_PER_ENTRY
        if not batch:
            state._trash.pop()
    return done
