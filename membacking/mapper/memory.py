"""`GuestMemory`: read and write guest memory by guest-physical address, and `attach()`.

Each access checks a one-entry cache of the chunk last used, then copies, all under the
mapper's access lock; a miss walks the mapped-range table and, where nothing is mapped, faults
(asks the manager, waits, retries).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NamedTuple

from .. import units
from ..errors import (
    DetachedError,
    GuestMemoryError,
    MembackingError,
    OutOfRangeError,
    ReadOnlyError,
)
from ..ffi import MADV_DONTNEED, MADV_HUGEPAGE, MADV_POPULATE_WRITE, hugepage_advice_supported
from ..protocol.messages import PRIVATE_MAPPABLE
from ..protocol.ranges import PAGE_SIZE, MemoryRange
from ..runtime import RuntimePaths
from .core import MAX_FAULTS, VaMapper
from .link import ManagerLink


class SharedRange(NamedTuple):
    """A range of guest RAM a third party can map: `size` bytes of `fd` at `file_offset`."""

    gpa: int
    size: int
    fd: int
    file_offset: int
    writable: bool


class GuestMemory:
    """Guest memory as seen by one mapper process. Use as a context manager, or `detach()`."""

    def __init__(self, mapper: VaMapper, name: str) -> None:
        self._mapper = mapper
        self._lock = mapper.lock
        self._hot = mapper.hot
        self._mv = mapper.mv
        self._space = mapper.address_space
        self._structs: dict[str, struct.Struct] = {}
        self.name = name

    # ---- identity ------------------------------------------------------------------------------

    @property
    def mapper_id(self) -> int:
        return self._mapper.id

    @property
    def address_space(self) -> int:
        return self._space

    @property
    def eager(self) -> bool:
        return self._mapper.eager

    @property
    def manager_gone(self) -> str | None:
        """Why this mapper lost its manager (stopped, evicted, connection lost), or None while it
        is served. Mapped memory keeps working either way; new faults fail."""
        return self._mapper.gone

    def make_eager(self, timeout: float = 30.0) -> None:
        """Upgrade this lazy mapper in place: the manager replays every mapping it lacks and
        pushes new ones from now on. On failure it stays lazy and keeps what it got."""
        self._mapper.set_eager(timeout)

    def mapped_ranges(self) -> list[tuple[MemoryRange, bool]]:
        """What is mapped in this process now: (range, writable), in address order."""
        with self._lock:
            return [(r, c.writable) for r, c in self._mapper.chunks.items()]

    # ---- the general path ----------------------------------------------------------------------

    def _check(self, gpa: int, n: int) -> None:
        if type(gpa) is not int or type(n) is not int:
            raise TypeError(f"guest address and length must be integers, got {gpa!r}, {n!r}")
        if gpa < 0 or n < 0:
            raise ValueError(f"guest address and length must not be negative ({gpa}, {n})")
        if gpa + n > self._space:
            raise OutOfRangeError(
                f"GPA {gpa:#x}+{n:#x} lies outside the {self._space:#x}-byte guest address space",
                gpa,
            )

    def _span(
        self, gpa: int, n: int, write: bool, action: Callable[[int, int], None] | None
    ) -> None:
        """Run `action(start, end)` under the lock on each mapped piece of [gpa, gpa+n)."""
        self._check(gpa, n)
        mapper = self._mapper
        pos, end = gpa, gpa + n
        faults = 0
        while pos < end:
            with self._lock:
                if mapper.closed:
                    raise DetachedError("this GuestMemory is detached", pos)
                hit = mapper.chunks.lookup(pos)
                if hit is not None:
                    rng, chunk = hit
                    if write and not chunk.writable:
                        raise ReadOnlyError(f"GPA {pos:#x} is mapped read-only; cannot write", pos)
                    stop = min(end, rng.end)
                    if action is not None:
                        action(pos, stop)
                    hot = self._hot
                    hot[0], hot[1], hot[2] = rng.start, rng.end, chunk.writable
                    pos = stop
                    continue
            faults += 1
            if faults > MAX_FAULTS:
                raise GuestMemoryError(f"GPA {pos:#x} keeps being unmapped while accessed", pos)
            mapper.fault(pos, end, write)

    # ---- reads and writes ----------------------------------------------------------------------

    def read_at(self, gpa: int, n: int) -> bytes:
        """Read `n` bytes at `gpa`."""
        with self._lock:
            hot = self._hot
            if hot[0] <= gpa and gpa + n <= hot[1] and n >= 0:
                return self._mv[gpa : gpa + n].tobytes()
        self._check(gpa, n)  # before allocating: n may be anything
        out = bytearray(n)
        self._span(
            gpa, n, False, lambda a, b: out.__setitem__(slice(a - gpa, b - gpa), self._mv[a:b])
        )
        return bytes(out)

    def read_into(self, gpa: int, buf: Any) -> None:
        """Fill the writable buffer `buf` from guest memory at `gpa`."""
        dst = memoryview(buf).cast("B")
        n = dst.nbytes
        with self._lock:
            hot = self._hot
            if hot[0] <= gpa and gpa + n <= hot[1]:
                dst[:] = self._mv[gpa : gpa + n]
                return
        self._span(
            gpa, n, False, lambda a, b: dst.__setitem__(slice(a - gpa, b - gpa), self._mv[a:b])
        )

    def write_at(self, gpa: int, data: Any) -> None:
        """Write the bytes-like `data` at `gpa`."""
        src = memoryview(data).cast("B")
        n = src.nbytes
        with self._lock:
            hot = self._hot
            if hot[2] and hot[0] <= gpa and gpa + n <= hot[1]:
                self._mv[gpa : gpa + n] = src
                return
        self._span(
            gpa, n, True, lambda a, b: self._mv.__setitem__(slice(a, b), src[a - gpa : b - gpa])
        )

    def fill_at(self, gpa: int, byte: int, n: int) -> None:
        """Set `n` bytes at `gpa` to `byte`."""
        if type(byte) is not int or not 0 <= byte <= 255:
            raise ValueError(f"fill byte must be 0..255, got {byte!r}")
        reservation = self._mapper.reservation
        self._span(gpa, n, True, lambda a, b: reservation.fill(a, b - a, byte))

    def _struct(self, fmt: str) -> struct.Struct:
        st = self._structs.get(fmt)
        if st is None:
            try:
                st = struct.Struct(fmt)
            except struct.error as exc:
                raise ValueError(f"invalid struct format {fmt!r}: {exc}") from None
            self._structs[fmt] = st
        return st

    def read_plain(self, gpa: int, fmt: str) -> Any:
        """Read a value of struct format `fmt` (one field: the value, else a tuple)."""
        st = self._structs.get(fmt) or self._struct(fmt)
        with self._lock:
            hot = self._hot
            if hot[0] <= gpa and gpa + st.size <= hot[1]:
                values = st.unpack_from(self._mv, gpa)
                return values[0] if len(values) == 1 else values
        values = st.unpack(self.read_at(gpa, st.size))
        return values[0] if len(values) == 1 else values

    def write_plain(self, gpa: int, fmt: str, value: Any) -> None:
        """Write `value` (a tuple for several fields) in struct format `fmt`."""
        st = self._structs.get(fmt) or self._struct(fmt)
        values = value if isinstance(value, tuple) else (value,)
        with self._lock:
            hot = self._hot
            if hot[2] and hot[0] <= gpa and gpa + st.size <= hot[1]:
                st.pack_into(self._mv, gpa, *values)
                return
        self.write_at(gpa, st.pack(*values))

    def ensure_mapped(
        self, rng: MemoryRange | int, size: int | None = None, write: bool = False
    ) -> None:
        """Map a range now (a MemoryRange, or gpa and size) instead of at first access."""
        if isinstance(rng, MemoryRange):
            gpa, n = rng.start, rng.len
        else:
            if size is None:
                raise TypeError("ensure_mapped(gpa, size) needs a size")
            gpa, n = rng, size
        self._span(gpa, n, write, None)

    @contextlib.contextmanager
    def view(self, gpa: int, n: int, write: bool = False) -> Iterator[memoryview]:
        """A memoryview of guest memory valid until the block ends (read-only where the memory
        is; `write=True` insists on writable memory). A slice kept past the block keeps the range
        pinned (its Unmaps wait) until the slice is released."""
        self._check(gpa, n)
        mapper = self._mapper
        end = gpa + n
        for _ in range(MAX_FAULTS):
            self._span(gpa, n, write, None)  # fault everything in
            with self._lock:
                pieces = [
                    (r, c) for r, c in mapper.chunks.overlapping(MemoryRange.bounding(gpa, end))
                ]
                covered = sum(min(r.end, end) - max(r.start, gpa) for r, _ in pieces) == n
                if covered or n == 0:
                    writable = all(c.writable for _, c in pieces)
                    view_id = mapper.pin(gpa, end, writable)
                    exporter = mapper.reservation.exporter(gpa, n)
                    raw = memoryview(exporter).cast("B")
                    view = raw if writable else raw.toreadonly()
                    break
        else:
            raise GuestMemoryError(f"GPA {gpa:#x}+{n:#x} keeps being unmapped while viewed", gpa)
        try:
            yield view
        finally:
            with contextlib.suppress(BufferError):  # the view itself is still exported: that
                view.release()  # counts as escaping, below
                raw.release()
            # Nothing else refers to the exporter but this name (and getrefcount's argument)
            # unless a slice of the view escaped the block: then the range stays pinned.
            escaped = sys.getrefcount(exporter) > 2
            mapper.unpin(view_id, exporter if escaped else None)

    # ---- sharing and private RAM ---------------------------------------------------------------

    def sharing(self) -> list[SharedRange] | None:
        """The guest RAM as (gpa, size, fd, file offset, writable) for a third party to map
        (the fds are duplicates the caller owns); None in private RAM mode. To get the fds this
        mapper maps every region (and so holds them all from then on, as an eager one would)."""
        from ..control_client import ControlClient

        regions = ControlClient(self._mapper.link.paths.root).regions()
        if any(r["backing"] == "private" for r in regions):
            return None
        out = []
        for region in regions:
            if not region["active"]:
                continue
            for sub in region["mappings"]:
                gpa = region["gpa"] + sub["offset"]
                self.ensure_mapped(gpa, sub["size"])
                fd = self._mapper.fds.dup(sub["mappable_id"])
                if fd is None:
                    continue
                out.append(
                    SharedRange(
                        gpa,
                        sub["size"],
                        fd,
                        sub["file_offset"],
                        sub["writable"] and region["writable"],
                    )
                )
        return out

    def _private(self, gpa: int, size: int) -> None:
        if (gpa | size) % PAGE_SIZE or size <= 0:
            raise ValueError(f"{gpa:#x}+{size:#x} must be page-aligned and non-empty")
        self.ensure_mapped(gpa, size)
        with self._lock:
            for _, chunk in self._mapper.chunks.overlapping(MemoryRange(gpa, gpa + size)):
                if chunk.mappable_id != PRIVATE_MAPPABLE:
                    raise GuestMemoryError(f"GPA {gpa:#x}+{size:#x} is not private RAM", gpa)

    def commit(self, gpa: int, size: int) -> None:
        """Back private RAM with memory now (idempotent)."""
        self._private(gpa, size)
        with self._lock, contextlib.suppress(OSError):  # older kernels: first touch commits
            self._mapper.reservation.madvise(gpa, size, MADV_POPULATE_WRITE)

    def decommit(self, gpa: int, size: int) -> None:
        """Give private RAM's pages back to the host; they read back as zeros."""
        self._private(gpa, size)
        with self._lock:
            self._mapper.reservation.madvise(gpa, size, MADV_DONTNEED)

    def madvise_hugepage(self, gpa: int, size: int) -> bool:
        """Ask for transparent huge pages on private RAM; False where the kernel will not."""
        self._private(gpa, size)
        if not hugepage_advice_supported():
            return False
        with self._lock:
            try:
                self._mapper.reservation.madvise(gpa, size, MADV_HUGEPAGE)
            except OSError:
                return False
        return True

    # ---- lifetime ------------------------------------------------------------------------------

    def detach(self) -> None:
        """Leave the manager and release this process's mappings (idempotent)."""
        self._mapper.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"<GuestMemory mapper={self.mapper_id} name={self.name!r}>"


