"""Every libc call membacking makes (mmap, munmap, madvise, prctl, inotify, and libatomic's
word operations); those on memory behind one `Reservation`.

Nothing else in the project touches raw addresses: callers speak in offsets into a reservation,
and each method checks that the range lies inside it before the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_DONTDUMP = 16
MADV_POPULATE_WRITE = 23  # Linux 5.14
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
_MAP_FAILED = ctypes.c_void_p(-1).value
_SEQ_CST = 5  # __ATOMIC_SEQ_CST
_WORD_TYPES = {4: ctypes.c_uint32, 8: ctypes.c_uint64}
#: whether the views of `Reservation.words` may be used without the access lock: only while one
#: thread at a time runs Python (a build without the GIL runs them in parallel)
LOCK_FREE_WORDS: bool = getattr(sys, "_is_gil_enabled", lambda: True)()


class _Atomics:
    """libatomic's compare-exchange and fetch-add for 4- and 8-byte words, loaded on first use
    (GCC's runtime library; a minimal image may lack it)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.error: str | None = None
        self.cas: dict[int, Callable[..., Any]] = {}
        self.add: dict[int, Callable[..., Any]] = {}
        lib = None
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            found = ctypes.util.find_library("atomic")  # another soname, if any
            if found:
                with contextlib.suppress(OSError):
                    lib = ctypes.CDLL(found)
        if lib is None:
            self.error = (
                f"atomic guest-memory operations need libatomic ({', '.join(names)}, GCC's "
                "runtime library), which this system lacks (install libatomic1 or your "
                "distribution's equivalent)"
            )
            return
        for width, word in _WORD_TYPES.items():
            try:
                cas = getattr(lib, f"__atomic_compare_exchange_{width}")
                add = getattr(lib, f"__atomic_fetch_add_{width}")
            except AttributeError as exc:
                self.error = f"the libatomic found here lacks a function membacking needs: {exc}"
                return
            cas.restype = ctypes.c_bool
            cas.argtypes = [ctypes.c_void_p, ctypes.POINTER(word), word, ctypes.c_int, ctypes.c_int]
            add.restype = word
            add.argtypes = [ctypes.c_void_p, word, ctypes.c_int]
            self.cas[width], self.add[width] = cas, add


_ATOMICS_LIBRARIES = ("libatomic.so.1",)
_atomics: _Atomics | None = None


def _load_atomics() -> _Atomics:
    global _atomics
    if _atomics is None:
        _atomics = _Atomics(_ATOMICS_LIBRARIES)
    return _atomics


def atomics_unavailable() -> str | None:
    """Why compare_exchange / fetch_add cannot work here, or None when they can."""
    return _load_atomics().error


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class Reservation:
    """A PROT_NONE reservation of `size` bytes; offsets into it are guest-physical addresses."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"reservation size {size:#x} must be a positive multiple of the page")
        # Safe: addr=NULL lets the kernel choose; PROT_NONE + NORESERVE commits no memory and
        # any stray access faults instead of touching someone else's memory.
        addr = _libc.mmap(None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise _oserror(f"cannot reserve {size:#x} bytes of address space")
        self.base: int = addr
        self.size = size
        self._closed = False
        self._lock = threading.Lock()
        self._words: dict[str, memoryview] = {}
        #: a view is made and filed, or the views are taken for retiring, under this lock: a
        #: view made while a change retires the others is filed where the next change finds it
        self._words_lock = threading.Lock()

    def words(self, code: str) -> memoryview:
        """The reservation as native words of the memoryview cast `code` ('B', 'H', 'I', 'Q'
        or lower case): item i is the word at offset i * its size, read or written with one
        fixed-size copy. The view is retired (released: any use of it raises ValueError) by
        the next map_fd, map_anon, unmap or release, before that changes any page. So a thread
        that found a range mapped and then uses a view it took before looking either reaches
        memory that is still mapped as it found it, or gets ValueError: never a fault. That
        holds because one use of a memoryview item is one C call, during which no other thread
        runs Python (the GIL), and callers check `LOCK_FREE_WORDS` for that. A new view is
        made on the next call."""
        with self._words_lock:
            view = self._words.get(code)
            if view is None:
                if self._closed:
                    raise ValueError("the reservation is released")
                # Safe: as buffer(): the caller touches only the words its table shows mapped.
                array = (ctypes.c_char * self.size).from_address(self.base)
                view = self._words[code] = memoryview(array).cast("B").cast(code)  # type: ignore[call-overload]
        return view

    def _retire_words(self) -> None:
        """Release every view `words` gave out, before a change of the pages under them."""
        with self._words_lock:
            views, self._words = self._words, {}
        for view in views.values():
            view.release()

    def _check(self, offset: int, size: int) -> int:
        if self._closed:
            raise ValueError("the reservation is released")
        if offset < 0 or size <= 0 or offset + size > self.size or (offset | size) % PAGE_SIZE:
            raise ValueError(
                f"range {offset:#x}+{size:#x} is not a page-aligned part of the "
                f"{self.size:#x}-byte reservation"
            )
        return self.base + offset

    def map_fd(
        self,
        offset: int,
        size: int,
        fd: int,
        file_offset: int,
        writable: bool,
        copy_on_write: bool = False,
    ) -> None:
        """Map `size` bytes of `fd` at `offset`, shared, read-only unless `writable`. With
        `copy_on_write` (for a read-only backing under a writable view that is still open):
        private and writable, so a write through the view lands in a private copy instead of
        faulting, and never reaches the backing."""
        addr = self._check(offset, size)
        if self._words:
            self._retire_words()
        if copy_on_write:
            prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED
        else:
            prot, flags = PROT_READ | (PROT_WRITE if writable else 0), MAP_SHARED | MAP_FIXED
        # Safe: MAP_FIXED only ever replaces pages inside our own reservation (checked above);
        # callers hold the access lock, so no access is reading the pages being replaced.
        got = _libc.mmap(addr, size, prot, flags, fd, file_offset)
        if got in (None, _MAP_FAILED):
            raise _oserror(f"cannot map fd {fd} at offset {offset:#x}")

    def map_anon(self, offset: int, size: int, writable: bool) -> None:
        """Map zero-filled private memory at `offset` (private RAM)."""
        addr = self._check(offset, size)
        if self._words:
            self._retire_words()
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE
        # Safe: as map_fd, inside our reservation, under the access lock.
        got = _libc.mmap(addr, size, prot, flags, -1, 0)
        if got in (None, _MAP_FAILED):
            raise _oserror(f"cannot allocate private memory at offset {offset:#x}")

    def unmap(self, offset: int, size: int) -> None:
        """Put a PROT_NONE placeholder back over `offset`: the old memory is gone from this
        process, the reservation stays."""
        addr = self._check(offset, size)
        if self._words:
            self._retire_words()
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE
        # Safe: replaces only our own pages; callers ensured no access or view uses them.
        got = _libc.mmap(addr, size, PROT_NONE, flags, -1, 0)
        if got in (None, _MAP_FAILED):
            raise _oserror(f"cannot unmap offset {offset:#x}")

    def madvise(self, offset: int, size: int, advice: int) -> None:
        addr = self._check(offset, size)
        # Safe: advice on our own pages; DONTNEED only drops what private RAM holds.
        if _libc.madvise(addr, size, advice) != 0:
            raise _oserror(f"madvise({advice}) at offset {offset:#x}")

    def fill(self, offset: int, size: int, byte: int) -> None:
        """Set `size` bytes at `offset` (need not be page-aligned) to `byte`."""
        if self._closed or offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"fill of {offset:#x}+{size:#x} is outside the reservation")
        # Safe: bounds checked above; callers hold the access lock and checked that the bytes
        # are mapped writable.
        ctypes.memset(self.base + offset, byte, size)

    def _word(self, offset: int, width: int) -> int:
        if width not in _WORD_TYPES:
            raise ValueError(f"atomic operations take 4- or 8-byte words, not {width}")
        if self._closed or offset < 0 or offset + width > self.size or offset % width:
            raise ValueError(f"{offset:#x} is not an aligned {width}-byte word of the reservation")
        atomics = _load_atomics()
        if atomics.error is not None:
            from .errors import AtomicsUnavailableError

            raise AtomicsUnavailableError(atomics.error)
        return self.base + offset

    def compare_exchange(
        self, offset: int, width: int, expected: int, desired: int
    ) -> tuple[bool, int]:
        """Atomically: if the native-order `width`-byte word at `offset` equals `expected`,
        store `desired`. Returns (stored, the word found). Words are unsigned."""
        addr = self._word(offset, width)
        word = _WORD_TYPES[width]
        found = word(expected)
        # Safe: an aligned word inside our reservation (checked above); callers hold the
        # access lock and checked that it is mapped writable; `found` outlives the call.
        ok = _load_atomics().cas[width](addr, ctypes.byref(found), desired, _SEQ_CST, _SEQ_CST)
        return bool(ok), int(found.value)

    def fetch_add(self, offset: int, width: int, delta: int) -> int:
        """Atomically add `delta` (modulo 2**(8*width)) to the native-order word at `offset`;
        returns the word it held before."""
        addr = self._word(offset, width)
        # Safe: as compare_exchange: an aligned word of our own reservation, mapped writable,
        # under the access lock.
        return int(_load_atomics().add[width](addr, delta, _SEQ_CST))

    def set_name(self, offset: int, size: int, name: str) -> bool:
        """Name the range in /proc/PID/maps; False where the kernel cannot name anonymous VMAs."""
        addr = self._check(offset, size)
        label = ctypes.create_string_buffer(name.encode()[:79])
        # Safe: the kernel copies the label; the buffer outlives the call.
        rc = _libc.prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, addr, size, ctypes.addressof(label))
        return bool(rc == 0)

    def buffer(self) -> memoryview:
        """A writable memoryview of the whole reservation (GPA g is index g).

        Touching a part that is not mapped kills the process with SIGSEGV: callers check their
        mapped-range table under the access lock first.
        """
        if self._closed:
            raise ValueError("the reservation is released")
        array = (ctypes.c_char * self.size).from_address(self.base)
        return memoryview(array).cast("B")

    def exporter(self, offset: int, size: int) -> ctypes.Array[ctypes.c_char]:
        """A buffer exporter of its own over [offset, offset+size): every memoryview taken from
        it, and every slice of those, keeps it alive, so its reference count tells whether any
        is left (GuestMemory.view relies on that to know when a view's memory is let go)."""
        if self._closed or offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"{offset:#x}+{size:#x} is outside the reservation")
        # Safe: the array aliases pages of our own reservation, within bounds (checked above);
        # the caller pins the range while anything made from the array is alive.
        return (ctypes.c_char * size).from_address(self.base + offset)

    def after_fork(self, keep: list[tuple[int, int]]) -> None:
        """In a child forked from the process that made this reservation (mapper/forking.py,
        no other thread alive): reset the locks a thread of the parent may have held at the
        fork, retire the word views, and put a PROT_NONE placeholder over the whole reservation,
        so the child maps no guest memory and no file of it any more; then zero-filled private
        memory, readable and writable, at each page-aligned (offset, size) of `keep`, where a
        view made before the fork may still point: it reads zeros there and never faults."""
        for lock in (self._lock, self._words_lock):
            reinit = getattr(lock, "_at_fork_reinit", None)  # CPython's, as logging uses it
            if reinit is not None:
                reinit()
        if self._closed:
            return
        with contextlib.suppress(BufferError):  # a word view still exported: left as it is
            self._retire_words()
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE
        # Safe: replaces only our own reservation (base and size as made), in a process where
        # no other thread runs; what the parent's views point at is put back below.
        got = _libc.mmap(self.base, self.size, PROT_NONE, flags, -1, 0)
        if got in (None, _MAP_FAILED):
            raise _oserror("cannot put the placeholder back over the reservation")
        for offset, size in keep:
            addr = self._check(offset, size)
            # Safe: inside our reservation (checked above), single-threaded; fresh private
            # zero pages, so a stale view reads zeros and its writes stay in this process.
            got = _libc.mmap(addr, size, PROT_READ | PROT_WRITE, flags, -1, 0)
            if got in (None, _MAP_FAILED):
                raise _oserror(f"cannot put private memory at offset {offset:#x}")

    def release(self) -> None:
        """munmap the whole reservation (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._retire_words()
            # Safe: our own reservation; the owner guarantees no view or access remains.
            if _libc.munmap(self.base, self.size) != 0:
                raise _oserror("munmap of the reservation")


def hugepage_advice_supported() -> bool:
    """Whether MADV_HUGEPAGE can take effect (transparent huge pages not 'never')."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            return "[never]" not in handle.read()
    except OSError:
        return False


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent_pid: int) -> None:
    """In a freshly forked child (subprocess's preexec_fn): ask the kernel to send `sig` to this
    process when the thread that forked it exits, and exit at once if that parent is already
    gone (the race between fork and this call). Used so a VM never outlives its launcher."""
    # Safe: prctl(PR_SET_PDEATHSIG) takes a signal number by value and touches no memory; the
    # function object was set up at import, so the child only makes the call (no loading).
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent_pid:
        os._exit(127)


IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x80, 0x100, 0x200


def watch_directory(path: str, mask: int = IN_CREATE | IN_MOVED_TO) -> int:
    """An inotify descriptor (non-blocking, close-on-exec) that becomes readable when a file
    is created in (IN_CREATE), moved into (IN_MOVED_TO) or deleted from (IN_DELETE) directory
    `path`, as `mask` says; the caller reads and closes it. OSError where inotify is
    unavailable (or out of watches)."""
    # Safe: inotify_init1 takes flags by value and returns a descriptor or -1; touches no memory.
    fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise _oserror("inotify_init1")
    # Safe: ctypes passes a NUL-terminated copy of the path (read only during the call) and the
    # descriptor and mask by value; the kernel writes nothing into our memory.
    if _libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
        error = _oserror(f"inotify_add_watch of {path}")
        os.close(fd)
        raise error
    return fd


__all__ = [
    "LOCK_FREE_WORDS",
    "MADV_DONTDUMP",
    "MADV_DONTNEED",
    "MADV_HUGEPAGE",
    "MADV_POPULATE_WRITE",
    "PAGE_SIZE",
    "Reservation",
    "atomics_unavailable",
    "die_with_parent",
    "hugepage_advice_supported",
    "watch_directory",
]
