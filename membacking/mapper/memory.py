"""`GuestMemory`: read and write guest memory by guest-physical address.

Each access checks its arguments and a one-entry cache of the chunk last used, then copies, all
under the mapper's access lock (aligned plain words: without it, through views that any change of
the mappings retires first); a miss checks the mapped-range table for the whole range and faults
what is missing (asks the manager, waits, retries) before copying anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import time
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import Any, TypeVar

from ..errors import DetachedError, GuestMemoryError, OutOfRangeError, ReadOnlyError
from ..ffi import LOCK_FREE_WORDS
from ..protocol.ranges import MemoryRange
from . import privateram, reconnect
from .core import MAX_FAULTS, VaMapper
from .lease import renew
from .plain import (
    LARGE_FORMAT,
    PlainFormat,
    PlainFormats,
    add_delta,
    address_and_length,
    byte_view,
    fetch_add_op,
    fill_byte,
    pack,
    unpacked,
)
from .sharing import SharedRange, shared_ranges
from .views import lent

#: the lease check every access makes (mapper/lease.py): one call and one compare
_monotonic = time.monotonic

T = TypeVar("T")


class GuestMemory:
    """Guest memory as seen by one mapper process. Use as a context manager, or `detach()`.

    Every accessor raises TypeError for an argument of the wrong type (an address or length is
    an int, of a subclass such as IntEnum too, but not a bool), ValueError for a bad value,
    OutOfRangeError past the address space, and NoMappingError, ReadOnlyError,
    ManagerGoneError, DetachedError or GuestMemoryError when the memory cannot be reached; a
    failed access has read or written nothing. Aligned plain values of 1, 2, 4 and 8 bytes and
    the atomic operations are single-copy atomic; the rest copies bytes (docs/ARCHITECTURE.md,
    "Accesses").
    """

    def __init__(self, mapper: VaMapper, name: str) -> None:
        self._mapper = mapper
        self._lock = mapper.lock
        self._hot = mapper.hot
        #: what the lock-free fast paths of words check: the hot chunk, or (without the GIL) an
        #: empty one that sends them to the general path
        self._words_hot = mapper.hot if LOCK_FREE_WORDS else [0, 0, False, 0.0]
        self._mv = mapper.mv
        self._space = mapper.address_space
        self._reservation = mapper.reservation
        self._formats = PlainFormats(mapper.reservation)
        #: the formats' cache (struct format -> FastPlain), looked up by the fast paths
        self._plain = self._formats.cache
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
        """Why this mapper lost its manager (stopped, evicted, connection lost, or this process
        was forked from the one that attached it), or None while it is served or waits for a
        successor. New faults fail; every mapping was dropped (accesses raise
        MappingsDroppedError, DetachedError in a forked child)."""
        return self._mapper.gone

    def on_registered_again(self, hook: Callable[[bool, int], None]) -> None:
        """Call `hook(kept, old_mapper_id)` on the mapper thread (return quickly) each time this
        mapper registered again (`kept`: the same memory; `mapper_id` is the new id by then)."""
        reconnect.add_hook(self._mapper, hook)

    def make_eager(self, timeout: float = 30.0) -> None:
        """Upgrade this lazy mapper in place: the manager replays every mapping it lacks and
        pushes new ones from now on. On failure it stays lazy and keeps what it got."""
        self._mapper.set_eager(timeout)

    def mapped_ranges(self) -> list[tuple[MemoryRange, bool]]:
        """What is mapped in this process now: (range, writable), in address order."""
        with self._lock:
            return [(r, c.writable) for r, c in self._mapper.chunks.items()]

    # ---- the general path ----------------------------------------------------------------------

    def _check(self, gpa: Any, n: Any) -> tuple[int, int]:
        """`gpa, n` as plain ints (of an int subclass such as IntEnum: converted); TypeError,
        ValueError or OutOfRangeError unless [gpa, gpa+n) is a range of the guest address space
        (bools are not addresses)."""
        if type(gpa) is not int or type(n) is not int:
            gpa, n = address_and_length(gpa, n)
        if gpa < 0 or n < 0:
            raise ValueError(f"guest address and length must not be negative ({gpa}, {n})")
        if gpa + n > self._space:
            raise OutOfRangeError(
                f"GPA {gpa:#x}+{n:#x} lies outside the {self._space:#x}-byte guest address space",
                gpa,
            )
        return gpa, n

    def _missing(self, gpa: int, end: int, write: bool) -> int | None:
        """The first byte of [gpa, end) that is not mapped, or None (lock held). ReadOnlyError
        if `write` and a part is mapped read-only. Leaves the last chunk seen in the cache."""
        mapper = self._mapper
        if mapper.closed:
            raise DetachedError("this GuestMemory is detached", gpa)
        lookup = mapper.chunks.lookup
        pos = gpa
        while pos < end:
            hit = lookup(pos)
            if hit is None:
                return pos
            rng, chunk = hit
            if write and not chunk.writable:
                raise ReadOnlyError(f"GPA {pos:#x} is mapped read-only; cannot write", pos)
            # one step (a slice): the fast paths of words read the list without the lock
            self._hot[0:3] = rng.start, rng.end, chunk.writable
            pos = rng.end
        return None

    def _access(self, gpa: int, n: int, write: bool, op: Callable[[], T]) -> T:
        """Fault in all of [gpa, gpa+n) (checked by the caller), then run `op` under one hold of
        the lock once the table shows the whole range mapped (and writable with `write`): `op`
        runs entirely or not at all. A range unmapped again meanwhile is faulted again, at most
        MAX_FAULTS times in all. Since GPA g lives at base + g, a range that is all mapped is
        one contiguous part of the reservation, whatever chunks it spans."""
        end = gpa + n
        faults = 0
        hot = self._hot
        while True:
            with self._lock:
                missing = self._missing(gpa, end, write)
                if missing is None and _monotonic() < hot[3]:
                    return op()
            if missing is None:  # mapped, but the lease ran out: the mapper thread checks first
                renew(self._mapper)
                continue
            faults += 1
            if faults > MAX_FAULTS:
                raise GuestMemoryError(
                    f"GPA {missing:#x} keeps being unmapped while accessed", missing
                )
            self._mapper.fault(missing, end, write)

    # ---- reads and writes ----------------------------------------------------------------------
    #
    # Each has a fast path (the range lies in the cached chunk), then the general one. Errors:
    # TypeError for arguments of the wrong type, ValueError for bad values, OutOfRangeError past
    # the address space; NoMappingError, ReadOnlyError, ManagerGoneError, DetachedError or
    # GuestMemoryError when the memory cannot be reached. Nothing is read or written then.

    def read_at(self, gpa: int, n: int) -> bytes:
        """Read `n` bytes at `gpa`. Nothing is allocated before the whole range is mapped."""
        if type(gpa) is int and type(n) is int:
            with self._lock:
                hot = self._hot
                if hot[0] <= gpa and gpa + n <= hot[1] and n >= 0 and _monotonic() < hot[3]:
                    return self._mv[gpa : gpa + n].tobytes()
        return self._read(gpa, n)

    def _read(self, gpa: Any, n: Any) -> bytes:
        gpa, n = self._check(gpa, n)
        mv = self._mv
        return self._access(gpa, n, False, lambda: mv[gpa : gpa + n].tobytes())

    def read_into(self, gpa: int, buf: Any) -> None:
        """Fill the writable bytes-like `buf` from guest memory at `gpa`."""
        try:
            dst = memoryview(buf).cast("B")
        except TypeError:
            dst = byte_view(buf, "read_into", writable=True)  # says why
        if dst.readonly:
            byte_view(buf, "read_into", writable=True)  # raises
        n = dst.nbytes
        if type(gpa) is int:
            with self._lock:
                hot = self._hot
                if hot[0] <= gpa and gpa + n <= hot[1] and _monotonic() < hot[3]:
                    dst[:] = self._mv[gpa : gpa + n]
                    return
        self._read_into(gpa, dst)

    def _read_into(self, gpa: Any, dst: memoryview) -> None:
        n = dst.nbytes
        gpa, n = self._check(gpa, n)
        self._access(gpa, n, False, lambda: dst.__setitem__(slice(None), self._mv[gpa : gpa + n]))

    def write_at(self, gpa: int, data: Any) -> None:
        """Write the bytes-like `data` at `gpa`: all of it, or (on an error) none of it."""
        try:
            src = memoryview(data).cast("B")
        except TypeError:
            src = byte_view(data, "write_at")  # says why
        n = src.nbytes
        if type(gpa) is int:
            with self._lock:
                hot = self._hot
                if hot[2] and hot[0] <= gpa and gpa + n <= hot[1] and _monotonic() < hot[3]:
                    self._mv[gpa : gpa + n] = src
                    return
        self._write(gpa, src)

    def _write(self, gpa: Any, src: memoryview) -> None:
        n = src.nbytes
        gpa, n = self._check(gpa, n)
        self._access(gpa, n, True, lambda: self._mv.__setitem__(slice(gpa, gpa + n), src))

    def fill_at(self, gpa: int, byte: int, n: int) -> None:
        """Set `n` bytes at `gpa` to `byte` (0..255): all of them, or (on an error) none. The
        byte comes BEFORE the length (the CLI's `mem fill GPA LENGTH BYTE` has them the other
        way round)."""
        if type(byte) is not int or not 0 <= byte <= 255:
            byte = fill_byte(byte)
        gpa, n = self._check(gpa, n)
        reservation = self._mapper.reservation
        self._access(gpa, n, True, lambda: reservation.fill(gpa, n, byte))

    # ---- plain values and atomic words ---------------------------------------------------------
    #
    # A plain access of a 1-, 2-, 4- or 8-byte format at an address that is a multiple of its
    # size is one load or store of the whole word (an item of a cast memoryview is copied with
    # one fixed-size memcpy), so another process never sees part of it. Other accesses copy
    # bytes (a concurrent reader may see some old and some new bytes, never others).

    # The fast paths of aligned words take no lock: they check a snapshot of the hot chunk and
    # the lease (`start, end, writable, lease = hot` is one step: no other thread runs Python
    # in between), then make one load or store through a view of words that any change of the
    # mappings retires first (Reservation.words). A change after the check makes that view
    # raise ValueError instead of reaching the old pages, and the general path runs, under the
    # lock. A store takes only an int: converting anything else could run Python code between
    # the check and the copy.

    def read_plain(self, gpa: int, fmt: str) -> Any:
        """Read a value of struct format `fmt` (one field: the value, else a tuple). Atomic for
        1, 2, 4 and 8 bytes at an address aligned to that size."""
        try:
            view, shift, mask, single, word_bytes, values_of, _, _, st, _ = self._plain[fmt]
        except (KeyError, TypeError):
            view, shift, mask, single, word_bytes, values_of, _, _, st, _ = self._formats.parse(fmt)
        if type(gpa) is int:
            if view is not None and not gpa & mask:
                start, end, _, lease = self._words_hot
                if start <= gpa < end - mask and _monotonic() < lease:
                    try:
                        word = view[gpa >> shift]
                    except ValueError:  # the view was retired: the mappings changed since
                        word = self._load(gpa, fmt)
                else:
                    word = self._load(gpa, fmt)
                if word_bytes is None:
                    return word
                values = values_of(word_bytes(word))
                return values[0] if single else values
            with self._lock:  # not atomic: bytes
                hot = self._hot
                if hot[0] <= gpa and gpa + st.size <= hot[1] and _monotonic() < hot[3]:
                    values = st.unpack_from(self._mv, gpa)
                    return values[0] if single else values
        else:  # an int subclass (IntEnum) as its int: TypeError, ValueError for anything else
            return self.read_plain(self._check(gpa, st.size)[0], fmt)
        return unpacked(values_of(self.read_at(gpa, st.size)))

    def write_plain(self, gpa: int, fmt: str, value: Any) -> None:
        """Write `value` (a tuple for several fields) in struct format `fmt`: TypeError if it is
        of the wrong kind, ValueError if it does not fit. Atomic for 1, 2, 4 and 8 bytes at an
        address aligned to that size."""
        try:
            view, shift, mask, _, _, _, bytes_of, word_of, st, spec = self._plain[fmt]
        except (KeyError, TypeError):
            view, shift, mask, _, _, _, bytes_of, word_of, st, spec = self._formats.parse(fmt)
        if type(gpa) is not int or st.size > LARGE_FORMAT:
            gpa = self._check(gpa, st.size)[0]
            if st.size > LARGE_FORMAT:  # packed only once the range is mapped and writable
                self._access(gpa, st.size, True, tuple)
        if view is not None and not gpa & mask:
            try:
                if value.__class__ is bool:  # plain.pack says whether the format takes it
                    raise TypeError
                word = value if word_of is None else word_of(bytes_of(value))[0]
                start, end, writable, lease = self._words_hot
                if (
                    writable
                    and start <= gpa < end - mask
                    and word.__class__ is int
                    and _monotonic() < lease
                ):
                    view[gpa >> shift] = word
                    return
            except (struct.error, TypeError, ValueError):  # a value that does not fit (the
                pass  # general path says why), or a retired view
            self._store(gpa, fmt, spec.item(value))
            return
        # not atomic: a copy of the packed bytes (not pack_into, which clears them first)
        try:
            data = bytes_of(value) if value.__class__ is not bool else pack(st, fmt, value)
        except (struct.error, TypeError):
            data = pack(st, fmt, value)  # a tuple for one field, or a value that does not fit
        with self._lock:
            hot = self._hot
            if hot[2] and hot[0] <= gpa and gpa + len(data) <= hot[1] and _monotonic() < hot[3]:
                self._mv[gpa : gpa + len(data)] = data
                return
        self.write_at(gpa, data)

    def _load(self, gpa: int, fmt: str) -> Any:
        """The word at the aligned `gpa`, by the general path."""
        spec, current = self._plain[fmt][-1], self._formats.current
        self._check(gpa, spec.mask + 1)
        return self._access(gpa, spec.mask + 1, False, lambda: current(fmt)[gpa >> spec.shift])

    def _store(self, gpa: int, fmt: str, word: int) -> None:
        """Store the unsigned native `word` at the aligned `gpa`, by the general path."""
        spec, current = self._plain[fmt][-1], self._formats.current
        self._check(gpa, spec.mask + 1)
        self._access(
            gpa, spec.mask + 1, True, lambda: current(fmt).__setitem__(gpa >> spec.shift, word)
        )

    def _atomic(self, gpa: int, fmt: str) -> PlainFormat:
        """The format, checked for the atomic operations, and the int `gpa` checked for alignment
        (the rest of its checks are done by the hot-cache test or by the general path)."""
        spec = self._formats.atomic(fmt)
        if gpa & spec.mask:
            self._check(gpa, spec.mask + 1)
            raise ValueError(f"GPA {gpa:#x} is not aligned to the {spec.mask + 1}-byte word")
        return spec

    def compare_exchange(self, gpa: int, fmt: str, expected: int, new: int) -> tuple[bool, int]:
        """Atomically replace the integer of format `fmt` (4 or 8 bytes, either byte order) at
        the aligned `gpa` by `new` if it equals `expected`. Returns (replaced, value found).
        Raises as write_plain does; also ValueError for another format or an unaligned `gpa`,
        and AtomicsUnavailableError where libatomic is missing."""
        if type(gpa) is not int:  # an int subclass (IntEnum) as its int; errors: format first
            gpa = self._check(gpa, self._formats.atomic(fmt).mask + 1)[0]
        spec = self._atomic(gpa, fmt)
        old, word = spec.encode(expected), spec.encode(new)
        size = spec.mask + 1
        reservation = self._reservation
        with self._lock:
            hot = self._hot
            if hot[2] and hot[0] <= gpa < hot[1] - spec.mask and _monotonic() < hot[3]:
                ok, found = reservation.compare_exchange(gpa, size, old, word)
                return ok, spec.decode(found)
        self._check(gpa, size)
        ok, found = self._access(
            gpa, size, True, lambda: reservation.compare_exchange(gpa, size, old, word)
        )
        return ok, spec.decode(found)

    def fetch_add(self, gpa: int, fmt: str, delta: int) -> int:
        """Atomically add `delta` to the integer of format `fmt` (4 or 8 bytes, either byte
        order) at the aligned `gpa`, wrapping around like the hardware; returns the old value.
        `delta` may be -2**(bits-1) to 2**bits-1 (a negative one subtracts, for unsigned
        formats too); ValueError outside that, otherwise raises as compare_exchange does."""
        if type(gpa) is not int:  # an int subclass (IntEnum) as its int; errors: format first
            gpa = self._check(gpa, self._formats.atomic(fmt).mask + 1)[0]
        spec = self._atomic(gpa, fmt)
        addend = add_delta(spec, delta)
        size = spec.mask + 1
        if not spec.swapped:
            with self._lock:
                hot = self._hot
                if hot[2] and hot[0] <= gpa < hot[1] - spec.mask and _monotonic() < hot[3]:
                    return spec.decode(self._reservation.fetch_add(gpa, size, addend))  # type: ignore[no-any-return]
        self._check(gpa, size)
        op = fetch_add_op(self._reservation, spec, gpa, addend)
        return spec.decode(self._access(gpa, size, True, op))  # type: ignore[no-any-return]

    # ---- mapping ahead, and views --------------------------------------------------------------

    def ensure_mapped(
        self, rng: MemoryRange | int, size: int | None = None, write: bool = False
    ) -> None:
        """Map a range now (a MemoryRange, or gpa and size) instead of at first access; with
        `write`, insist that it is writable. Raises as an access of the range would."""
        if type(write) is not bool:
            raise TypeError(f"write must be True or False, got {write!r}")
        if isinstance(rng, MemoryRange):
            if size is not None:
                raise TypeError("ensure_mapped(MemoryRange) takes no size")
            gpa, n = rng.start, rng.len
        else:
            if size is None:
                raise TypeError("ensure_mapped(gpa, size) needs a size")
            gpa, n = rng, size
        gpa, n = self._check(gpa, n)
        self._access(gpa, n, write, lambda: None)

    @contextlib.contextmanager
    def view(self, gpa: int, n: int, write: bool = False) -> Iterator[memoryview]:
        """A memoryview of guest memory valid until the block ends: read-only unless `write=True`,
        which insists on writable memory and gives a writable view. A slice kept past the block
        keeps the range pinned (its Unmaps wait) until the slice is released. Raises as read_at
        does (with `write`, as write_at does) before the block is entered."""
        if type(write) is not bool:
            raise TypeError(f"write must be True or False, got {write!r}")
        gpa, n = self._check(gpa, n)
        mapper = self._mapper
        end = gpa + n

        def pin() -> tuple[int, ctypes.Array[ctypes.c_char]]:
            # only a writable view needs a private copy if its range turns read-only (core.py)
            return mapper.views.pin(gpa, end, write), mapper.reservation.exporter(gpa, n)

        # no name here for the exporter: lent() counts the references to it
        with lent(mapper, *self._access(gpa, n, write, pin), write) as view:
            yield view

    def find(self, pattern: bytes, gpa: int, n: int) -> int | None:
        """The GPA of the first occurrence of `pattern` (bytes-like; TypeError for a str: encode
        it first) in [gpa, gpa+n), or None (searched in bounded steps: never a whole copy)."""
        return next(self.find_all(pattern, gpa, n), None)

    def find_all(
        self,
        pattern: bytes,
        gpa: int,
        n: int,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[int]:
        """Every GPA in [gpa, gpa+n) where `pattern` starts, ascending (see search.py)."""
        from .search import find_all, pattern_bytes

        pattern = pattern_bytes(pattern)
        gpa, n = self._check(gpa, n)
        return find_all(self, pattern, gpa, n, progress=progress)

    # ---- sharing and private RAM ---------------------------------------------------------------

    def sharing(self, regions: Collection[str] | None = None) -> list[SharedRange] | None:
        """The guest RAM (of the named `regions`, or every active one) as (gpa, size, fd, file
        offset, writable) for a third party to map (the fds are duplicates the caller owns);
        None in private RAM mode. To get the fds this mapper maps those regions (and so holds
        them from then on, as an eager one would)."""
        return shared_ranges(self._mapper, self.ensure_mapped, regions)

    def _private(self, gpa: int, size: int) -> tuple[VaMapper, int, int]:
        gpa, size = self._check(gpa, size)
        privateram.check(self._mapper, gpa, size, self.ensure_mapped)
        return self._mapper, gpa, size

    def commit(self, gpa: int, size: int) -> None:
        """Back private RAM with memory now (idempotent)."""
        privateram.commit(*self._private(gpa, size))

    def decommit(self, gpa: int, size: int) -> None:
        """Give private RAM's pages back to the host; they read back as zeros."""
        privateram.decommit(*self._private(gpa, size))

    def madvise_hugepage(self, gpa: int, size: int) -> bool:
        """Ask for transparent huge pages on private RAM; False where the kernel will not."""
        return privateram.hugepage(*self._private(gpa, size))

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
