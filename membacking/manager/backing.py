"""Memory backings the manager owns, one per mappable: tmpfs files in the state directory (or
sealed memfds without one), the operator's files, hugetlb memfds.

`BackingStore` is the interface the state machine calls; `MemfdStore` is the real one. A read-only
backing hands mappers a descriptor opened O_RDONLY, so the kernel refuses a writable mapping.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..units import format_size
from .errors import Refused
from .journal import BackingRecord
from .statedir import StateDir, StateDirError

#: F_SEAL_FUTURE_WRITE (Linux 5.1): no new writable mappings or writes (Python 3.11 lacks it).
F_SEAL_FUTURE_WRITE = 0x10


class BackingError(Refused):
    """The host could not create a backing (code is a control-protocol error code)."""


class BackingStore(Protocol):
    #: what the default backing ("memfd") really is in this store: "shm" (a file in the state
    #: directory) or "memfd"
    ram_kind: str
    #: whether each RAM backing's memory is allocated at creation (`manager run --prealloc`)
    prealloc: bool

    def create(
        self,
        mappable_id: int,
        name: str,
        size: int,
        writable: bool,
        *,
        kind: str = "memfd",
        path: str | None = None,
    ) -> None: ...

    def describe(self, mappable_id: int) -> tuple[int, bool]:
        """(size, writable) of a mappable's granted descriptor."""
        ...

    def destroy(self, mappable_id: int) -> None: ...

    def grant_fd(self, mappable_id: int) -> int: ...

    def close_all(self) -> None: ...

    def ram_room(self, adding: int = 0) -> tuple[int, int] | None: ...


@dataclass
class _Backing:
    fd: int  # descriptor owned by the manager
    grant_fd: int  # what mappers receive: == fd, or an O_RDONLY reopen for read-only backings
    size: int
    writable: bool
    kind: str = "memfd"  # as in BackingRecord.kind: shm | memfd | file | hugetlb
    name: str = ""  # shm: the file's name in the state directory; file: its path
    record: BackingRecord | None = None  # what the journal keeps of it (made once)


def hugepage_size() -> int:
    """The default huge page size in bytes (from /proc/meminfo; 2 MiB if unknown)."""
    return _meminfo("Hugepagesize", 2048) * 1024


def _meminfo(key: str, default: int) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return default


def _code(exc: OSError) -> str:
    """A backing's refusal code for `exc`: out of memory or room, or anything else."""
    return "no-memory" if exc.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG) else "internal"


