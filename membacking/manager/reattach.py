"""A mapper registering again after a manager restart tells what it still holds (Holdings): the
manager keeps each fd whose file is the backing it has under that id, each mapping that its
table has exactly so, and unmaps (Unmap, then Release) the rest, so what the mapper sees is
again exactly what the table says.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import trace
from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE
from ..protocol.ranges import PAGE_MASK, MemoryRange
from .errors import Refused
from .model import Effect, HolderBatch, MapperEntry, Mapping, SendFd

if TYPE_CHECKING:
    from .peers import PeerState

log = logging.getLogger("membacking.manager")


_FD_BYTES = struct.calcsize(m.PACKED_FD_FORMAT)
_MAPPING_BYTES = struct.calcsize(m.PACKED_MAPPING_FORMAT)

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


def warm(state: PeerState) -> None:
    """Build what checking Holdings reads (the table's index, the backings' identities) now,
    before mappers register again: a new daemon of a handover does it before it asks, not in
    the gap (1,000 regions: about 2 ms)."""
    table_index(state)
    _identities(state)


class _Batch:
    """A verdict's kept mappings, each once and in address order, as a mapper holding nothing
    yet records them all at once: their ranges, mappable ids, bytes and counts (`Held.fill`)
    and their holders (`HolderBatch`). Worked out once per verdict: mappers that map the same
    memory share it."""

    __slots__ = ("counts", "holders", "ids", "nbytes", "ranges")

    def __init__(self, hits: list[tuple[MemoryRange, Mapping, int]]) -> None:
        # the table's ranges never overlap: one per range, sorted, they lie apart
        unique = sorted({hit[0]: hit for hit in hits}.values(), key=operator.itemgetter(0))
        self.ranges = [rng for rng, _, _ in unique]
        self.ids = [mappable_id for _, _, mappable_id in unique]
        self.nbytes = sum(rng.end - rng.start for rng in self.ranges)
        self.counts = Counter(self.ids)
        self.holders = HolderBatch(mapping.holders for _, mapping, _ in unique)


class _Verdict:
    """What checking one Holdings message found, before it is applied to the mapper: the fds
    kept and stale, the mappings kept (range, table entry, mappable id) and stale."""

    __slots__ = ("_batch", "fds", "hits", "stale", "stale_fds")

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.stale_fds: list[int] = []
        self.hits: list[tuple[MemoryRange, Mapping, int]] = []
        self.stale: list[MemoryRange] = []
        self._batch: _Batch | None = None

    def batch(self) -> _Batch:
        """The kept mappings as one batch (built at the first call)."""
        if self._batch is None:
            self._batch = _Batch(self.hits)
        return self._batch


#: entries (fds and mappings) one registration's Holdings may list: twice what a mapper can map
#: with the kernel's default vm.max_map_count, and its fds. Each one the table does not have
#: costs an Unmap and its record until acknowledged: a mapper listing bogus ones over and over
#: grew the daemon by a gigabyte in 30 s. One that lists more is evicted (peers.py): what it
#: holds cannot all be taken, so it must drop it all.
MAX_LISTED = 1 << 17


def check_holdings(entry: MapperEntry, msg: m.Holdings | m.PackedHoldings) -> None:
    """Refused (answered with an Error, a strike: docs/PROTOCOL.md §11) for Holdings or
    PackedHoldings that the mapper may not send at all: without the features it negotiated,
    with fields that are not whole entries, after its Holdings ended (its empty one: a
    registration sends them once)."""
    name = type(msg).__name__
    features = entry.features or 0
    if not features & m.FEATURE_REATTACH:
        raise Refused("unexpected", f"{name} needs the REATTACH feature, not negotiated in Hello")
    if entry.holdings_over:
        raise Refused(
            "unexpected",
            f"{name} after this registration's Holdings ended (its empty one): a mapper tells "
            "what it holds once, when it registers again",
        )
    if isinstance(msg, m.PackedHoldings):
        if not features & m.FEATURE_PACKED_HOLDINGS:
            raise Refused(
                "unexpected", "PackedHoldings needs the PACKED_HOLDINGS feature, not negotiated"
            )
        if len(msg.fds) % _FD_BYTES or len(msg.mappings) % _MAPPING_BYTES:
            raise Refused(
                "bad-field",
                f"PackedHoldings fields must be whole entries ({_FD_BYTES} bytes an fd, "
                f"{_MAPPING_BYTES} a mapping)",
            )
    elif len(msg.fds) % m.HOLDING_FD_LEN or len(msg.mappings) % m.HOLDING_MAPPING_LEN:
        raise Refused(
            "bad-field",
            f"Holdings arrays must be whole entries ({m.HOLDING_FD_LEN} ids an fd, "
            f"{m.HOLDING_MAPPING_LEN} a mapping)",
        )


def listed(msg: m.Holdings | m.PackedHoldings) -> int:
    """How many entries (fds and mappings) a Holdings message lists."""
    if isinstance(msg, m.PackedHoldings):
        return len(msg.fds) // _FD_BYTES + len(msg.mappings) // _MAPPING_BYTES
    return len(msg.fds) // m.HOLDING_FD_LEN + len(msg.mappings) // m.HOLDING_MAPPING_LEN


def take_holdings(
    state: PeerState, entry: MapperEntry, msg: m.Holdings | m.PackedHoldings
) -> list[Effect]:
    """Check a mapper's Holdings (or PackedHoldings), which passed `check_holdings`, against
    the table; effects unmap what no longer holds."""
    if entry.stream is None:  # (PackedHoldings past the MAX_EARLY_HOLDINGS kept, too)
        state.reject("not-attached", "Holdings before the stream socket", entry.pid)
        # said, not only counted: the holdings are not taken, so the mapper must send them
        # again once Attached, or drop what it holds
        why = f"{type(msg).__name__} before Attached: not taken; send them again once Attached"
        return [SendFd(entry.id, m.Error("not-attached", why))]
    if state.unplaced:  # an activation's pieces not in the table yet: checked against it all
        state.unplaced.finish(state)
    fds: Iterable[tuple[int, ...]]
    maps: Iterable[tuple[int, ...]]
    if isinstance(msg, m.PackedHoldings):
        if not msg.fds and not msg.mappings:
            return _ended(entry)
        # Mappers that map the same memory (every device model maps all of guest RAM) tell
        # the same bytes: a fresh mapper's are checked once per state of the table
        identities = _identities(state)
        fresh = not entry.fds_sent and not len(entry.held) and identities is not None
        key = (msg.fds, msg.mappings, state.table_generation, identities)
        cached = state._holdings_verdict
        if fresh and cached is not None and cached[0] == key:
            return _apply(state, entry, cached[1], len(msg.mappings) // _MAPPING_BYTES)
        fds = struct.iter_unpack(m.PACKED_FD_FORMAT, msg.fds)
        maps = struct.iter_unpack(m.PACKED_MAPPING_FORMAT, msg.mappings)
        count = len(msg.mappings) // _MAPPING_BYTES
        rejected = sum(state.rejected.values())
        verdict = _check(state, entry, fds, maps)
        if fresh and sum(state.rejected.values()) == rejected:
            state._holdings_verdict = (key, verdict)
        return _apply(state, entry, verdict, count)
    if not msg.fds and not msg.mappings:
        return _ended(entry)
    fd_items, map_items = iter(msg.fds), iter(msg.mappings)
    fds = zip(fd_items, fd_items, fd_items, strict=True)
    maps = zip(map_items, map_items, map_items, map_items, map_items, strict=True)
    count = len(msg.mappings) // m.HOLDING_MAPPING_LEN
    return _apply(state, entry, _check(state, entry, fds, maps), count)


def _ended(entry: MapperEntry) -> list[Effect]:
    """The empty message that ends a mapper's Holdings: nothing to check against the table
    (its end is the caller's: awaited.py). Checked as any, it cost about 35 us (a copy of the
    fds sent among them), once per mapper in a handover's gap."""
    trace.mark(f"daemon.holdings mapper={entry.id} maps=0")
    return []


