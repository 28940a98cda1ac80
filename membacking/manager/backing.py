"""Memory backings the manager owns, one per mappable: sealed memfds, files, hugetlb memfds.

`BackingStore` is the interface the state machine calls; `MemfdStore` is the real one. A read-only
backing hands mappers a descriptor opened O_RDONLY, so the kernel refuses a writable mapping.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import Refused

#: F_SEAL_FUTURE_WRITE (Linux 5.1): no new writable mappings or writes (Python 3.11 lacks it).
F_SEAL_FUTURE_WRITE = 0x10


class BackingError(Refused):
    """The host could not create a backing (code is a control-protocol error code)."""


class BackingStore(Protocol):
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


@dataclass
class _Backing:
    fd: int  # descriptor owned by the manager
    grant_fd: int  # what mappers receive: == fd, or an O_RDONLY reopen for read-only backings
    size: int
    writable: bool


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


def _reopen_readonly(fd: int) -> int:
    # A fresh O_RDONLY open file description: mmap(PROT_WRITE, MAP_SHARED) of it fails with
    # EACCES, whatever the mapper asks for.
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class MemfdStore:
    """Creates and owns every backing's descriptor."""

    def __init__(self) -> None:
        self._backings: dict[int, _Backing] = {}
        #: descriptors at or above this number are refused (the daemon keeps headroom below its
        #: open-file limit for the sockets ZeroMQ accepts on its own); None: no ceiling
        self.fd_ceiling: int | None = None

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
        if kind == "file":
            assert path is not None
            fd = self._open_file(name, Path(path), size, writable)
        elif kind == "hugetlb":
            fd = self._hugetlb(name, size)
        else:
            fd = self._memfd(name, size, writable)
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
        self._backings[mappable_id] = _Backing(fd, grant, size, writable)

    def _memfd(self, name: str, size: int, writable: bool) -> int:
        try:
            fd = os.memfd_create(f"membacking:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise BackingError("no-memory", f"cannot create a memfd for {name}: {exc}") from None
        try:
            os.ftruncate(fd, size)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            if not writable:
                seals |= F_SEAL_FUTURE_WRITE  # its content (zeros) can never change
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError as exc:
            os.close(fd)
            nomem = exc.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG)
            code = "no-memory" if nomem else "internal"
            raise BackingError(code, f"cannot size the memfd for {name}: {exc}") from None
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

    def describe(self, mappable_id: int) -> tuple[int, bool]:
        backing = self._backings[mappable_id]
        return backing.size, backing.writable

    def destroy(self, mappable_id: int) -> None:
        backing = self._backings.pop(mappable_id, None)
        if backing is None:
            return
        if backing.grant_fd != backing.fd:
            os.close(backing.grant_fd)
        os.close(backing.fd)

    def grant_fd(self, mappable_id: int) -> int:
        return self._backings[mappable_id].grant_fd

    def close_all(self) -> None:
        for mappable_id in list(self._backings):
            self.destroy(mappable_id)
