"""A map from non-overlapping memory ranges to values with O(log n) lookup.

Used by the manager for its mapping table and by mappers for what they have mapped. Entries are
kept sorted by start address; lookups bisect, inserts refuse overlaps.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Generic, TypeVar

from .ranges import MemoryRange

T = TypeVar("T")


class OverlapError(ValueError):
    """An inserted range overlaps one already in the map."""

    def __init__(self, new: MemoryRange, existing: MemoryRange) -> None:
        super().__init__(f"range {new} overlaps {existing}")
        self.new = new
        self.existing = existing


class RangeMap(Generic[T]):
    """Sorted, non-overlapping ranges, each with a value."""

    __slots__ = ("_entries", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._entries: list[tuple[MemoryRange, T]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[MemoryRange, T]]:
        return iter(list(self._entries))

    def items(self) -> list[tuple[MemoryRange, T]]:
        return list(self._entries)

    def clear(self) -> None:
        self._starts.clear()
        self._entries.clear()

    def _first_overlapping_index(self, rng: MemoryRange) -> int:
        i = bisect.bisect_right(self._starts, rng.start) - 1
        if i >= 0 and self._entries[i][0].end > rng.start:
            return i
        return i + 1

    def insert(self, rng: MemoryRange, value: T) -> None:
        """Add `rng`; raise `OverlapError` if it overlaps an existing range."""
        if rng.is_empty():
            raise ValueError("cannot insert an empty range")
        i = self._first_overlapping_index(rng)
        if i < len(self._entries) and self._entries[i][0].overlaps(rng):
            raise OverlapError(rng, self._entries[i][0])
        self._starts.insert(i, rng.start)
        self._entries.insert(i, (rng, value))

    def insert_sorted(self, items: list[tuple[MemoryRange, T]]) -> None:
        """Add `items` (in address order, not overlapping each other, none empty): in one
        slice of each list when they all fall in one gap of the map (one memmove of the rest,
        where inserting them one by one moved it once each), else one by one."""
        if not items:
            return
        first, last = items[0][0], items[-1][0]
        i = self._first_overlapping_index(first)
        entries = self._entries
        if (i == len(entries) or entries[i][0].start >= last.end) and first.start < last.end:
            self._starts[i:i] = [rng.start for rng, _ in items]
            entries[i:i] = items
            return
        for rng, value in items:
            self.insert(rng, value)

    def remove(self, rng: MemoryRange) -> T:
        """Remove exactly `rng` (which must be present) and return its value."""
        i = bisect.bisect_left(self._starts, rng.start)
        if i == len(self._entries) or self._entries[i][0] != rng:
            raise KeyError(rng)
        del self._starts[i]
        return self._entries.pop(i)[1]

    def remove_overlapping(self, rng: MemoryRange) -> list[tuple[MemoryRange, T]]:
        """Remove every entry overlapping `rng` (whole) and return them, in address order: one
        slice deletion, where removing k entries one by one moved the rest of the list k times."""
        i = self._first_overlapping_index(rng)
        j = bisect.bisect_left(self._starts, rng.end, lo=i)
        out = self._entries[i:j]
        del self._starts[i:j]
        del self._entries[i:j]
        return out

    def count_overlapping(self, rng: MemoryRange) -> int:
        """How many entries overlap `rng` (two bisections)."""
        i = self._first_overlapping_index(rng)
        return bisect.bisect_left(self._starts, rng.end, lo=i) - i

    def lookup(self, addr: int) -> tuple[MemoryRange, T] | None:
        """The entry whose range contains `addr`, if any."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            entry = self._entries[i]
            if addr < entry[0].end:
                return entry
        return None

    def overlapping(self, rng: MemoryRange) -> list[tuple[MemoryRange, T]]:
        """Entries overlapping `rng`, in address order."""
        out = []
        i = self._first_overlapping_index(rng)
        while i < len(self._entries) and self._entries[i][0].start < rng.end:
            out.append(self._entries[i])
            i += 1
        return out

    def page(self, start: int, limit: int) -> list[tuple[MemoryRange, T]]:
        """Up to `limit` entries ending after `start`, in address order."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._entries[i][0].end <= start:
            i += 1
        return self._entries[i : i + limit]

    def first_overlap(self, rng: MemoryRange) -> tuple[MemoryRange, T] | None:
        i = self._first_overlapping_index(rng)
        if i < len(self._entries) and self._entries[i][0].start < rng.end:
            return self._entries[i]
        return None

    def walk(self, rng: MemoryRange) -> Iterator[tuple[MemoryRange, T | None]]:
        """Cover `rng` in address order: (sub-range, value) for entries, (gap, None) for gaps."""
        cursor = rng.start
        for entry_range, value in self.overlapping(rng):
            if entry_range.start > cursor:  # both bounds come from valid ranges
                yield MemoryRange.checked_already(cursor, entry_range.start), None
            yield entry_range, value
            cursor = entry_range.end
        if cursor < rng.end:
            yield MemoryRange.checked_already(cursor, rng.end), None
