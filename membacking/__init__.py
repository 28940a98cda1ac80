"""membacking: one shared guest-physical address space for many processes.

A manager daemon owns guest memory as memfd-backed regions; mapper processes `attach()` and read
or write it by guest-physical address, mapping each region lazily on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .control_client import ControlClient
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    AtomicsUnavailableError,
    ControlError,
    DetachedError,
    GuestMemoryError,
    ManagerGoneError,
    ManagerUnavailableError,
    MappingsDroppedError,
    MembackingError,
    NoMappingError,
    OutOfRangeError,
    ReadOnlyError,
)
from .protocol import MemoryRange, ProtocolError

if TYPE_CHECKING:
    from .mapper import GuestMemory, attach

__all__ = [
    "ArgumentTypeError",
    "ArgumentValueError",
    "AtomicsUnavailableError",
    "ControlClient",
    "ControlError",
    "DetachedError",
    "GuestMemory",
    "GuestMemoryError",
    "ManagerGoneError",
    "ManagerUnavailableError",
    "MappingsDroppedError",
    "MembackingError",
    "MemoryRange",
    "NoMappingError",
    "OutOfRangeError",
    "ProtocolError",
    "ReadOnlyError",
    "attach",
]


def __getattr__(name: str) -> Any:
    # The mapper side is imported on first use, so the manager and the CLI's control commands
    # do not load it.
    if name in ("attach", "GuestMemory"):
        from . import mapper

        return getattr(mapper, name)
    raise AttributeError(f"module 'membacking' has no attribute {name!r}")
