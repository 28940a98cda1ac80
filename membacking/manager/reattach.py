"""A mapper registering again after a manager restart tells what it still holds (Holdings): the
manager keeps each fd whose file is the backing it has under that id, each mapping that its
table has exactly so, and unmaps (Unmap, then Release) the rest, so what the mapper sees is
again exactly what the table says.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import trace
from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE
from ..protocol.ranges import PAGE_MASK, MemoryRange
from .model import Effect, MapperEntry, Mapping

if TYPE_CHECKING:
    from .peers import PeerState

log = logging.getLogger("membacking.manager")


#: a mapping as Holdings lists it: start, size, mappable id, file offset, writable (0/1)
HeldItem = tuple[int, int, int, int, int]


def table_index(state: PeerState) -> dict[HeldItem, tuple[MemoryRange, Mapping]]:
    """Each mapping of the table as Holdings lists it, with its range and itself: built once
    per change of the table (every mapper registering again after a restart is checked
    against the same table, one dictionary lookup per mapping it holds)."""
    cached = state._held_index
    if cached is not None and cached[0] == state.table_generation:
        return cached[1]
    index = {
        (rng.start, rng.end - rng.start, mp.mappable_id, mp.file_offset, int(mp.writable)): (
            rng,
            mp,
        )
        for rng, mp in state.table.items()
    }
    state._held_index = (state.table_generation, index)
    return index


def take_holdings(state: PeerState, entry: MapperEntry, msg: m.Holdings) -> list[Effect]:
    """Check a mapper's Holdings against the table; effects unmap what no longer holds."""
    if entry.stream is None:
        state.reject("not-attached", "Holdings before the stream socket", entry.pid)
        return []
    if entry.features is None or not entry.features & m.FEATURE_REATTACH:
        state.reject("unexpected", "Holdings without FEATURE_REATTACH", entry.pid)
        return []
    if len(msg.fds) % m.HOLDING_FD_LEN or len(msg.mappings) % m.HOLDING_MAPPING_LEN:
        state.reject("bad-field", "Holdings arrays of the wrong length", entry.pid)
        return []
    identity = getattr(state.store, "identity", None)
    stale_fds: list[int] = []
    fds = iter(msg.fds)
    for mappable_id, dev, ino in zip(fds, fds, fds, strict=True):
        if identity is not None and identity(mappable_id) == (dev, ino):
            entry.fds_sent.add(mappable_id)
        else:
            stale_fds.append(mappable_id)
    if state.unplaced:  # an activation's pieces not in the table yet: checked against it all
        state.unplaced.finish(state)
    index = table_index(state)
    fds_sent = entry.fds_sent
    kept_ranges: list[MemoryRange] = []
    kept_ids: list[int] = []
    stale: list[MemoryRange] = []
    maps = iter(msg.mappings)
    for item in zip(maps, maps, maps, maps, maps, strict=True):
        hit = index.get(item)
        mappable_id = item[2]
        if hit is not None and (mappable_id in fds_sent or mappable_id == PRIVATE_MAPPABLE):
            rng, mapping = hit
            if entry.id not in mapping.holders:
                mapping.holders.add(entry.id)
                kept_ranges.append(rng)
                kept_ids.append(mappable_id)
            continue
        start, size = item[0], item[1]
        if size == 0 or (start | size) & PAGE_MASK or start + size > state.address_space:
            state.reject("bad-range", f"Holdings range {start:#x}+{size:#x}", entry.pid)
            continue
        stale.append(MemoryRange(start, start + size))
    entry.held.extend(kept_ranges, kept_ids)
    state.counters["reattached_mappings"] += (len(msg.mappings) // 5) - len(stale)
    trace.mark(f"daemon.holdings mapper={entry.id} maps={len(msg.mappings) // 5}")
    if not stale and not stale_fds:
        return []
    log.info(
        "mapper %d (%s) holds %d mappings and %d fds the table no longer has: unmapping them",
        entry.id,
        entry.name,
        len(stale),
        len(stale_fds),
    )
    op = state.start_op(f"reattach mapper {entry.id}", None)
    effects: list[Effect] = []
    for rng in stale:
        effects.append(state._to_mapper(entry, m.Unmap(state._seq(entry, op), rng, ())))
        state.counters["unmaps_sent"] += 1
    for start in range(0, len(stale_fds), m.MAX_RELEASE_IDS):
        ids = tuple(stale_fds[start : start + m.MAX_RELEASE_IDS])
        effects.append(state._to_mapper(entry, m.Release(state._seq(entry, op), ids)))
    return effects + state._maybe_finish(op)
