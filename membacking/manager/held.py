"""What a mapper holds: its mapping ranges in address order, with their mappables counted, and
the ranges a cut took that are deleted on a later turn (`Held.take_later`, `Taken`).
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections import Counter
from collections.abc import Callable, Iterator

from ..protocol.ranges import MemoryRange

#: the bounds of a MemoryRange (a tuple), read in C
_START: Callable[[MemoryRange], int] = operator.itemgetter(0)
_END: Callable[[MemoryRange], int] = operator.itemgetter(1)


class Taken:
    """The ranges of a `Held` that `take_later` took: how many, the first and the last (cut to
    the cut's range by `clip`), their span; the list itself only while they are not deleted."""

    __slots__ = ("_epoch", "_held", "_i", "_j", "count", "first", "last")

    def __init__(self, held: Held, i: int, j: int) -> None:
        self._held, self._i, self._j, self._epoch = held, i, j, held._epoch
        self.count = j - i
        self.first, self.last = held._sorted[i], held._sorted[j - 1]

    @property
    def span(self) -> MemoryRange:
        return MemoryRange.checked_already(self.first.start, self.last.end)

    def nbytes(self) -> int:
        """The bytes of the ranges as they were held (before `clip`): two sums in C (a loop
        over 2,000 ranges cost 0.2 ms, for each holder of 2,000 regions hidden at once)."""
        window = self._window()
        return sum(map(_END, window)) - sum(map(_START, window))

    def clip(self, rng: MemoryRange) -> int:
        """Cut the first and the last range to `rng`; returns the bytes that cut off."""
        first, last = self.first.intersection(rng), self.last.intersection(rng)
        cut = (self.first.end - self.first.start) - (first.end - first.start)
        if self.count > 1:
            cut += (self.last.end - self.last.start) - (last.end - last.start)
        self.first, self.last = first, last
        return cut

    def ranges(self) -> list[MemoryRange]:
        """The ranges, in address order, the first and the last clipped. Once the `Held` has
        settled (any other use of it settles it) they are gone: then their whole span stands
        for them (a refill then also maps what lay between them, which is harmless)."""
        if self._held._epoch != self._epoch:
            return [self.span]
        out = self._window()
        out[0], out[-1] = self.first, self.last
        return out

    def _window(self) -> list[MemoryRange]:
        assert self._held._epoch == self._epoch, "the ranges taken were deleted already"
        return self._held._sorted[self._i : self._j]


class Held:
    """The mapping ranges a mapper holds (range -> mappable id): in address order (they never
    overlap), with the mappable id of each beside it, their byte total, and the ranges of each
    mappable counted. Whether it still maps a mappable is one count lookup; a listing
    pages through them without a sort; a cut takes every range in a span with one slice of
    each list (`take`), not one operation per range (an insertion costs a bisection and a
    memmove: about 1.6 us at 10,000 ranges).

    `take_later` takes the ranges in a span at once but deletes them (a slice of each list,
    and their counts) only when the holder settles: on a later turn of the daemon's loop
    (`TableState.work`), or as soon as anything else reads or changes it. Until then the lists
    still hold them, in windows that every method settles first (but `len` and `bytes`)."""

    __slots__ = ("_bytes", "_count", "_epoch", "_ids", "_later", "_later_n", "_sorted")

    def __init__(self) -> None:
        self._sorted: list[MemoryRange] = []
        self._ids: list[int] = []  # the mappable id of each range
        self._count: Counter[int] = Counter()
        self._bytes = 0
        #: windows [i, j) of the lists taken by `take_later` and not deleted yet (disjoint,
        #: sorted)
        self._later: list[tuple[int, int]] = []
        self._later_n = 0
        self._epoch = 0  # counts the settles that deleted something

    def settle(self, windows: int | None = None) -> int:
        """Delete what `take_later` took (at most `windows` of the windows it took, the last
        first: the indexes of those before them do not move); returns how many ranges."""
        later = self._later  # the last first: the indexes before them do not move
        k = len(later) if windows is None else min(windows, len(later))
        now, self._later = later[len(later) - k :], later[: len(later) - k]
        n = sum(j - i for i, j in now)
        if len(now) > 2:
            self._drop_many(now)
        else:
            for i, j in reversed(now):
                self._drop(i, j)
        self._later_n -= n
        self._epoch += bool(n)
        return n

    @property
    def windows(self) -> int:
        """How many windows of ranges wait for `settle` (a cut each)."""
        return len(self._later)

    def take_later(self, rng: MemoryRange) -> Taken | None:
        """Take every range overlapping `rng` (None if there is none): from now on they are no
        longer held, but their deletion waits for `settle`. The caller takes their bytes off
        with `forget_bytes`."""
        i, j = self._window(rng)
        later = self._later
        p = bisect.bisect_left(later, (i, j))  # disjoint windows: only the neighbours can overlap
        if i < j and ((p and later[p - 1][1] > i) or (p < len(later) and later[p][0] < j)):
            # ranges an earlier cut took lie inside `rng` (a cut across a hole cut before)
            self.settle()
            i, j = self._window(rng)
            later, p = self._later, 0
        if i == j:
            return None
        later.insert(p, (i, j))
        self._later_n += j - i
        return Taken(self, i, j)

    @property
    def later(self) -> int:
        """How many ranges wait for `settle`."""
        return self._later_n

    def _window(self, rng: MemoryRange) -> tuple[int, int]:
        ranges = self._sorted
        i = bisect.bisect_left(ranges, (rng.start,))
        if i and ranges[i - 1].end > rng.start:
            i -= 1
        return i, bisect.bisect_left(ranges, (rng.end,), lo=i)

    def _drop_many(self, windows: list[tuple[int, int]]) -> None:
        """Delete the windows (sorted, disjoint) in one copy of the lists: deleting them one
        by one moved the rest of the lists once per window (about 30 us each at 20,000)."""
        kept_sorted, kept_ids = self._sorted[: windows[0][0]], self._ids[: windows[0][0]]
        for k, (i, j) in enumerate(windows):
            self._uncount_ids(self._ids[i:j])
            nxt = windows[k + 1][0] if k + 1 < len(windows) else len(self._sorted)
            kept_sorted += self._sorted[j:nxt]
            kept_ids += self._ids[j:nxt]
        self._sorted, self._ids = kept_sorted, kept_ids

    def _drop(self, i: int, j: int) -> None:
        ids = self._ids[i:j]
        del self._sorted[i:j], self._ids[i:j]
        self._uncount_ids(ids)

    def _uncount_ids(self, ids: list[int]) -> None:
        first, n = ids[0], len(ids)
        # one mappable in the span (the usual case) is counted by a scan in C; many (regions
        # hidden at once) by a loop without Counter's own __delitem__ (a Python method)
        counts = {first: n} if ids.count(first) == n else Counter(ids)
        count = self._count
        for mappable_id, n in counts.items():
            left = count[mappable_id] - n
            if left:
                count[mappable_id] = left
            else:
                dict.__delitem__(count, mappable_id)

    def settle_within(self, units: int, per_window: int, per_mappable: int) -> int:
        """Delete windows `take_later` took (the last first, at least one) while their cost
        stays within `units`: `per_window` each, and `per_mappable` per range of a window of
        several mappables (their counts are updated one by one; one mappable's are counted
        by a scan in C). Returns the units spent."""
        later, ids = self._later, self._ids
        k = spent = 0
        while k < len(later) and (not k or spent < units):
            i, j = later[len(later) - 1 - k]
            single = ids[i:j].count(ids[i]) == j - i
            spent += per_window + (j - i) * (1 if single else per_mappable)
            k += 1
        self.settle(k)
        return spent

    def _find(self, rng: MemoryRange) -> int:
        """The index of `rng`, or -1."""
        if self._later:
            self.settle()
        i = bisect.bisect_left(self._sorted, rng)
        return i if i < len(self._sorted) and self._sorted[i] == rng else -1

    def __setitem__(self, rng: MemoryRange, mappable_id: int) -> None:
        i = self._find(rng)
        if i < 0:
            i = bisect.bisect_left(self._sorted, rng)
            self._sorted.insert(i, rng)
            self._ids.insert(i, mappable_id)
            self._bytes += rng.end - rng.start
        else:
            self._uncount(self._ids[i])
            self._ids[i] = mappable_id
        self._count[mappable_id] += 1

    def extend(self, ranges: list[MemoryRange], ids: list[int]) -> None:
        """Add ranges (with their mappable ids) it does not hold yet, in address order: all at
        once if they lie apart from each other between two it holds or past the last (the
        usual case: what a mapper registering again still holds, a refill's or a push's
        batch: inserting them one by one moved the rest of the lists once each), else one
        by one."""
        if not ranges:
            return
        held = self._sorted
        if self._later and held[-1].end > ranges[0].start:
            self.settle()  # (an insertion before the windows taken would move them)
        i = bisect.bisect_left(held, (ranges[0].start,))
        if (
            (not i or held[i - 1].end <= ranges[0].start)
            and (i == len(held) or ranges[-1].end <= held[i].start)
            and all(a.end <= b.start for a, b in itertools.pairwise(ranges))
        ):
            held[i:i] = ranges
            self._ids[i:i] = ids
            self._count.update(ids)
            self._bytes += sum(r.end - r.start for r in ranges)
            return
        for rng, mappable_id in zip(ranges, ids, strict=True):
            self[rng] = mappable_id

    def fill(
        self, ranges: list[MemoryRange], ids: list[int], nbytes: int, counts: Counter[int]
    ) -> bool:
        """Hold `ranges` (sorted, apart from each other; with their mappable ids, their byte
        total and the ranges of each mappable counted, all worked out once by the caller for
        many holders) if it holds nothing yet: copies of the lists in C, no walk of them.
        False, and nothing done, if it holds anything."""
        if self._later:
            self.settle()
        if self._sorted:
            return False
        self._sorted, self._ids = ranges.copy(), ids.copy()
        self._count = counts.copy()
        self._bytes += nbytes  # (the bytes of ranges taken are the taker's to take off)
        return True

    def _uncount(self, mappable_id: int) -> None:
        left = self._count[mappable_id] - 1
        if left:
            self._count[mappable_id] = left
        else:
            del self._count[mappable_id]

    def pop(self, rng: MemoryRange, default: int | None = None) -> int | None:
        i = self._find(rng)
        if i < 0:
            return default
        mappable_id = self._ids.pop(i)
        del self._sorted[i]
        self._bytes -= rng.end - rng.start
        self._uncount(mappable_id)
        return mappable_id

    def take(self, rng: MemoryRange) -> list[MemoryRange]:
        """Remove every range overlapping `rng`; returns them, in address order. One
        bisection at each end and one slice of each list: the work per range is done by list
        operations in C, not by a Python loop. The caller knows their bytes (often without a
        walk of them): it must take them off with `forget_bytes`."""
        if self._later:
            self.settle()
        i, j = self._window(rng)
        if i == j:
            return []
        taken = self._sorted[i:j]
        self._drop(i, j)
        return taken

    def forget_bytes(self, nbytes: int) -> None:
        """Ranges of `nbytes` in all were taken (`take`)."""
        self._bytes -= nbytes

    def get(self, rng: MemoryRange) -> int | None:
        i = self._find(rng)
        return None if i < 0 else self._ids[i]

    def items(self) -> list[tuple[MemoryRange, int]]:
        if self._later:
            self.settle()
        return list(zip(self._sorted, self._ids, strict=True))

    def mappables(self) -> set[int]:
        """The mappables it holds ranges of (from the counts)."""
        if self._later:
            self.settle()
        return set(self._count)

    def maps(self, mappable_id: int) -> bool:
        """Whether any range it holds is backed by `mappable_id`."""
        if self._later:
            self.settle()
        return mappable_id in self._count

    @property
    def bytes(self) -> int:
        """The bytes of every range it holds."""
        return self._bytes

    def page(self, gpa: int, limit: int) -> list[MemoryRange]:
        """Up to `limit` of its ranges in address order, from the first ending after `gpa`."""
        if self._later:
            self.settle()
        i = bisect.bisect_left(self._sorted, (gpa,))
        if i and self._sorted[i - 1].end > gpa:
            i -= 1
        return self._sorted[i : i + limit]

    def __contains__(self, rng: object) -> bool:
        return isinstance(rng, MemoryRange) and self._find(rng) >= 0

    def __iter__(self) -> Iterator[MemoryRange]:
        if self._later:
            self.settle()
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._sorted) - self._later_n

    def __eq__(self, other: object) -> bool:
        # the counts and bytes follow from the ranges and their mappables
        if not isinstance(other, Held):
            return False
        self.settle()
        other.settle()
        return (self._sorted, self._ids) == (other._sorted, other._ids)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Held({dict(self.items())!r})"
