"""The ranges that open views (`GuestMemory.view`) pin in one mapper: an Unmap touching a pinned
range is acknowledged only once no view, nor a slice of one that outlived its block, can still
reach the old memory. Every method runs under the mapper's access lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from ..protocol.ranges import MemoryRange
from .chunks import Chunk

if TYPE_CHECKING:
    from .core import VaMapper


def _refs_in(table: dict[int, object], key: int) -> int:
    """References to `table[key]`, counted the same way for every table: a count is compared
    only with another made by this same code, since what `sys.getrefcount` counts differs
    between Python versions and between interpreted and compiled code."""
    return sys.getrefcount(table[key])


#: what `_refs_in` counts of an object referred to by its table alone
_ALONE = _refs_in({0: object()}, 0)


class ViewPins:
    """The open views of one mapper, by view id: (start, end, writable)."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[int, int, bool]] = {}
        #: view id -> exporter of a view whose slices outlived its block (still pinned until
        #: this table is the only one left referring to it). A reference count, not a weak
        #: reference: the cyclic collector clears weak references before it runs finalizers,
        #: which may still read (or keep) a slice of a cycle it collects.
        self._escaped: dict[int, object] = {}
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self.open)

    def pin(self, start: int, end: int, writable: bool) -> int:
        """Pin [start, end) for a view being opened; returns its id."""
        self._next += 1
        self.open[self._next] = (start, end, writable)
        return self._next

    def end(self, view_id: int, escaped: object = None) -> tuple[int, int] | None:
        """A view's block ended. With `escaped` (its exporter, still referenced by slices that
        outlived the block) the pin stays until those slices are gone, and the pinned range is
        returned; else the pin ends and None is returned."""
        if escaped is not None:
            self._escaped[view_id] = escaped
            start, end, _ = self.open[view_id]
            return start, end
        self.open.pop(view_id, None)
        return None

    def release_escaped(self) -> None:
        """Unpin views whose escaped slices have all been released."""
        for view_id in list(self._escaped):
            if _refs_in(self._escaped, view_id) <= _ALONE:  # the last slice is gone
                del self._escaped[view_id]
                self.open.pop(view_id, None)

    def pinned(self, rng: MemoryRange, for_writing: bool = False) -> bool:
        """Whether an open view (a writable one, with `for_writing`) overlaps `rng`."""
        return any(
            (w or not for_writing) and start < rng.end and rng.start < end
            for start, end, w in self.open.values()
        )


def end_copy_on_write(mapper: VaMapper, part: MemoryRange, chunk: Chunk) -> None:
    """Replace a copy-on-write chunk (a read-only backing under a writable view that was still
    open) by the read-only backing it stands for, once no writable view is open on it any more
    (lock held)."""
    hit = mapper.chunks.lookup(part.start)
    if hit is None or hit[1] is not chunk:
        return
    crange = hit[0]
    if mapper.views.pinned(crange, for_writing=True):
        return  # another writable view still needs the private copy
    fd = mapper.fds.get(chunk.mappable_id)
    if fd is None:
        mapper.reservation.map_anon(crange.start, crange.len, False)
    else:
        mapper.reservation.map_fd(crange.start, crange.len, fd, chunk.file_offset, False)
    chunk.cow = False


@contextlib.contextmanager
def lent(
    mapper: VaMapper, view_id: int, exporter: ctypes.Array[ctypes.c_char], write: bool
) -> Iterator[memoryview]:
    """The memoryview of a pinned view (read-only unless `write`), for the length of a block;
    then its pin ends, or stays while a slice of it outlived the block."""
    own: dict[int, object] = {0: exporter}
    del exporter  # referred to by `own` alone: counted as in ViewPins
    alone = _refs_in(own, 0)
    raw = memoryview(cast("ctypes.Array[ctypes.c_char]", own[0])).cast("B")
    view = raw if write else raw.toreadonly()
    try:
        yield view
    finally:
        with contextlib.suppress(BufferError):  # the view itself is still exported: that
            view.release()  # counts as escaping, below
            raw.release()
        # Nothing else refers to the exporter but `own` unless a slice of the view escaped the
        # block (each keeps it alive): then the range stays pinned until it is gone.
        escaped = _refs_in(own, 0) > alone
        mapper.unpin(view_id, own.pop(0) if escaped else None)
