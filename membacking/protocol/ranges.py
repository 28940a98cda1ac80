"""Guest-physical address ranges: page-aligned, half-open, overflow-checked.

`MemoryRange` is an immutable (start, end) pair; every constructor validates alignment and bounds,
so a range that exists is a range that is safe to hand to mmap.
"""

from __future__ import annotations

from typing import NamedTuple

PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
#: Exclusive upper bound of any guest-physical address (64-bit address space).
MAX_ADDRESS = 1 << 64


class _Bounds(NamedTuple):
    start: int
    end: int


class MemoryRange(_Bounds):
    """A half-open, page-aligned range [start, end) of guest-physical addresses."""

    __slots__ = ()

    def __new__(cls, start: int, end: int) -> MemoryRange:
        if type(start) is not int or type(end) is not int:
            raise ValueError(f"range bounds must be integers, got {start!r}..{end!r}")
        if start < 0 or end > MAX_ADDRESS:
            raise ValueError(f"range {start:#x}..{end:#x} lies outside the 64-bit address space")
        if start > end:
            raise ValueError(f"range start {start:#x} is above its end {end:#x}")
        if (start | end) & PAGE_MASK:
            raise ValueError(
                f"range {start:#x}..{end:#x} is not aligned to the {PAGE_SIZE}-byte page size"
            )
        return super().__new__(cls, start, end)

    @classmethod
    def checked_already(cls, start: int, end: int) -> MemoryRange:
        """The range [start, end), for callers that have just checked everything `__new__`
        checks (the decoder, the range map's gaps): the hot paths skip the second check."""
        return tuple.__new__(cls, (start, end))

    @classmethod
    def from_size(cls, start: int, size: int) -> MemoryRange:
        """The range of `size` bytes starting at `start` (both page-aligned)."""
        if type(size) is not int or size < 0:
            raise ValueError(f"range size must be a non-negative integer, got {size!r}")
        if type(start) is int and start + size > MAX_ADDRESS:
            raise ValueError(f"range {start:#x} + {size:#x} overflows the 64-bit address space")
        return cls(start, start + size)

    @classmethod
    def bounding(cls, start: int, end: int) -> MemoryRange:
        """The smallest page-aligned range that covers the byte range [start, end)."""
        return cls(start & ~PAGE_MASK, (end + PAGE_MASK) & ~PAGE_MASK)

    @property
    def len(self) -> int:
        return self.end - self.start

    def is_empty(self) -> bool:
        return self.start == self.end

    def contains_addr(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def contains(self, other: MemoryRange) -> bool:
        return self.start <= other.start and other.end <= self.end

    def overlaps(self, other: MemoryRange) -> bool:
        return self.start < other.end and other.start < self.end

    def intersection(self, other: MemoryRange) -> MemoryRange:
        """The overlap of two ranges (empty, at `self.start`, when they do not overlap)."""
        start = max(self.start, other.start)
        end = min(self.end, other.end)
        if start >= end:
            return MemoryRange(self.start, self.start)
        return MemoryRange(start, end)

    def subtract(self, other: MemoryRange) -> list[MemoryRange]:
        """The parts of this range not covered by `other` (0, 1 or 2 ranges, in order)."""
        if not self.overlaps(other):
            return [] if self.is_empty() else [self]
        parts = []
        if self.start < other.start:
            parts.append(MemoryRange(self.start, other.start))
        if other.end < self.end:
            parts.append(MemoryRange(other.end, self.end))
        return parts

    def __str__(self) -> str:
        return f"{self.start:#x}-{self.end:#x}"

    def __repr__(self) -> str:
        return f"MemoryRange({self.start:#x}, {self.end:#x})"


def align_up(value: int) -> int:
    return (value + PAGE_MASK) & ~PAGE_MASK


def is_page_aligned(value: int) -> bool:
    return value & PAGE_MASK == 0
