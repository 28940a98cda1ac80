"""The ranges that open views (`GuestMemory.view`) pin in one mapper: an Unmap touching a pinned
range is acknowledged only once no view, nor a slice of one that outlived its block, can still
reach the old memory. Every method runs under the mapper's access lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..protocol.ranges import MemoryRange
from .chunks import Chunk

if TYPE_CHECKING:
    from .core import VaMapper

#: a weak reference to the exporter of a view whose slices outlived its block
Escaped = weakref.ref[ctypes.Array[ctypes.c_char]]


class ViewPins:
    """The open views of one mapper, by view id: (start, end, writable)."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[int, int, bool]] = {}
        #: view id -> a weak reference to the exporter of a view whose slices outlived its
        #: block (still pinned): the slices alone keep the exporter alive, so it dies with the
        #: last of them (no reference count is read: their values differ between Pythons and
        #: between compiled and interpreted code)
        self._escaped: dict[int, Escaped] = {}
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self.open)

    def pin(self, start: int, end: int, writable: bool) -> int:
        """Pin [start, end) for a view being opened; returns its id."""
        self._next += 1
        self.open[self._next] = (start, end, writable)
        return self._next

    def end(self, view_id: int, escaped: Escaped | None = None) -> tuple[int, int] | None:
        """A view's block ended. With `escaped` (a weak reference to its exporter, which slices
        that outlived the block keep alive) the pin stays until those slices are gone, and the
        pinned range is returned; else the pin ends and None is returned."""
        if escaped is not None:
            self._escaped[view_id] = escaped
            start, end, _ = self.open[view_id]
            return start, end
        self.open.pop(view_id, None)
        return None

    def release_escaped(self) -> None:
        """Unpin views whose escaped slices have all been released."""
        for view_id in list(self._escaped):
            if self._escaped[view_id]() is None:  # the last slice is gone, and its exporter
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
    raw = memoryview(exporter).cast("B")
    view = raw if write else raw.toreadonly()
    try:
        yield view
    finally:
        with contextlib.suppress(BufferError):  # the view itself is still exported: that
            view.release()  # counts as escaping, below
            raw.release()
        # Nothing else refers to the exporter but this name unless a slice of the view escaped
        # the block (each keeps it alive): then the range stays pinned until it is gone.
        ref = weakref.ref(exporter)
        del exporter
        mapper.unpin(view_id, None if ref() is None else ref)
