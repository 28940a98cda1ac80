"""Keeping Python's cyclic garbage collector from stalling the manager's loop.

The daemon's long-lived objects (regions, pieces, table entries, mappers' held ranges) would make
every full collection walk all of them; `Heap` moves what survived into the frozen generation
at start and on each tick, so collections walk only what is new since, and bounds what freezing
could keep of garbage cycles by a full collection once the frozen heap has doubled.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("membacking.manager")

#: frozen objects below which the frozen heap is not checked for growth (a small daemon's
#: full collection is short anyway)
FLOOR = 100_000


class Heap:
    """The garbage-collection policy of one daemon process.

    `settle()` once the state is adopted and the initial regions exist: a full collection, then
    everything alive is frozen (`gc.freeze`): the collector never walks it again. `tick()` on
    each turn of the daemon's clock: a collection of what is not frozen (what was allocated
    since the last tick and survived, so it stays short), then that is frozen too.

    Frozen objects still die by reference counting (a removed region's pieces are freed at
    once, and the frozen count goes down); only a garbage *cycle* among frozen objects would
    stay. So once the frozen count has doubled since the last full collection (and is past
    `FLOOR`), a tick unfreezes everything and collects it all: a full pause again, but at most
    once per doubling of the heap, and what freezing can hold of garbage is bounded by the
    live heap. That full collection waits for an idle tick (nothing was ready to be served),
    unless the frozen heap has grown fourfold.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        #: the frozen count after the last full collection
        self.frozen_after_full = 0
        #: full collections made because the frozen heap doubled
        self.full_collections = 0
        #: seconds the longest tick took (its collection and freeze)
        self.longest_tick = 0.0

    def settle(self) -> None:
        """Collect everything and freeze what is alive (at start, after adopting the state)."""
        started = self._clock()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.frozen_after_full = gc.get_freeze_count()
        log.debug(
            "heap settled: %d objects frozen in %.1f ms",
            self.frozen_after_full,
            (self._clock() - started) * 1e3,
        )

    def tick(self, idle: bool = True) -> None:
        """Collect what is not frozen and freeze what survives; a full collection once the
        frozen heap has doubled since the last one (on an `idle` tick: fourfold otherwise)."""
        started = self._clock()
        frozen = gc.get_freeze_count()
        if frozen > FLOOR and frozen > (2 if idle else 4) * self.frozen_after_full:
            self.full_collections += 1
            self.settle()
        else:
            gc.collect()  # the frozen objects are not walked: only what came since
            gc.freeze()
        self.longest_tick = max(self.longest_tick, self._clock() - started)
