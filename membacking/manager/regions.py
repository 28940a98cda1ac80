"""Regions as the region manager sees them: placement, priority, sub-mappings, and the rules.

Pure logic after OpenVMM's region_manager: overlapping regions must nest (a higher-priority region
contains every lower-priority one it overlaps; equal priorities only with identical ranges), and
at each address the enabled region of highest priority is the active one.
"""

from __future__ import annotations

import bisect
import operator
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..protocol.ranges import MemoryRange
from .errors import Refused

MAX_PRIORITY = 255
_SUBS = operator.attrgetter("submappings._subs")
#: entries of the other size classes a window's sweep inserts into the largest one's (more
#: are concatenated and sorted)
_FEW = 64

#: a placed region as the index files it: (gpa, -end, name, region)
Near = tuple[int, int, str, "Region"]


@dataclass
class SubMapping:
    """Part of a region: `size` bytes at `offset` in the region, backed by a mappable."""

    offset: int
    size: int
    mappable_id: int
    file_offset: int
    writable: bool

    @property
    def end(self) -> int:
        return self.offset + self.size


class Pieces:
    """A region's sub-mappings, sorted by offset and not overlapping (holes may lie between).

    The pieces a change overlaps are found by bisecting the sorted starts, and replaced by a
    slice assignment: a change costs O(log n) comparisons plus one memmove of the pointers after
    it (about a microsecond for 10,000 pieces), instead of a walk and a sort of every piece.
    """

    __slots__ = ("_starts", "_subs", "bytes", "changed", "uses", "watched")

    def __init__(self, subs: Iterable[SubMapping] = ()) -> None:
        self._subs = sorted(subs, key=lambda s: s.offset)
        self._starts = [s.offset for s in self._subs]
        #: mappable id -> pieces it backs, and the pieces' bytes: kept as pieces are replaced,
        #: so removing a region of 10,000 pieces counts neither piece by piece
        self.uses: Counter[int] = Counter(s.mappable_id for s in self._subs)
        self.bytes = sum(s.size for s in self._subs)
        #: set by an observer that keeps something per piece (the journal's packed records):
        #: `changed` is then the window [i, j) of the pieces replaced since it last looked, in
        #: today's indexes (None: none), so it redoes only those
        self.watched = False
        self.changed: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._subs)

    def __iter__(self) -> Iterator[SubMapping]:
        return iter(self._subs)

    def __getitem__(self, index: int) -> SubMapping:
        return self._subs[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pieces):
            return self._subs == other._subs
        return isinstance(other, list) and self._subs == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Pieces({self._subs!r})"

    def span(self, offset: int, end: int) -> tuple[int, int]:
        """Indexes [i, j) of the pieces overlapping [offset, end); i == j where none does (i is
        then where a piece at `offset` would go)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or self._subs[i].end <= offset:
            i += 1
        j = bisect.bisect_left(self._starts, end, lo=i)
        return i, j

    def slice(self, i: int, j: int) -> list[SubMapping]:
        return self._subs[i:j]

    def clear(self) -> list[SubMapping]:
        """Take every piece out (the region is gone); returns them, for the caller to free."""
        subs = self._subs
        self._subs, self._starts, self.bytes = [], [], 0
        self.uses = Counter()
        return subs

    def replace(self, i: int, j: int, subs: list[SubMapping]) -> None:
        """Put `subs` (sorted, fitting between the neighbours of [i, j)) in place of [i, j)."""
        for sub in self._subs[i:j]:
            left = self.uses[sub.mappable_id] - 1
            if left:
                self.uses[sub.mappable_id] = left
            else:
                del self.uses[sub.mappable_id]
            self.bytes -= sub.size
        for sub in subs:
            self.uses[sub.mappable_id] += 1
            self.bytes += sub.size
        self._subs[i:j] = subs
        self._starts[i:j] = [s.offset for s in subs]
        if self.watched:  # widen the window by [i, i + len(subs)), shifting what lay after j
            n = len(subs)
            if self.changed is None:
                self.changed = (i, i + n)
            else:
                lo, hi = self.changed
                hi = hi if hi <= i else i + n if hi <= j else hi + n - (j - i)
                self.changed = (min(lo, i), max(hi, i + n))


@dataclass
class Region:
    name: str
    size: int
    priority: int
    order: int  # creation order: breaks ties between equal-priority identical ranges
    writable: bool
    backing: str  # "memfd" | "file" | "hugetlb" | "private"
    gpa: int | None = None  # placement; None until enabled somewhere
    enabled: bool = False
    active: bool = False  # its sub-mappings are in the mapping table
    removing: bool = False
    path: str | None = None
    submappings: Pieces = field(default_factory=Pieces)
    #: mapper id -> how many of the region's mappings in the table it holds (kept by the
    #: table's `Holders`), so the region's holders are known without a walk of its pieces
    holder_tally: Counter[int] = field(default_factory=Counter)
    #: the region was deactivated with others in one cut (cuts.py): its tally still has the
    #: counts of the mappings that left the table, emptied on a later turn or when read
    stale_tally: bool = False

    def tally(self) -> Counter[int]:
        """`holder_tally`, emptied first if a cut left it stale."""
        if self.stale_tally:
            self.holder_tally.clear()
            self.stale_tally = False
        return self.holder_tally

    @property
    def range(self) -> MemoryRange | None:
        if self.gpa is None:
            return None
        return MemoryRange(self.gpa, self.gpa + self.size)

    def absolute(self, sub: SubMapping) -> MemoryRange:
        assert self.gpa is not None
        return MemoryRange(self.gpa + sub.offset, self.gpa + sub.end)


class RegionsByName(dict[str, Region]):
    """The region table by name, with the count of its private-RAM regions kept as regions
    come and go (a region's backing is fixed when it is made): every mapper's Hello asks
    whether there is one, and walking 1,000 regions for it took about 40 us a Hello."""

    __slots__ = ("private",)

    def __init__(self) -> None:
        super().__init__()
        #: how many of the regions are private RAM (backing "private")
        self.private = 0

    def __setitem__(self, name: str, region: Region) -> None:
        old = self.get(name)
        if old is not None and old.backing == "private":
            self.private -= 1
        super().__setitem__(name, region)
        if region.backing == "private":
            self.private += 1

    def __delitem__(self, name: str) -> None:
        region = self[name]
        super().__delitem__(name)
        if region.backing == "private":
            self.private -= 1

    def pop(self, name: str, *default: Any) -> Any:
        if name not in self:
            return super().pop(name, *default)
        region = self[name]
        del self[name]
        return region

    def clear(self) -> None:
        super().clear()
        self.private = 0

    def __reduce__(self) -> tuple[Any, ...]:
        # (a copy rebuilt region by region counts them again, from nothing)
        return (_regions_by_name, (list(self.items()),))

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the region table is changed one region at a time")

    update = setdefault = popitem = __ior__ = _unsupported


def _regions_by_name(items: list[tuple[str, Region]]) -> RegionsByName:
    regions = RegionsByName()
    for name, region in items:
        regions[name] = region
    return regions


class PlacementIndex:
    """The placed regions, found by the window they overlap without scanning them all.

    Regions may overlap (they nest), so no single sorted order answers "which overlap this
    window". Each region is filed by the bit length of its size, in a list sorted by start: one
    of that class is shorter than 2**bits, so only those starting in [window start - 2**bits,
    window end) can reach the window, which a bisection finds. At most 64 classes, each bisected
    once: adding the 10,000th region no longer walks the other 9,999 (twice).
    """

    def __init__(self) -> None:
        #: bit length of the size -> (gpa, -end, name, region) sorted: start, then longest
        #: first (the sweep's order: `near` hands these very tuples out, building none)
        self._classes: dict[int, list[Near]] = {}
        self._regions: dict[str, Region] = {}

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, region: Region) -> None:
        assert region.gpa is not None and region.name not in self._regions
        entries = self._classes.setdefault(region.size.bit_length(), [])
        # (names are unique: two entries never compare their regions)
        bisect.insort(entries, (region.gpa, -(region.gpa + region.size), region.name, region))
        self._regions[region.name] = region

    def discard(self, region: Region) -> None:
        """Forget `region` (placed where it is now); nothing if it is not filed."""
        if self._regions.get(region.name) is not region or region.gpa is None:
            return
        entries = self._classes[region.size.bit_length()]
        i = bisect.bisect_left(entries, (region.gpa, -(region.gpa + region.size), region.name))
        assert entries[i][3] is region, "a placed region moved without the index knowing"
        del entries[i]
        del self._regions[region.name]

    def near(self, window: MemoryRange) -> list[Near]:
        """The entries of the placed regions overlapping `window` (for an empty window: those
        that start before it and end after it, as `MemoryRange.overlaps` has it), sorted by
        start, longest first. Those starting inside the window are one slice of their class:
        only the few starting before it are looked at one by one."""
        ws, we = window.start, window.end
        runs: list[list[Near]] = []
        for bits, entries in self._classes.items():
            i = bisect.bisect_left(entries, (ws - (1 << bits),))
            j = bisect.bisect_left(entries, (we,), lo=i)
            if i == j:
                continue
            k = bisect.bisect_left(entries, (ws,), i, j) if ws < we else j
            run = [e for e in entries[i:k] if e[1] < -ws]  # (-end < -ws: it ends after ws)
            run += entries[k:j]
            if run:
                runs.append(run)
        if len(runs) <= 1:
            return runs[0] if runs else []
        runs.sort(key=len)
        out = runs.pop()
        if sum(map(len, runs)) <= _FEW:  # a few containers beside many small regions
            for run in runs:
                for entry in run:
                    bisect.insort(out, entry)
            return out
        for run in runs:
            out += run
        out.sort()
        return out

    def overlapping(self, window: MemoryRange) -> list[Region]:
        """Placed regions overlapping `window` (for an empty window: those that start before it
        and end after it, as `MemoryRange.overlaps` has it), in the order of `near`."""
        return [entry[3] for entry in self.near(window)]


def check_nesting(name: str, rng: MemoryRange, priority: int, others: Iterable[Region]) -> None:
    """Refuse a placement of `rng` at `priority` that would break the nesting rule."""
    for other in others:
        other_range = other.range
        if other.name == name or other_range is None or not other_range.overlaps(rng):
            continue
        if priority < other.priority:
            ok = other_range.contains(rng)
            rule = "a lower-priority region must lie inside the higher-priority one"
        elif priority == other.priority:
            ok = other_range == rng
            rule = "regions of equal priority may only overlap with identical ranges"
        else:
            ok = rng.contains(other_range)
            rule = "a higher-priority region must contain the lower-priority ones it overlaps"
        if not ok:
            raise Refused(
                "overlap",
                f"{rng} (priority {priority}) overlaps region {other.name!r} ({other_range}, "
                f"priority {other.priority}): {rule}",
            )


def shadows(upper: Region, lower: Region) -> bool:
    """Whether enabled `upper` hides `lower` (both placed and overlapping)."""
    if upper.priority != lower.priority:
        return upper.priority > lower.priority
    return upper.order < lower.order


def changes(near: list[Near]) -> tuple[list[Region], list[Region]]:
    """Which regions of `near` (the index's entries overlapping a window, in its order) must
    be deactivated and which activated, each in address order.

    A region is active when it is enabled, not being removed, and no other such region shadows
    it. The placement rules make overlapping regions nest, and a region strictly containing
    another always has the higher priority, so a region is shadowed exactly when an eligible
    region strictly contains it, or when one with an identical range beats it (`shadows`). The
    rules do not hold against regions being removed (new ones may be placed across them while
    their Unmaps are pending), but those are never eligible. One sweep in (start, longest
    first) order finds both: O(k log k) for k regions, where comparing every pair cost O(k^2)
    (4.5 s for 2,000 regions inside one that was disabled). What starts inside an eligible
    region's range (past its identical-range group) is contained in it, or is being removed,
    so it must be inactive. That run of the sweep is one slice found by a bisection, whose
    active regions all go down, with no verdict taken region by region: hiding 10,000
    regions under one enabled region costs a filter of one slice, not a sweep of 10,000.
    """
    down: list[Region] = []
    up: list[Region] = []
    i, n = 0, len(near)
    while i < n:
        start, neg_end, _, region = near[i]
        j = i + 1
        if j < n and near[j][0] == start and near[j][1] == neg_end:
            while j < n and near[j][0] == start and near[j][1] == neg_end:
                j += 1
            group = [entry[3] for entry in near[i:j]]  # identical ranges
            winner = None
            for member in group:
                eligible = member.enabled and not member.removing
                if eligible and (winner is None or shadows(member, winner)):
                    winner = member
            for member in group:
                if member.active != (member is winner):
                    (down if member.active else up).append(member)
        elif region.enabled and not region.removing:
            winner = region
            if not region.active:
                up.append(region)
        else:
            winner = None
            if region.active:
                down.append(region)
        # Every region visited starts at or past the end of every eligible one before it
        # (the slices below are skipped), so none is contained: the winner wins.
        if winner is not None and j < n and near[j][0] < -neg_end:
            k = bisect.bisect_left(near, (-neg_end,), j)
            down += [entry[3] for entry in near[j:k] if entry[3].active]
            j = k
        i = j
    return down, up


def piece_count(regions: Iterable[Region]) -> int:
    """The pieces of `regions`, counted without a Python call per region."""
    return sum(map(len, map(_SUBS, regions)))


def split_submappings(
    subs: Iterable[SubMapping], offset: int, size: int
) -> tuple[list[SubMapping], list[SubMapping]]:
    """Cut [offset, offset+size) out of `subs`: (kept pieces, removed pieces), both sorted.
    Callers hand it only the pieces the cut overlaps (`Pieces.span`)."""
    end = offset + size
    kept: list[SubMapping] = []
    removed: list[SubMapping] = []
    for sub in subs:
        if sub.end <= offset or sub.offset >= end:
            kept.append(sub)
            continue
        lo, hi = max(sub.offset, offset), min(sub.end, end)
        if sub.offset < lo:
            kept.append(
                SubMapping(
                    sub.offset, lo - sub.offset, sub.mappable_id, sub.file_offset, sub.writable
                )
            )
        removed.append(
            SubMapping(
                lo, hi - lo, sub.mappable_id, sub.file_offset + (lo - sub.offset), sub.writable
            )
        )
        if hi < sub.end:
            kept.append(
                SubMapping(
                    hi,
                    sub.end - hi,
                    sub.mappable_id,
                    sub.file_offset + (hi - sub.offset),
                    sub.writable,
                )
            )
    kept.sort(key=lambda s: s.offset)
    return kept, removed
