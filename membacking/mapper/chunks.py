"""What backs each mapped range of a mapper's reservation: `Chunk`, and `ChunkTable`, the range
map of chunks that the mapper thread edits (under the access lock) and accesses look up.
"""

from __future__ import annotations

from ..protocol.rangemap import RangeMap
from ..protocol.ranges import MemoryRange


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
    """The mapped ranges of one reservation."""

    __slots__ = ()

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
