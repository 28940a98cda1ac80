"""What backs each mapped range of a mapper's reservation: `Chunk`, `ChunkTable` (the range map
of chunks that the mapper thread edits under the access lock and accesses look up), and
`MapCountBudget`, which keeps the chunks' VMAs below vm.max_map_count with headroom.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import struct
import time

from ..protocol.messages import PACKED_MAPPING_FORMAT
from ..protocol.rangemap import RangeMap
from ..protocol.ranges import MemoryRange

#: where the kernel's limit of VMAs per process is read (once per mapper)
MAX_MAP_COUNT_PATH = "/proc/sys/vm/max_map_count"
#: the kernel's default, used where the file cannot be read
DEFAULT_MAX_MAP_COUNT = 65530
#: VMAs left, beyond those the process has when it attaches, for the rest of the process (its
#: heap, thread stacks, libraries loaded later)
DEFAULT_MAP_HEADROOM = 4096
#: one entry of PackedHoldings.mappings: start, size, mappable id, file offset, writable
_MAPPING = struct.Struct(PACKED_MAPPING_FORMAT)
#: environment variables that override the limit read from the kernel and the whole headroom
ENV_MAX_MAP_COUNT = "MEMBACKING_MAX_MAP_COUNT"
ENV_MAP_HEADROOM = "MEMBACKING_MAP_HEADROOM"
#: seconds between two log lines of refused Maps (the first is logged at once)
REPORT_EVERY = 1.0


class Chunk:
    """What backs one mapped range of the reservation."""

    __slots__ = ("cow", "file_offset", "mappable_id", "writable")

    def __init__(
        self, mappable_id: int, file_offset: int, writable: bool, cow: bool = False
    ) -> None:
        self.mappable_id = mappable_id
        self.file_offset = file_offset
        self.writable = writable
        #: mapped private and writable under an open writable view; remapped once it closes
        self.cow = cow


class ChunkTable(RangeMap[Chunk]):
    """The mapped ranges of one reservation, each also as the entry PackedHoldings lists it
    (`packed`): packed as it is mapped (about 0.3 us), so a mapper registering again after a
    manager restart sends what it holds without a walk of its chunks (1,000 chunks: about
    0.2 ms hot, twice that on busy cores, in the gap)."""

    __slots__ = ("_packed",)

    def __init__(self) -> None:
        super().__init__()
        #: each entry packed (PACKED_MAPPING_FORMAT), in the same order as the entries
        self._packed: list[bytes] = []

    def packed(self) -> bytes:
        """Every entry as PackedHoldings lists it, in address order."""
        return b"".join(self._packed)

    def clear(self) -> None:
        super().clear()
        self._packed.clear()

    def insert(self, rng: MemoryRange, value: Chunk) -> None:
        super().insert(rng, value)  # (raises before it changes anything)
        entry = _MAPPING.pack(
            rng.start, rng.end - rng.start, value.mappable_id, value.file_offset, value.writable
        )
        self._packed.insert(bisect.bisect_left(self._starts, rng.start), entry)

    def insert_sorted(self, items: list[tuple[MemoryRange, Chunk]]) -> None:
        for rng, value in items:
            self.insert(rng, value)

    def remove(self, rng: MemoryRange) -> Chunk:
        i = bisect.bisect_left(self._starts, rng.start)
        value = super().remove(rng)  # (raises if `rng` is not there)
        del self._packed[i]
        return value

    def remove_overlapping(self, rng: MemoryRange) -> list[tuple[MemoryRange, Chunk]]:
        i = self._first_overlapping_index(rng)
        removed = super().remove_overlapping(rng)
        del self._packed[i : i + len(removed)]
        return removed

    def cut(self, rng: MemoryRange) -> None:
        """Drop `rng`, keeping the parts of chunks that straddle its ends."""
        for crange, chunk in self.overlapping(rng):
            self.remove(crange)
            for part in crange.subtract(rng):
                self.insert(
                    part,
                    Chunk(
                        chunk.mappable_id,
                        chunk.file_offset + part.start - crange.start,
                        chunk.writable,
                        chunk.cow,  # a piece of a private copy is still one: remapped later
                    ),
                )


def vma_bound(chunks: int) -> int:
    """At most how many VMAs a reservation holding `chunks` mapped chunks is split into: each
    chunk is one mapping, and the unmapped gaps between and around them at most one more
    than the chunks (adjacent placeholder pieces merge)."""
    return 2 * chunks + 1


class MapCountBudget:
    """How many VMAs one mapper's reservation may be split into: the kernel's vm.max_map_count
    less `headroom` for everything else in the process. Past it the kernel refuses mappings
    and then the process's own allocations (MemoryError); this refuses the Map first."""

    __slots__ = ("_logged_at", "_unlogged", "allowed", "headroom", "limit")

    def __init__(self, limit: int, headroom: int) -> None:
        self.limit = limit
        self.headroom = headroom
        self.allowed = limit - headroom
        self._logged_at = -math.inf
        self._unlogged = 0

    @classmethod
    def from_environment(cls) -> MapCountBudget:
        """The kernel's limit (or $MEMBACKING_MAX_MAP_COUNT) less $MEMBACKING_MAP_HEADROOM, by
        default DEFAULT_MAP_HEADROOM more than the VMAs the process has now."""
        limit = _env_int(ENV_MAX_MAP_COUNT)
        if limit is None:
            limit = DEFAULT_MAX_MAP_COUNT
            with contextlib.suppress(OSError, ValueError), open(MAX_MAP_COUNT_PATH) as f:
                limit = int(f.read())
        headroom = _env_int(ENV_MAP_HEADROOM)
        if headroom is None:
            headroom = DEFAULT_MAP_HEADROOM + _vmas_now()
        return cls(limit, headroom)

    def refuses(self, table: ChunkTable, rng: MemoryRange) -> str | None:
        """Why mapping `rng` as one more chunk would go past the budget, or None if it fits."""
        now = len(table)
        if vma_bound(now + 2) <= self.allowed:  # the new chunk, and one it may split in two
            return None
        after = now + 1
        for crange, _ in table.overlapping(rng):
            after += len(crange.subtract(rng)) - 1
        if vma_bound(after) <= self.allowed:
            return None
        return (
            f"mapping {rng} would take this process's guest mappings to {vma_bound(after)} "
            f"VMAs, past vm.max_map_count ({self.limit}) less {self.headroom} kept for the "
            f"rest of the process; {now} ranges are mapped (unmap some, map fewer and larger "
            f"regions, or raise vm.max_map_count)"
        )

    def report(self, log: logging.Logger, mapper_id: int, rng: MemoryRange, why: str) -> None:
        """Log a refused Map: the first at once, then at most a line every REPORT_EVERY
        seconds, saying how many were refused in between (a huge access past the budget was
        refused a Map at a time, a line each: 26,000 lines)."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < REPORT_EVERY:
            return
        more = self._unlogged - 1
        also = f" ({more} more Maps refused since the last report)" if more else ""
        log.error("mapper %d: cannot map %s: %s%s", mapper_id, rng, why, also)
        self._logged_at, self._unlogged = now, 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        return None


def _vmas_now() -> int:
    """The VMAs this process has now (a line each in /proc/self/maps); 0 if unknown."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
