"""Private RAM (OpenVMM's private mode): anonymous memory in the one mapper that owns it, and
what `GuestMemory.commit`, `decommit` and `madvise_hugepage` do with a range of it once it is
mapped and checked to be private.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..errors import GuestMemoryError
from ..ffi import MADV_DONTNEED, MADV_HUGEPAGE, MADV_POPULATE_WRITE, hugepage_advice_supported
from ..protocol.messages import PRIVATE_MAPPABLE
from ..protocol.ranges import PAGE_SIZE, MemoryRange
from .core import VaMapper


def check(mapper: VaMapper, gpa: int, size: int, ensure_mapped: Callable[[int, int], None]) -> None:
    """Map [gpa, gpa+size) (page-aligned, non-empty) and check that all of it is private RAM."""
    if (gpa | size) % PAGE_SIZE or size <= 0:
        raise ValueError(f"{gpa:#x}+{size:#x} must be page-aligned and non-empty")
    ensure_mapped(gpa, size)
    with mapper.lock:
        for _, chunk in mapper.chunks.overlapping(MemoryRange(gpa, gpa + size)):
            if chunk.mappable_id != PRIVATE_MAPPABLE:
                raise GuestMemoryError(f"GPA {gpa:#x}+{size:#x} is not private RAM", gpa)


def commit(mapper: VaMapper, gpa: int, size: int) -> None:
    with mapper.lock, contextlib.suppress(OSError):  # older kernels: first touch commits
        mapper.reservation.madvise(gpa, size, MADV_POPULATE_WRITE)


def decommit(mapper: VaMapper, gpa: int, size: int) -> None:
    with mapper.lock:
        mapper.reservation.madvise(gpa, size, MADV_DONTNEED)


def hugepage(mapper: VaMapper, gpa: int, size: int) -> bool:
    if not hugepage_advice_supported():
        return False
    with mapper.lock:
        try:
            mapper.reservation.madvise(gpa, size, MADV_HUGEPAGE)
        except OSError:
            return False
    return True
