"""The mapper's lease: how long one turn of the mapper thread vouches for its connection to the
manager, the wait of an access that finds it run out, which Shutdowns make a mapper drop every
mapping, and the dropping (see docs/ARCHITECTURE.md, "Removal binds every holder").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import GuestMemoryError
from ..protocol import messages as m
from ..protocol.shutdowns import drops_mappings, drops_on_hangup, mapper_drops

if TYPE_CHECKING:
    from .core import VaMapper

log = logging.getLogger("membacking.mapper")

#: Seconds one turn of the mapper thread vouches for its connection. Each turn takes the time
#: before it polls the stream and the fd socket, handles what they show (a Shutdown, the fd
#: socket's end) and then sets the lease to that time + LEASE; an access touches memory only
#: while the lease runs, else it waits for a turn. The manager evicts only a mapper that left
#: an Unmap unanswered for --unmap-timeout (at least 2 * LEASE): a mapper stopped long enough to
#: be evicted finds its lease run out when it runs again, and its first access waits for the
#: turn that reads the eviction and drops every mapping.
LEASE = 0.5
#: the mapper thread's poll timeout: an idle mapper renews its lease before it runs out
POLL_MS = int(LEASE * 1000) // 2
#: how long a mapper whose fd socket ended without a Shutdown on it waits for one on the
#: stream (a manager that could not write it on the full fd socket sends it there only)
#: before it takes the manager for dead and keeps its mappings
FAREWELL_WAIT = LEASE

_monotonic = time.monotonic


def describe_shutdown(reason: str) -> str:
    """How a mapper tells its user why the manager let it go: an eviction is not a shutdown."""
    if reason.startswith("evicted"):
        detail = reason.removeprefix("evicted").lstrip(": ")
        return "the manager evicted this mapper" + (f": {detail}" if detail else "")
    return f"the manager shut down ({reason})"


def drop_every_mapping(mapper: VaMapper, reason: str, for_good: bool = True) -> bool:
    """The manager no longer backs anything the mapper holds (evicted, it stopped, or no
    manager will take the mapper back): unmap every chunk and close every fd, before any access
    can touch them again. A range an open view still pins gets private anonymous memory in
    place of the old backing (the view reads zeros from then on, and never the removed memory),
    so the view cannot fault. Not `for_good` (a mapper without REATTACH whose manager died or
    restarts): later faults ask the next manager again. True if it logged the reason
    (something was dropped)."""
    if mapper.dropped is not None:
        return False
    with mapper.lock:
        if mapper.closed:
            return False
        held = bool(len(mapper.chunks) or mapper._pending_unmaps or mapper.fds.held())
        mapper.views.release_escaped()
        unmap_all(mapper)
        mapper.chunks.clear()
        mapper.hot[0:2] = 0, 0
        mapper._pending_unmaps.clear()  # nobody to acknowledge them to
        if for_good:
            mapper.dropped = reason
    mapper.fds.close_all()
    if held:
        log.warning("mapper %d: every mapping dropped: %s", mapper.id, reason)
    return held


def on_shutdown(mapper: VaMapper, msg: m.Shutdown) -> None:
    """The manager let the mapper go: drop what it no longer backs, then stop or wait for its
    successor. Its own reason says more than a closed connection noticed first (a second
    Shutdown, on the other socket, says the same again)."""
    mapper.gone = None
    reason = describe_shutdown(msg.reason)
    final = drops_mappings(msg)  # (without a code, a reason beginning neither way restarts)
    if mapper_drops(msg, mapper.link.features):  # the manager backs nothing here now
        drop_every_mapping(mapper, reason, for_good=final)
    mapper.manager_gone(reason, final=final, announced=True)


def on_hangup(mapper: VaMapper, lost: str) -> None:
    """fd.sock ended and no Shutdown decided (the manager died): a mapper without REATTACH
    drops every mapping, since no successor could learn what it holds and bind it (§9); later
    faults ask that successor again. Then it stops or waits for the successor."""
    if mapper.gone is None and mapper.relinked.is_set() and drops_on_hangup(mapper.link.features):
        why = f"{lost}; without REATTACH the next manager could not learn what it holds"
        drop_every_mapping(mapper, why, for_good=False)
    mapper.manager_gone(lost)


def unmap_all(mapper: VaMapper) -> None:
    """With the access lock held: take every chunk out of the address space (and the ranges
    whose Unmap waits for a view), a range an open view pins replaced by private anonymous
    memory, so that no access or view reaches guest memory and none faults."""
    pending = [r for _, r, _ in mapper._pending_unmaps]
    for rng in [r for r, _ in mapper.chunks.items()] + pending:
        try:
            if mapper.views.pinned(rng):
                mapper.reservation.map_anon(rng.start, rng.len, True)
            else:
                mapper.reservation.unmap(rng.start, rng.len)
        except OSError as exc:  # the table no longer has it: no access reaches it
            log.error("mapper %d: cannot unmap %s: %s", mapper.id, rng, exc.strerror or exc)


class Lease:
    """The deadline lives in `hot[3]` (the hot-chunk list every fast path has loaded already);
    the mapper thread renews it at the end of each turn, accesses wait here when it ran out."""

    __slots__ = ("_hot", "_turned", "_waiting", "_wake")

    def __init__(self, hot: list[int | bool | float], wake: Callable[[], None]) -> None:
        self._hot = hot
        self._wake = wake
        self._turned = threading.Condition(threading.Lock())
        self._waiting = 0
        hot[3] = _monotonic() + LEASE  # just registered: nothing can have ended it yet

    def end_turn(self, turn: float, renew: bool) -> None:
        """The mapper thread finished a turn that started (and polled) at `turn`."""
        if renew:
            self._hot[3] = turn + LEASE
        if self._waiting:
            with self._turned:
                self._turned.notify_all()

    def wait(self, timeout: float, settled: Callable[[], bool]) -> bool:
        """Wake the mapper thread and wait until the lease runs again or `settled()` (the
        mappings were dropped, the mapper closed); False if `timeout` seconds passed first."""
        deadline = _monotonic() + timeout
        with self._turned:
            self._waiting += 1
            try:
                while _monotonic() >= self._hot[3] and not settled():
                    left = deadline - _monotonic()
                    if left <= 0:
                        return False
                    self._wake()
                    # bounded: a turn that ended just before this wait began notified no one
                    self._turned.wait(min(left, 0.05))
            finally:
                self._waiting -= 1
        return True


def await_detach_ack(mapper: VaMapper, posted_as: int) -> None:
    """Wait for the manager's DetachAck to the Detach posted as mapper `posted_as` (fd.sock
    closed first reads as lost, not detached), but not once that manager is lost meanwhile
    (the mapper relinking, registered again under another id, or gone): none comes then, and
    a VM's launcher waited out the whole link timeout to leave after QEMU had exited."""
    deadline = _monotonic() + mapper.link.timeout
    while not mapper._detach_acked.wait(0.05):
        lost = not mapper.relinked.is_set() or mapper.id != posted_as or mapper.gone is not None
        if lost or _monotonic() > deadline:
            return


def renew(mapper: VaMapper) -> None:
    """Wait for a turn of the mapper thread: the lease ran out (an access calls this, never
    with `lock` held). Raises if the mapper thread has not run for `fault_timeout`."""
    settled = lambda: mapper.dropped is not None or mapper.closed  # noqa: E731
    if not mapper.lease.wait(mapper.fault_timeout, settled):
        raise GuestMemoryError(
            f"the mapper thread has not checked its connection to the manager for "
            f"{mapper.fault_timeout:g}s; no access can be made until it does"
        )