def _preallocate(fd: int, size: int, name: str) -> None:
    """Allocate all of a RAM backing's memory now (--prealloc): BackingError if there is no
    room, instead of a SIGBUS in whichever process first touches a page there is none for."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise BackingError(
            _code(exc),
            f"cannot allocate the {format_size(size)} of {name} (--prealloc): "
            f"{exc.strerror or exc}",
        ) from None


def _reopen_readonly(fd: int) -> int:
    # A fresh O_RDONLY open file description: mmap(PROT_WRITE, MAP_SHARED) of it fails with
    # EACCES, whatever the mapper asks for.
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class MemfdStore:
    """Creates and owns every backing's descriptor. With a state directory, RAM backings are
    files there (they outlive the manager); without one, sealed memfds (they die with it)."""

    def __init__(self, state_dir: StateDir | None = None, prealloc: bool = False) -> None:
        self.state_dir = state_dir
        #: allocate each RAM backing's memory at creation (`manager run --prealloc`)
        self.prealloc = prealloc
        self.ram_kind = "shm" if state_dir is not None else "memfd"
        self._backings: dict[int, _Backing] = {}
        self._identities: frozenset[tuple[int, int, int]] | None = None
        #: descriptors at or above this number are refused (the daemon keeps headroom below its
        #: open-file limit for the sockets ZeroMQ accepts on its own); None: no ceiling
        self.fd_ceiling: int | None = None
        #: where a restarted manager finds memfd/hugetlb memory again (the service manager's fd
        #: store, `fdstore`): the journaled record's descriptor, or None (it comes back zeroed)
        self.inherited: Callable[[BackingRecord], int | None] | None = None
        #: the sizes of the RAM files in the state directory, summed, and the blocks they have
        #: allocated with when that was counted (`ram_room`)
        self._shm_bytes = 0
        self._allocated = (0, -math.inf)

    def __len__(self) -> int:
        return len(self._backings)

    def create(
        self,
        mappable_id: int,
        name: str,
        size: int,
        writable: bool,
        *,
        kind: str = "memfd",
        path: str | None = None,
    ) -> None:
        label = ""
        if kind == "file":
            assert path is not None
            fd = self._open_file(name, Path(path), size, writable)
            label = path
        elif kind == "hugetlb":
            fd = self._hugetlb(name, size)
        elif self.state_dir is not None:
            # named for the region, as a memfd is, so /proc/PID/maps says whose memory it is
            label = f"{mappable_id}.membacking:{name.replace('/', '_')}"
            kind = "shm"
            fd = self._shm_file(self.state_dir, label, name, size)
        else:
            fd = self._memfd(name, size, writable)
        try:
            self._own(mappable_id, fd, size, writable, kind, label, name)
        except BackingError:
            if kind == "shm" and self.state_dir is not None:
                self.state_dir.discard(label)  # never journaled
            raise

    def _own(
        self, mappable_id: int, fd: int, size: int, writable: bool, kind: str, label: str, name: str
    ) -> None:
        try:
            grant = fd if writable else _reopen_readonly(fd)
        except OSError as exc:
            os.close(fd)
            raise BackingError("internal", f"cannot reopen {name} read-only: {exc}") from None
        if self.fd_ceiling is not None and max(fd, grant) >= self.fd_ceiling:
            for each in {fd, grant}:
                os.close(each)
            raise BackingError(
                "limit",
                f"cannot back {name}: the manager is close to its open-file limit "
                "(raise LimitNOFILE= / ulimit -n, or remove regions)",
            )
        info = os.fstat(fd)  # identifies memfds too: the fd store gives them back by inode
        dev, ino = info.st_dev, info.st_ino
        record = BackingRecord(mappable_id, kind, label, size, writable, dev, ino)
        self._backings[mappable_id] = _Backing(fd, grant, size, writable, kind, label, record)
        self._identities = None
        if kind == "shm":
            self._shm_bytes += size

    def _shm_file(self, state_dir: StateDir, label: str, name: str, size: int) -> int:
        # No seals on a tmpfs file that memfd_create did not make: the file is the daemon's
        # (0600 in a 0700 directory), and a restart checks its size against the journal.
        room = self.ram_room(size)
        if room is not None and room[1] > room[0]:
            free, promised = room
            raise BackingError(
                "no-memory",
                f"cannot back {name}: the file system of {state_dir.mem} has {format_size(free)} "
                f"free, and the RAM regions there could take {format_size(promised)} with it "
                "(their pages are allocated as they are first touched; a touch with no room left "
                "would kill the process making it with SIGBUS): free space there (df), make the "
                "region smaller, or start the manager with --no-state (RAM in memfds, which "
                "only memory bounds)",
            )
        try:
            fd = state_dir.create_file(label, size)
        except OSError as exc:
            raise BackingError(
                _code(exc),
                f"cannot create the memory of {name} in {state_dir.mem}: {exc.strerror or exc}",
            ) from None
        if self.prealloc:
            try:
                _preallocate(fd, size, name)
            except BackingError:
                os.close(fd)
                state_dir.discard(label)
                raise
        return fd

    def records(self, mappable_ids: set[int]) -> list[BackingRecord]:
        """What the journal keeps of these mappables (identity from fstat)."""
        backings = self._backings
        return [
            b.record
            for b in (backings.get(i) for i in sorted(mappable_ids))
            if b is not None and b.record is not None
        ]

    def adopt(self, record: BackingRecord) -> str | None:
        """Take up a journaled backing again after a restart: its file must be the very one the
        journal names (same inode, size, owner). StateDirError if not. Memory that could not
        survive (memfd, hugetlb) comes back zero-filled: returns a warning saying so."""
        what = f"mappable {record.mappable_id}"
        if record.kind in ("memfd", "hugetlb"):
            fd = self.inherited(record) if self.inherited is not None else None
            if fd is not None:
                self._own(
                    record.mappable_id, fd, record.size, record.writable, record.kind, "", what
                )
                return None
            fd = (
                self._hugetlb(what, record.size)
                if record.kind == "hugetlb"
                else self._memfd(what, record.size, record.writable)
            )
            self._own(record.mappable_id, fd, record.size, record.writable, record.kind, "", what)
            return f"{what} was {record.kind} memory, which does not outlive the manager: zeroed"
        try:
            if record.kind == "shm":
                assert self.state_dir is not None
                where = self.state_dir.mem / record.name
                fd = self.state_dir.open_file(record.name)
            else:
                where = Path(record.name)
                flags = os.O_RDWR if record.writable else os.O_RDONLY
                fd = os.open(where, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise StateDirError(f"{what}: cannot open {where}: {exc.strerror or exc}") from None
        info = os.fstat(fd)
        problem = None
        if record.kind == "shm" and (info.st_dev, info.st_ino) != (record.dev, record.ino):
            problem = "it is not the file the journal names (another inode)"
        elif record.kind == "shm" and info.st_size != record.size:
            problem = f"it is {info.st_size} bytes, the journal says {record.size} (truncated?)"
        elif info.st_size < record.size:
            problem = f"it is {info.st_size} bytes, smaller than the {record.size} needed"
        elif record.kind == "shm" and info.st_uid != os.getuid():
            problem = f"it belongs to uid {info.st_uid}"
        if problem is not None:
            os.close(fd)
            raise StateDirError(f"{what}: {where}: {problem}")
        self._own(
            record.mappable_id, fd, record.size, record.writable, record.kind, record.name, what
        )
        return None

    def _memfd(self, name: str, size: int, writable: bool) -> int:
        try:
            fd = os.memfd_create(f"membacking:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise BackingError("no-memory", f"cannot create a memfd for {name}: {exc}") from None
        try:
            os.ftruncate(fd, size)
            if self.prealloc:
                _preallocate(fd, size, name)  # (BackingError: closed below)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            if not writable:
                seals |= F_SEAL_FUTURE_WRITE  # its content (zeros) can never change
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except BackingError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise BackingError(_code(exc), f"cannot size the memfd for {name}: {exc}") from None
        return fd

    def _hugetlb(self, name: str, size: int) -> int:
        page = hugepage_size()
        if size % page:
            raise BackingError(
                "bad-request",
                f"a hugetlb region's size must be a multiple of the "
                f"{page >> 20} MiB huge page size; {size:#x} is not",
            )
        try:
            fd = os.memfd_create(f"membacking:{name}", os.MFD_CLOEXEC | os.MFD_HUGETLB)
        except OSError as exc:
            raise BackingError(
                "no-memory", f"cannot create a hugetlb memfd for {name}: {exc.strerror}"
            ) from None
        try:
            os.ftruncate(fd, size)
            # Reserve every huge page now: an empty or too small pool fails here, at creation,
            # instead of with SIGBUS in a mapper at first touch.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            free = _meminfo("HugePages_Free", 0)
            raise BackingError(
                "no-memory",
                f"not enough huge pages for {name}: it needs {size // page} pages of "
                f"{page >> 20} MiB and the pool has {free} free ({exc.strerror}; "
                "see /proc/sys/vm/nr_hugepages)",
            ) from None
        return fd

    def _open_file(self, name: str, path: Path, size: int, writable: bool) -> int:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            info = path.stat()
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise BackingError(
                "bad-file", f"cannot use {path} for {name}: {exc.strerror}"
            ) from None
        if info is None:
            if not writable:
                raise BackingError(
                    "bad-file", f"{path} does not exist; a read-only region needs an existing file"
                )
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, size)
            except OSError as exc:
                raise BackingError("bad-file", f"cannot create {path}: {exc.strerror}") from None
            return fd
        if not stat.S_ISREG(info.st_mode):
            raise BackingError("bad-file", f"{path} is not a regular file")
        if info.st_size < size:
            raise BackingError(
                "bad-file", f"{path} is {info.st_size} bytes; region {name} needs {size}"
            )
        try:
            return os.open(path, flags)
        except OSError as exc:
            raise BackingError("bad-file", f"cannot open {path}: {exc.strerror}") from None

    def identity(self, mappable_id: int) -> tuple[int, int] | None:
        """(st_dev, st_ino) of a backing (a mapper holding its fd after a restart proves it is
        the same memory; a memfd is the same only when it came back from the fd store)."""
        backing = self._backings.get(mappable_id)
        if backing is None or backing.record is None:
            return None
        return backing.record.dev, backing.record.ino

    def identities(self) -> frozenset[tuple[int, int, int]]:
        """(mappable id, st_dev, st_ino) of every backing, as Holdings lists the fds a mapper
        holds: built once per change of the backings (each mapper registering again after a
        restart is checked against the same set)."""
        if self._identities is None:
            self._identities = frozenset(
                (i, b.record.dev, b.record.ino)
                for i, b in self._backings.items()
                if b.record is not None
            )
        return self._identities

    def describe(self, mappable_id: int) -> tuple[int, bool]:
        backing = self._backings[mappable_id]
        return backing.size, backing.writable

    def destroy(self, mappable_id: int) -> None:
        backing = self._backings.pop(mappable_id, None)
        if backing is None:
            return
        self._identities = None
        if backing.grant_fd != backing.fd:
            os.close(backing.grant_fd)
        os.close(backing.fd)
        if backing.kind == "shm" and self.state_dir is not None:
            self._shm_bytes -= backing.size
            self._allocated = (0, -math.inf)  # its blocks were counted: count again
            self.state_dir.unlink_later(backing.name)

    def ram_room(self, adding: int = 0) -> tuple[int, int] | None:
        """(free bytes of the state directory's file system, bytes its RAM files may still
        take, with `adding` more). A RAM file's pages are allocated as they are first touched,
        read or written; a touch the file system has no room for kills the process that makes
        it with SIGBUS. None without a state directory, on a file system that counts no blocks
        (a tmpfs of size=0, ramfs: bounded by memory alone), or one that cannot be asked (the
        directory removed: creating a file there then fails on its own)."""
        if self.state_dir is None:
            return None
        try:
            fs = os.statvfs(self.state_dir.mem)
        except OSError:
            return None
        if fs.f_blocks == 0:
            return None
        free = fs.f_bavail * fs.f_frsize
        promised = self._shm_bytes + adding
        if promised <= free:
            return free, promised
        # less what the files have allocated already: counted at most once a second (one fstat
        # a file), and again before saying there is no room (a count older than the files'
        # latest pages only makes the room look smaller)
        now = time.monotonic()
        if now - self._allocated[1] > 1.0 or promised - self._allocated[0] > free:
            self._allocated = (self._count_allocated(), now)
        return free, promised - self._allocated[0]

    def _count_allocated(self) -> int:
        total = 0
        for backing in self._backings.values():
            if backing.kind == "shm":
                with contextlib.suppress(OSError):
                    total += min(backing.size, os.fstat(backing.fd).st_blocks * 512)
        return total

    def fd_table(self) -> dict[int, tuple[int, str]]:
        """mappable id -> (the manager's descriptor, backing kind), for the fd store."""
        return {i: (b.fd, b.kind) for i, b in self._backings.items()}

    def grant_fd(self, mappable_id: int) -> int:
        return self._backings[mappable_id].grant_fd

    def volatile_fds(self) -> dict[int, int]:
        """The descriptors of memory that lives in no file (memfd, hugetlb), by mappable id."""
        return {i: b.fd for i, b in self._backings.items() if b.kind in ("memfd", "hugetlb")}

    def close_all(self) -> None:
        """Close every descriptor (the manager is exiting; a state directory keeps the files)."""
        for backing in self._backings.values():
            if backing.grant_fd != backing.fd:
                os.close(backing.grant_fd)
            os.close(backing.fd)
        self._backings.clear()
        self._identities = None
        self._shm_bytes = 0
        self._allocated = (0, -math.inf)
