"""Memory backings the manager owns: sealed memfds, one per mappable.

`BackingStore` is the interface the state machine calls; `MemfdStore` is the real one. A read-only
backing hands mappers a descriptor opened O_RDONLY, so the kernel refuses a writable mapping.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from typing import Protocol

from .errors import Refused


class BackingError(Refused):
    """The host could not create a backing (code is a control-protocol error code)."""


class BackingStore(Protocol):
    def create(self, mappable_id: int, name: str, size: int, writable: bool) -> None: ...

    def destroy(self, mappable_id: int) -> None: ...

    def grant_fd(self, mappable_id: int) -> int: ...

    def close_all(self) -> None: ...


@dataclass
class _Memfd:
    fd: int  # read-write descriptor, owned by the manager
    grant_fd: int  # what mappers receive: == fd, or an O_RDONLY reopen for read-only backings
    size: int


class MemfdStore:
    """Backings as memfds: MFD_CLOEXEC | MFD_ALLOW_SEALING, sized, sealed against shrink/grow."""

    def __init__(self) -> None:
        self._fds: dict[int, _Memfd] = {}

    def __len__(self) -> int:
        return len(self._fds)

    def create(self, mappable_id: int, name: str, size: int, writable: bool) -> None:
        try:
            fd = os.memfd_create(f"membacking:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise BackingError("no-memory", f"cannot create a memfd for {name}: {exc}") from None
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            grant = fd
            if not writable:
                # A fresh O_RDONLY open file description: mmap(PROT_WRITE, MAP_SHARED) on it
                # fails with EACCES, whatever the mapper asks for.
                grant = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(fd)
            code = (
                "no-memory"
                if exc.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG)
                else "internal"
            )
            raise BackingError(code, f"cannot size the memfd for {name}: {exc}") from None
        self._fds[mappable_id] = _Memfd(fd, grant, size)

    def destroy(self, mappable_id: int) -> None:
        entry = self._fds.pop(mappable_id, None)
        if entry is None:
            return
        if entry.grant_fd != entry.fd:
            os.close(entry.grant_fd)
        os.close(entry.fd)

    def grant_fd(self, mappable_id: int) -> int:
        return self._fds[mappable_id].grant_fd

    def close_all(self) -> None:
        for mappable_id in list(self._fds):
            self.destroy(mappable_id)
