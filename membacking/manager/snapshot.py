"""Between the live state machine and its journal: `capture` builds a `journal.Snapshot` from the
parts (regions with their sub-mappings, backings, id counters, stats counters, pins, mappers);
`restore` builds them again in a fresh `ManagerState` and re-adopts the backings, then
recomputes the table.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any

from ..protocol.messages import PRIVATE_MAPPABLE
from ..protocol.ranges import MemoryRange
from .backing import MemfdStore
from .errors import Refused
from .journal import BackingRecord, PinRecord, RegionRecord, Snapshot, SubMappingRecord
from .pins import Pin
from .regions import Pieces, Region, SubMapping
from .state import ManagerState
from .statedir import StateDirError

log = logging.getLogger("membacking.manager")


def capture(state: ManagerState, store: MemfdStore, state_id: bytes, runtime_dir: str) -> Snapshot:
    """What a restarted manager needs of `state`. Regions being removed are left out: their
    removal was asked for and their memory is destroyed once it completes."""
    regions = []
    mappables: set[int] = set()
    for region in sorted(state.regions.values(), key=lambda r: r.order):
        if region.removing:
            continue
        record = region_record(region)
        mappables.update(
            s.mappable_id for s in record.submappings if s.mappable_id != PRIVATE_MAPPABLE
        )
        regions.append(record)
    return snapshot_of(
        state, state_id, runtime_dir, tuple(regions), tuple(store.records(mappables))
    )


def snapshot_of(
    state: ManagerState,
    state_id: bytes,
    runtime_dir: str,
    regions: tuple[RegionRecord, ...],
    backings: tuple[BackingRecord, ...],
) -> Snapshot:
    """The journal's structure: the state's counters, ids and pins around these records (the
    packed encoder passes none: it keeps the records packed itself)."""
    return Snapshot(
        state_id=state_id,
        uid=os.getuid(),
        runtime_dir=runtime_dir,
        address_space=state.address_space,
        next_mappable_id=state._next_mappable_id,
        next_order=state._next_order,
        next_mapper_id=max(state._next_mapper_id, state.mapper_ids_reserved),
        regions=regions,
        backings=backings,
        counters={k: v for k, v in state.counters.items() if v},
        pins=pin_records(state),
        mappers=state.awaited.records(),
    )


def pin_records(state: ManagerState) -> tuple[PinRecord, ...]:
    """What the journal keeps of the pins of running VMs (those whose process it can name)."""
    return tuple(
        PinRecord(p.mapper_id, p.label, p.pid, p.started, tuple(sorted(p.regions)))
        for p in state.pins.kept(state.mappers)
        if p.started is not None
    )


def region_record(region: Region) -> RegionRecord:
    """What the journal keeps of one region."""
    return RegionRecord._make((*region_fields(region), tuple(map(sub_record, region.submappings))))


def region_fields(region: Region) -> tuple[Any, ...]:
    """A region's RegionRecord fields before its sub-mappings."""
    return (
        region.name,
        region.size,
        region.priority,
        region.order,
        region.writable,
        region.backing,
        region.gpa,
        region.enabled,
        region.path,
    )


def sub_record(sub: SubMapping) -> SubMappingRecord:
    return SubMappingRecord(sub.offset, sub.size, sub.mappable_id, sub.file_offset, sub.writable)


def check_fits(snapshot: Snapshot, runtime_dir: str, address_space: int) -> None:
    """Refuse a snapshot that belongs to another manager (StateDirError says which part)."""
    if snapshot.uid != os.getuid():
        raise StateDirError(f"it was written by uid {snapshot.uid}, not by uid {os.getuid()}")
    if os.path.realpath(snapshot.runtime_dir) != os.path.realpath(runtime_dir):
        # (the same directory by another name, a symlink to it, is the same manager's)
        raise StateDirError(f"it belongs to the manager of {snapshot.runtime_dir}")
    if snapshot.address_space != address_space:
        raise StateDirError(
            f"its address space is {snapshot.address_space:#x} bytes, this manager's "
            f"{address_space:#x}"
        )


def restore(snapshot: Snapshot, state: ManagerState, store: MemfdStore) -> list[str]:
    """Rebuild the regions of `snapshot` in an empty `state`, adopting every backing into
    `store`. Returns warnings (memory that could not survive). StateDirError if a backing is
    missing or not the journaled one; nothing is kept then (the store is emptied)."""
    assert not state.regions and not state.mappers
    warnings: list[str] = []
    try:
        for record in snapshot.backings:
            warning = store.adopt(record)
            if warning is not None:
                warnings.append(warning)
    except Refused as exc:
        store.close_all()
        raise StateDirError(str(exc)) from None
    except BaseException:
        store.close_all()
        raise
    known = {b.mappable_id for b in snapshot.backings} | {PRIVATE_MAPPABLE}
    # hugetlb memory is placed and cut on huge-page boundaries only (state._check_huge_change)
    state._hugetlb.update(b.mappable_id for b in snapshot.backings if b.kind == "hugetlb")
    for rec in snapshot.regions:
        missing = {s.mappable_id for s in rec.submappings} - known
        if missing:
            store.close_all()
            raise StateDirError(f"region {rec.name!r} uses mappables {sorted(missing)} it lacks")
        region = Region(
            rec.name,
            rec.size,
            rec.priority,
            rec.order,
            rec.writable,
            rec.backing,
            rec.gpa,
            rec.enabled,
            path=rec.path,
            submappings=Pieces(
                SubMapping(s.offset, s.size, s.mappable_id, s.file_offset, s.writable)
                for s in rec.submappings
            ),
        )
        state.regions[region.name] = region
        bisect.insort(state.names, region.name)  # the listing's sorted names (control.py)
        if region.gpa is not None:
            state.placed.add(region)
        state.region_bytes += region.size
        for sub in region.submappings:
            state._mappable_refs[sub.mappable_id] += 1
    state._next_mappable_id = max(snapshot.next_mappable_id, state._next_mappable_id)
    state.adopted_below = state._next_mappable_id
    state._next_order = max(snapshot.next_order, state._next_order)
    state._next_mapper_id = max(snapshot.next_mapper_id, state._next_mapper_id)
    state.mapper_ids_reserved = state._next_mapper_id  # the next registration journals a block
    state.counters.update(snapshot.counters)
    # pins of VMs that still run: they hold the regions until their launcher pins anew
    for pin in state.pins.adopt(
        Pin(p.mapper_id, p.label, p.pid, frozenset(p.regions), p.started) for p in snapshot.pins
    ):
        log.info(
            "adopting the pin of %s (pid %d) on %s",
            pin.label,
            pin.pid,
            ", ".join(sorted(pin.regions)),
        )
    # mappers that may come back holding memory: awaited once the daemon starts (awaited.py)
    state.awaited.adopt(snapshot.mappers)
    # no mapper is attached: this only recomputes which regions are active and the table
    op = state.start_op("restore", None)
    effects = state._reconcile([MemoryRange(0, state.address_space)], op, at_once=True)
    assert not effects and not op.waiting
    return warnings
