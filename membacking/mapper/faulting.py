"""How an access faults: check that the mapper can still be served, register a waiter before
sending SendMappings on the fd socket (so no answer can be missed), wait, and turn each way the
wait can end into the exception the access raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import (
    DetachedError,
    GuestMemoryError,
    ManagerGoneError,
    MappingsDroppedError,
    NoMappingError,
    ReadOnlyError,
)
from ..protocol import messages as m
from ..protocol.ranges import MemoryRange
from . import reconnect
from .waitlist import MAP_FAILED, NO_MAPPING, READ_ONLY, RELINK

if TYPE_CHECKING:
    from .core import VaMapper


def unserved(mapper: VaMapper, gpa: int) -> GuestMemoryError | None:
    """Why `mapper` can map nothing more (forked, detached, mappings dropped, manager gone), or
    None."""
    if mapper.forked is not None:  # forking.py
        return DetachedError(f"cannot access GPA {gpa:#x}: {mapper.forked}", gpa)
    if mapper.closed:
        return DetachedError("this GuestMemory is detached", gpa)
    if mapper.dropped is not None:
        return MappingsDroppedError(f"cannot access GPA {gpa:#x}: {mapper.dropped}", gpa)
    if mapper.gone is not None:
        return ManagerGoneError(f"cannot map GPA {gpa:#x}: {mapper.gone}", gpa)
    return None


def fault(mapper: VaMapper, gpa: int, end: int, write: bool) -> None:
    """Ask the manager to map [gpa, end) and wait; raises if it cannot be mapped. While the
    mapper registers again with a restarted manager (reconnect.py), wait for that first."""
    while True:
        if not mapper.relinked.is_set():
            mapper.relinked.wait(mapper.reconnect_timeout + 5.0)
        try:
            _fault_once(mapper, gpa, end, write)
            return
        except reconnect.Relink:
            continue


def _fault_once(mapper: VaMapper, gpa: int, end: int, write: bool) -> None:
    ended = unserved(mapper, gpa)
    if ended is not None:
        raise ended
    if mapper.eager:
        raise NoMappingError(
            f"no region backs GPA {gpa:#x} (an eager mapper has every mapping already)", gpa
        )
    rng = MemoryRange.bounding(gpa, min(end, mapper.address_space))
    sent_as = mapper.id
    waiter = mapper.waiters.register(rng, write, bool(mapper.link.features & m.FEATURE_TAGS))
    if not mapper.relinked.is_set():
        # a relink began after `fault` looked (it clears the event, then fails every waiter):
        # this waiter may have missed that, and its request would go to the manager that is
        # gone and wait out fault_timeout; ask the successor instead
        mapper.waiters.discard(waiter)
        raise reconnect.Relink()
    if not waiter.done:
        try:
            mapper.link.send(m.SendMappings(rng, waiter.tag))
        except TimeoutError as exc:  # alive (its socket is open) but not reading
            mapper.waiters.discard(waiter)
            raise GuestMemoryError(f"cannot fault GPA {gpa:#x}: {exc}", gpa) from None
        except OSError as exc:
            mapper.waiters.discard(waiter)
            if reconnect.relink_coming(mapper, sent_as):
                raise reconnect.Relink() from None
            why = exc.strerror or str(exc)
            # the reason the mapper gave up on its manager, if it did, says more
            raise unserved(mapper, gpa) or ManagerGoneError(
                f"cannot reach the manager: {why}", gpa
            ) from None
    if not waiter.wait(mapper.fault_timeout):
        mapper.waiters.discard(waiter)
        raise GuestMemoryError(
            f"the manager did not answer a fault at GPA {gpa:#x} within {mapper.fault_timeout:g}s",
            gpa,
        )
    missing = max(gpa, waiter.range.start)  # the first address asked for, not its page
    if waiter.failure == NO_MAPPING:
        raise NoMappingError(f"no region backs GPA {missing:#x}", missing)
    if waiter.failure == READ_ONLY:
        raise ReadOnlyError(f"GPA {missing:#x} is mapped read-only; cannot write", missing)
    if waiter.failure == RELINK:
        raise reconnect.Relink()
    if waiter.failure is not None and waiter.failure.startswith(MAP_FAILED):
        why = waiter.failure.removeprefix(MAP_FAILED)
        raise GuestMemoryError(f"cannot map GPA {missing:#x}: {why}", missing)
    if waiter.failure is not None:
        raise unserved(mapper, gpa) or ManagerGoneError(
            f"cannot map GPA {gpa:#x}: manager gone", gpa
        )
