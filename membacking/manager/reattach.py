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
from .model import Effect, MapperEntry

if TYPE_CHECKING:
    from .peers import PeerState

log = logging.getLogger("membacking.manager")


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
    for i in range(0, len(msg.fds), m.HOLDING_FD_LEN):
        mappable_id, dev, ino = msg.fds[i : i + m.HOLDING_FD_LEN]
        if identity is not None and identity(mappable_id) == (dev, ino):
            entry.fds_sent.add(mappable_id)
        else:
            stale_fds.append(mappable_id)
    stale: list[MemoryRange] = []
    for i in range(0, len(msg.mappings), m.HOLDING_MAPPING_LEN):
        start, size, mappable_id, file_offset, writable = msg.mappings[i : i + 5]
        if size == 0 or (start | size) & PAGE_MASK or start + size > state.address_space:
            state.reject("bad-range", f"Holdings range {start:#x}+{size:#x}", entry.pid)
            continue
        rng = MemoryRange(start, start + size)
        mapping = state._mapping_at(rng)
        held_fd = mappable_id == PRIVATE_MAPPABLE or mappable_id in entry.fds_sent
        if (
            mapping is not None
            and held_fd
            and (mapping.mappable_id, mapping.file_offset, mapping.writable)
            == (mappable_id, file_offset, bool(writable))
        ):
            mapping.holders.add(entry.id)
            entry.held[rng] = mappable_id
        else:
            stale.append(rng)
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
