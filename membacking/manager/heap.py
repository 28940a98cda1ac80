"""Keeping Python's cyclic garbage collector from stalling the manager's loop.

The daemon's long-lived objects (regions, pieces, table entries, mappers' held ranges) would make
every full collection walk all of them; `Heap` moves what survives the young collections into
the frozen generation, so collections walk only what is new, and bounds what freezing could keep
of garbage cycles by a full collection once as many objects have been frozen again.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("membacking.manager")

#: objects frozen since the last full collection below which no full collection is made (a
#: small daemon's full collection is short anyway)
FLOOR = 100_000
#: the least state size the frozen objects are measured against (a state of a few regions is
#: not what most of the heap is made of)
SIZE_FLOOR = 1_000


class Heap:
    """The garbage-collection policy of one daemon process.

    `settle()` once the state is adopted and the initial regions exist: a full collection, then
    everything alive is frozen (`gc.freeze`): the collector never walks it again. From then on,
    what survives a collection of the middle generation is frozen right after it (a
    `gc.callbacks` hook), so the oldest generation stays nearly empty and no automatic
    collection walks more than the young ones: at 10,000 regions, with changes arriving as
    fast as the loop takes them, collections of the oldest generation walked up to a second's
    worth of new objects (18 ms at the median in one run) when they were frozen once a
    second. `tick()` on each turn of the daemon's clock collects what is not frozen and
    freezes the rest. `close()` puts the collector back as it was.

    Frozen objects still die by reference counting (a removed region's pieces are freed at
    once); only a garbage *cycle* among frozen objects would stay. So the objects frozen since
    the last full collection are counted as they are frozen (the oldest generation holds only
    them then: counting it costs what collecting it did). Once those beyond what the state's
    growth explains (its `size`: regions, table entries and mappers, at least SIZE_FLOOR; the
    objects alive after the last full collection per unit of it) number as many as the live
    heap, and more than `FLOOR`, a tick asks whether the heap did grow: the allocator's blocks
    in use (`sys.getallocatedblocks`, a walk of its arenas: about 1 ms for 6 million blocks,
    where counting the frozen objects walked every one of them, 14 to 23 ms at 10,000 regions),
    against those after the last full collection per unit of state. Objects that were frozen
    alive and died since (the usual case) freed their blocks: the count starts again. Only if
    the blocks did grow by a heap's worth beyond the state's growth does the tick unfreeze
    everything and collect it all: a full pause again (90 to 180 ms at 10,000 regions), made
    only when the heap holds that much the state does not explain, so what freezing can hold
    of garbage is bounded by the live heap. It waits for an idle tick (nothing was ready to be
    served), unless three heaps' worth grew.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        blocks: Callable[[], int] = sys.getallocatedblocks,
    ) -> None:
        self._clock = clock
        self._blocks = blocks
        #: the frozen count, and the state's size, after the last full collection
        self.frozen_after_full = 0
        self.size_after_full = 0
        #: objects frozen since the last full collection (some may have died since)
        self.frozen_since = 0
        #: the allocator's blocks in use after the last full collection
        self.blocks_after_full = 0
        #: full collections made because the heap grew by a heap's worth, and the looks at
        #: the allocator's blocks made to see whether it did
        self.full_collections = 0
        self.checks = 0
        #: seconds the longest tick took (its collection and freeze)
        self.longest_tick = 0.0
        #: unreachable objects the last full collection found (garbage cycles)
        self.last_found = 0

    def settle(self, size: int = 0, full: bool = True) -> None:
        """Collect everything and freeze what is alive (at start, after adopting the state);
        `size` measures the state then (see `tick`). Not `full`: what is frozen already stays
        so and is not walked (a daemon taking over settles the state it prepared before it
        asks, then only what came since, in the handover's gap)."""
        started = self._clock()
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)
        if full:
            gc.unfreeze()
            self.last_found = gc.collect()
            gc.freeze()
            self.frozen_after_full = gc.get_freeze_count()
            self.blocks_after_full = self._blocks()
        else:
            self.last_found += gc.collect()
            self.frozen_after_full += len(gc.get_objects(generation=2))
            gc.freeze()
            self.blocks_after_full = self._blocks()
        self.size_after_full = size
        self.frozen_since = 0
        log.debug(
            "heap settled: %d objects frozen in %.1f ms",
            self.frozen_after_full,
            (self._clock() - started) * 1e3,
        )

    def close(self) -> None:
        """Stop freezing, and let the collector walk everything again."""
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        gc.unfreeze()

    def _freeze(self) -> None:
        """Freeze what survived the collection just made (all of it is in the oldest
        generation now: the young ones were collected into it)."""
        self.frozen_since += len(gc.get_objects(generation=2))
        gc.freeze()

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        """After a collection of the middle generation, freeze what survived it."""
        if phase == "stop" and info["generation"] == 1:
            self._freeze()

    def tick(self, idle: bool = True, size: int = 0) -> None:
        """Collect what is not frozen and freeze what survives; a full collection once a
        heap's worth of objects per unit of `size` (a measure that grows with what the state
        holds) was frozen since the last one and the heap's blocks grew that much too (on an
        `idle` tick: three heaps' worth otherwise)."""
        started = self._clock()
        grown = max(size, SIZE_FLOOR) / max(self.size_after_full, SIZE_FLOOR)
        expected = self.frozen_after_full * max(grown - 1.0, 0.0)  # what the growth explains
        limit = max(FLOOR, grown * self.frozen_after_full)
        full = False
        if self.frozen_since - expected > limit:
            # Many of them may have died since (objects that were alive when a collection froze
            # them): did the heap grow by a heap's worth beyond the state's growth?
            self.checks += 1
            heap = max(self.blocks_after_full * grown, 1.0)  # what the state explains
            over = self._blocks() - heap
            full = over > (1 if idle else 3) * heap
            if over <= heap:
                self.frozen_since = 0  # they died: count again from here
        if full:
            self.full_collections += 1
            self.settle(size)
        else:
            gc.collect()  # the frozen objects are not walked: only what came since
            self._freeze()
        self.longest_tick = max(self.longest_tick, self._clock() - started)