def attach(
    runtime_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    *,
    eager: bool = False,
    timeout: float = 10.0,
    fault_timeout: float = 30.0,
    reconnect_timeout: float = 30.0,
) -> GuestMemory:
    """Attach this process to the manager serving `runtime_dir` as a mapper named `name`.

    If the connection to the manager is lost (it crashed, or announced a restart), the mapper
    keeps every mapping and registers again with the manager that comes back on `runtime_dir`
    within `reconnect_timeout` seconds (0: never; faults fail with ManagerGoneError at once);
    faults in the meantime wait for it."""
    if name is None:
        name = f"mapper-{os.getpid()}"
    for what, value in (("timeout", timeout), ("fault_timeout", fault_timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise MembackingError(f"{what} must be a positive number of seconds, got {value!r}")
    if not isinstance(reconnect_timeout, int | float) or not reconnect_timeout >= 0:
        raise MembackingError(f"reconnect_timeout must be >= 0 seconds, got {reconnect_timeout!r}")
    try:
        units.check_name(name)
    except ValueError as exc:
        raise MembackingError(str(exc)) from None
    link = ManagerLink(RuntimePaths.resolve(runtime_dir), name, timeout)
    try:
        mapper = VaMapper(link, fault_timeout=fault_timeout, reconnect_timeout=reconnect_timeout)
    except BaseException:
        link.close()
        raise
    memory = GuestMemory(mapper, name)
    if eager:
        try:
            mapper.set_eager(timeout)
        except BaseException:
            memory.detach()
            raise
    return memory
