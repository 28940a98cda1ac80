"""Reads that allocate nothing, for inspection (`find_all`, `membacking mem read|dump|find`):
the bytes come from the backing files with pread, under the access lock as any read, so guest
memory never written reads as zeros without a page of it being allocated. A read fault on a
tmpfs or memfd page allocates it, and on a full tmpfs raises SIGBUS.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..protocol.messages import PRIVATE_MAPPABLE

if TYPE_CHECKING:
    from .memory import GuestMemory


def peek_into(memory: GuestMemory, gpa: int, dst: memoryview) -> None:
    """Fill `dst` (bytes) from guest memory at `gpa`, as `read_into` does, but reading each
    backed part from its file (pread) rather than through the mapping: private RAM, and a
    range mapped as a private copy under an open view, are read through the mapping."""
    n = dst.nbytes
    gpa, n = memory._check(gpa, n)
    mapper, whole = memory._mapper, memory._mv

    def copy() -> None:  # under the access lock, all of [gpa, gpa+n) mapped (_access)
        pos, end = gpa, gpa + n
        while pos < end:
            hit = mapper.chunks.lookup(pos)
            assert hit is not None  # (mapped: checked under this same hold of the lock)
            rng, chunk = hit
            stop = min(end, rng.end)
            at = pos - gpa
            fd = None
            if chunk.mappable_id != PRIVATE_MAPPABLE and not chunk.cow:
                # held while the chunk is mapped: a Release comes only after its Unmap, which
                # waits for this lock
                fd = mapper.fds.get(chunk.mappable_id)
            got = 0
            if fd is not None:
                with dst[at : at + stop - pos] as part:
                    got = os.preadv(fd, [part], chunk.file_offset + (pos - rng.start))
            if got < stop - pos:  # no fd, or the file ended short: the mapping has the rest
                dst[at + got : at + stop - pos] = whole[pos + got : stop]
            pos = stop

    memory._access(gpa, n, False, copy)


def peek(memory: GuestMemory, gpa: int, n: int) -> bytes:
    """The `n` bytes at `gpa`, read as `peek_into` does."""
    buf = bytearray(n)
    with memoryview(buf) as view:
        peek_into(memory, gpa, view)
    return bytes(buf)
