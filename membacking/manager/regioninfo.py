"""How the control channel describes a region: its state, its pieces (a bounded number of
them) and its holders, in work that does not grow with the region's pieces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .regions import Region, SubMapping

if TYPE_CHECKING:
    from .table import TableState


def _region_state(region: Region) -> str:
    if region.removing:
        return "removing"
    if region.active:
        return "active"
    return "hidden" if region.enabled else "disabled"  # hidden: beneath a higher priority


#: most pieces a region map lists in `mappings` (the `mappings` operation pages through more)
MAX_LISTED_PIECES = 256


def piece_info(sub: SubMapping) -> dict[str, Any]:
    return {
        "offset": sub.offset,
        "size": sub.size,
        "mappable_id": sub.mappable_id,
        "file_offset": sub.file_offset,
        "writable": sub.writable,
    }


def region_info(
    state: TableState, region: Region, *, around: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A region as the control channel describes it, in work bounded by MAX_LISTED_PIECES:
    `pieces` counts its sub-mappings and `mappings` lists at most that many, from the first, or
    with `around=(offset, end)` the ones a change there touched and their neighbours."""
    pieces = region.submappings
    first = 0
    if around is not None:
        first, _ = pieces.span(*around)
        first = max(first - 1, 0)
    listed = pieces.slice(first, first + MAX_LISTED_PIECES)
    if around is not None:
        # up to the neighbour after the change
        _, last = pieces.span(*around)
        listed = listed[: last + 1 - first]
    return {
        "name": region.name,
        "gpa": region.gpa,
        "size": region.size,
        "writable": region.writable,
        "priority": region.priority,
        "backing": region.backing,
        # where the memory lives: a "memfd" region's is a file of the state directory ("shm")
        # when there is one
        "memory": state.store.ram_kind if region.backing == "memfd" else region.backing,
        "path": region.path,
        "enabled": region.enabled,
        "active": region.active,
        "mappable_id": pieces[0].mappable_id if len(pieces) else None,
        "pieces": len(pieces),
        "mappings": [piece_info(s) for s in listed],
        # the region's mappings in the table (none unless active) count who holds them
        # (a departed mapper counts until `work` took its marks off: it is no holder)
        "holders": sorted(h for h in region.tally() if h in state.mappers),
        "state": _region_state(region),
    }