def _identities(state: PeerState) -> frozenset[tuple[int, int, int]] | None:
    """(mappable id, st_dev, st_ino) of every backing; None from a store that tells them one
    by one only (`identity`), or not at all."""
    identities = getattr(state.store, "identities", None)
    return identities() if identities is not None else None


def _known(state: PeerState, told: set[tuple[int, ...]]) -> set[tuple[int, ...]]:
    """The fds told whose file is the backing the manager has under that id."""
    identities = _identities(state)
    if identities is not None:
        return told & identities  # a set intersection
    identity = getattr(state.store, "identity", None)
    if identity is None:
        return set()
    return {fd for fd in told if identity(fd[0]) == (fd[1], fd[2])}


def _check(
    state: PeerState,
    entry: MapperEntry,
    fds: Iterable[tuple[int, ...]],
    maps: Iterable[tuple[int, ...]],
) -> _Verdict:
    verdict = _Verdict()
    told = set(fds)
    known = _known(state, told)
    verdict.fds = [mappable_id for mappable_id, _, _ in known]
    verdict.stale_fds = sorted(mappable_id for mappable_id, _, _ in told - known)
    index = table_index(state)
    fds_sent = entry.fds_sent.union(verdict.fds)
    hits, stale = verdict.hits, verdict.stale
    for item in maps:
        hit = index.get(item)  # type: ignore[arg-type]  # five ints, as HeldItem
        if hit is not None and (item[2] in fds_sent or item[2] == PRIVATE_MAPPABLE):
            hits.append((hit[0], hit[1], item[2]))
            continue
        start, size = item[0], item[1]
        if size == 0 or (start | size) & PAGE_MASK or start + size > state.address_space:
            state.reject("bad-range", f"Holdings range {start:#x}+{size:#x}", entry.pid)
            continue
        stale.append(MemoryRange(start, start + size))
    return verdict


def _apply(state: PeerState, entry: MapperEntry, verdict: _Verdict, count: int) -> list[Effect]:
    """Record what is kept (the mapper holds it), unmap and release the rest."""
    blank = not entry.fds_sent and not len(entry.held)
    entry.fds_sent.update(verdict.fds)
    mapper_id = entry.id
    batch = verdict.batch() if blank and verdict.hits else None
    if batch is not None and batch.holders.add_new(mapper_id):
        # nothing recorded of it yet (a mapper registering again): every kept mapping at
        # once, not one `Holders.add` and one held range at a time
        filled = entry.held.fill(batch.ranges, batch.ids, batch.nbytes, batch.counts)
        assert filled, "a mapper that holds nothing took ranges"
    else:
        kept_ranges: list[MemoryRange] = []
        kept_ids: list[int] = []
        for rng, mapping, mappable_id in verdict.hits:
            if mapping.holders.add(mapper_id):
                kept_ranges.append(rng)
                kept_ids.append(mappable_id)
        entry.held.extend(kept_ranges, kept_ids)
    stale, stale_fds = verdict.stale, verdict.stale_fds
    state.counters["reattached_mappings"] += count - len(stale)
    trace.mark(f"daemon.holdings mapper={entry.id} maps={count}")
    if not stale and not stale_fds:
        return []
    # (within the log budget: a peer listing made-up ones, registering again and again, wrote
    # 17,800 lines a second)
    if state.log_budget.allow("Holdings", "stale", entry.pid, state._monotonic()):
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
