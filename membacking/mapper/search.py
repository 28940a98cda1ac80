"""Finding a byte pattern in guest memory, in bounded steps, reading the backing files
(peek.py): a search of memory never written allocates none of it.

Each step copies at most `step` bytes (plus the pattern's length less one carried over from the
step before, so matches that straddle two steps are found once) into one reused buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .peek import peek_into
from .plain import as_int

if TYPE_CHECKING:
    from .memory import GuestMemory

#: bytes copied per step of a search
FIND_STEP = 4 << 20


def pattern_bytes(pattern: object) -> bytes:
    """`pattern` as bytes: it must be bytes-like and not empty (TypeError, ValueError). A str
    is refused rather than encoded: text has no one byte form."""
    try:
        data = memoryview(pattern).tobytes()  # type: ignore[arg-type]
    except TypeError:
        hint = " (encode text first, e.g. 'abc'.encode())" if isinstance(pattern, str) else ""
        raise TypeError(
            f"the pattern to find must be bytes-like (bytes, bytearray, memoryview), got "
            f"{type(pattern).__name__}{hint}"
        ) from None
    if not data:
        raise ValueError("the pattern to find is empty")
    return data


def find_all(
    memory: GuestMemory,
    pattern: bytes,
    gpa: int,
    n: int,
    *,
    step: int = FIND_STEP,
    progress: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """The GPAs where `pattern` starts inside [gpa, gpa+n), ascending (overlapping matches
    included). `progress(k)` is called as each k bytes have been searched."""
    pattern = pattern_bytes(pattern)
    if step < len(pattern):
        step = len(pattern)
    if type(gpa) is not int or type(n) is not int:
        gpa, n = as_int(gpa), as_int(n)  # an int subclass (IntEnum) as its int
    if type(gpa) is not int or type(n) is not int or gpa < 0 or n < 0:
        raise ValueError(f"guest address and length must be non-negative integers ({gpa}, {n})")
    keep = len(pattern) - 1
    buf = bytearray(step + keep)
    base, have, pos, end = gpa, 0, gpa, gpa + n  # buf[0] is at GPA `base`; `have` carried bytes
    while pos < end:
        take = min(step, end - pos)
        with memoryview(buf) as view:
            peek_into(memory, pos, view[have : have + take])  # (allocates no page)
        valid = have + take
        i = buf.find(pattern, 0, valid)
        while i != -1:
            yield base + i
            i = buf.find(pattern, i + 1, valid)
        pos += take
        if progress is not None:
            progress(take)
        have = min(keep, valid)
        buf[:have] = buf[valid - have : valid]
        base = pos - have
