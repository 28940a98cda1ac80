"""Errors that membacking raises to its users (the CLI turns them into one line on stderr).

`MembackingError` is the root of every operator-facing failure; `GuestMemoryError` and its
subclasses are raised by guest-memory accesses and always name the guest address involved.
"""

from __future__ import annotations


class MembackingError(Exception):
    """An error an operator or API user can act on (no traceback needed)."""


class ArgumentTypeError(MembackingError, TypeError):
    """An argument of the wrong type given to the API (`attach()`): a TypeError, and a
    MembackingError for callers that catch those."""


class ArgumentValueError(MembackingError, ValueError):
    """An argument of the right type but a bad value given to the API (`attach()`): a
    ValueError, and a MembackingError for callers that catch those."""


class ManagerUnavailableError(MembackingError):
    """No manager is serving the runtime directory (not started, or gone)."""


#: why no manager serves a runtime directory, in the same words for every command
NO_SOCKET = "no socket to connect to"
LEFT_OVER = "its sockets are left over from one that is no longer running: stopped or killed"


class ControlError(MembackingError):
    """The manager refused a control request; `code` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class GuestMemoryError(MembackingError):
    """A guest-memory access failed; `gpa` is the guest-physical address involved."""

    def __init__(self, message: str, gpa: int | None = None) -> None:
        super().__init__(message)
        self.gpa = gpa


class NoMappingError(GuestMemoryError):
    """Nothing backs the guest address (outside every region, or the region was removed)."""


class ReadOnlyError(GuestMemoryError):
    """A write to a guest address that is backed read-only."""


class OutOfRangeError(GuestMemoryError):
    """The access lies outside the guest address space."""


class ManagerGoneError(GuestMemoryError, ManagerUnavailableError):
    """The manager is gone: new faults cannot be served. What is mapped keeps working only while
    the mapper waits for a successor; after that, accesses raise MappingsDroppedError."""


class MappingsDroppedError(ManagerGoneError):
    """The manager evicted this mapper or stopped, and the mapper dropped every mapping (and
    closed every fd) before any access could touch them again: nothing can be read or written
    any more. A mapper whose manager merely died (no word from it) keeps its mappings while it
    waits for a successor, raising plain ManagerGoneError on new faults only; once none took it
    back in time, it drops them too."""


class DetachedError(GuestMemoryError):
    """The GuestMemory was detached, or this process was forked from the one that attached it
    (the message says which; a forked child maps none of its memory and must attach again); no
    more accesses are possible."""


class AtomicsUnavailableError(MembackingError):
    """Atomic guest-memory operations need libatomic (GCC's runtime library), which is absent."""
