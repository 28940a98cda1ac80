"""Waiters for mappings, with the rules of OpenVMM's va_mapper: registered before the request,
trimmed by each Map that covers their start, failed by NoMapping, by a read-only Map when they
want to write, and by shutdown (after which new waiters fail at once).
"""

from __future__ import annotations

import itertools
import threading

from ..protocol.ranges import MemoryRange

#: why a waiter failed
NO_MAPPING = "no-mapping"
READ_ONLY = "read-only"
SHUTDOWN = "shutdown"
#: the connection to the manager was lost: ask again once registered with its successor
RELINK = "relink"
#: prefix of the failure of a Map this mapper could not apply, followed by the reason
MAP_FAILED = "map-failed: "


class Waiter:
    """One access waiting for `range` to be mapped (writable if `writable`)."""

    __slots__ = ("_gate", "done", "failure", "range", "tag", "writable")

    def __init__(self, rng: MemoryRange, writable: bool, tag: int | None = None) -> None:
        self.range = rng
        self.writable = writable
        #: the tag of its request (FEATURE_TAGS), by which an Error from the manager names it
        self.tag = tag
        self.done = False
        self.failure: str | None = None
        # A bare lock, held until the waiter is done: waking on it runs no Python code (an
        # Event's wait runs a Condition's, on a thread that has just woken up).
        self._gate = threading.Lock()
        self._gate.acquire()

    def _finish(self, failure: str | None) -> None:
        """Called once per waiter: the set forgets a waiter as it finishes it."""
        self.failure = failure
        self.done = True
        self._gate.release()

    def complete(self, rng: MemoryRange, writable: bool | None, failure: str | None = None) -> bool:
        """Apply a Map (writable is a bool), a NoMapping (None) or a Map this mapper could not
        apply (`failure` says why); True when the waiter is done."""
        if not rng.contains_addr(self.range.start):
            return False
        if failure is not None:
            self._finish(failure)
            return True
        if writable is None:
            self._finish(NO_MAPPING)
            return True
        if self.writable and not writable:
            self._finish(READ_ONLY)
            return True
        remaining = MemoryRange(min(self.range.end, rng.end), self.range.end)
        if remaining.is_empty():
            self._finish(None)
            return True
        self.range = remaining  # one access may need several mappings
        return False

    def wait(self, timeout: float) -> bool:
        """True once done; False if `timeout` seconds passed first."""
        return self.done or self._gate.acquire(timeout=timeout) or self.done


class WaiterSet:
    """The waiters of one mapper; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[Waiter] | None = []
        self.shutdown_reason = ""
        self._tags = itertools.count(1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiters or ())

    def register(self, rng: MemoryRange, writable: bool, tagged: bool = False) -> Waiter:
        """A new waiter (with a tag of its own if `tagged`); already failed if the set was shut
        down."""
        waiter = Waiter(rng, writable, next(self._tags) if tagged else None)
        with self._lock:
            if self._waiters is None:
                waiter._finish(SHUTDOWN)
            else:
                self._waiters.append(waiter)
        return waiter

    def complete(self, rng: MemoryRange, writable: bool | None, failure: str | None = None) -> None:
        with self._lock:
            if self._waiters:
                self._waiters = [w for w in self._waiters if not w.complete(rng, writable, failure)]

    def fail_tagged(self, tag: int, failure: str) -> bool:
        """Fail the waiter whose request had `tag` (the manager refused it); False if none
        waits with that tag."""
        with self._lock:
            waiter = next((w for w in self._waiters or () if w.tag == tag), None)
            if waiter is None:
                return False
            self._waiters.remove(waiter)  # type: ignore[union-attr]
        waiter._finish(failure)
        return True

    def discard(self, waiter: Waiter) -> None:
        """Forget a waiter that gave up (timed out)."""
        with self._lock:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)

    def fail_all(self, failure: str) -> None:
        """Fail every current waiter with `failure` (later ones wait as usual)."""
        with self._lock:
            waiters, self._waiters = self._waiters, [] if self._waiters is not None else None
        for waiter in waiters or ():
            waiter._finish(failure)

    def shutdown(self, reason: str) -> None:
        """Fail every waiter; later ones fail at once."""
        with self._lock:
            waiters, self._waiters = self._waiters or [], None
            self.shutdown_reason = self.shutdown_reason or reason
        for waiter in waiters:
            waiter._finish(SHUTDOWN)
