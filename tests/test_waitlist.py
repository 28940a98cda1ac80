"""Waiter rules, exactly as va_mapper.rs: registered before the request, trimmed by Maps covering
their start, failed by NoMapping, by read-only Maps when writing, and by shutdown."""

from __future__ import annotations

from membacking.mapper.waitlist import NO_MAPPING, READ_ONLY, SHUTDOWN, WaiterSet
from membacking.protocol.ranges import MemoryRange

P = 4096


def r(start: int, end: int) -> MemoryRange:
    return MemoryRange(start * P, end * P)


def test_map_covering_the_whole_range_completes() -> None:
    waiters = WaiterSet()
    waiter = waiters.register(r(2, 4), writable=False)
    waiters.complete(r(0, 8), True)
    assert waiter.done and waiter.failure is None and len(waiters) == 0


def test_partial_coverage_trims_and_keeps_waiting() -> None:
    waiters = WaiterSet()
    waiter = waiters.register(r(2, 6), writable=True)
    waiters.complete(r(0, 4), True)
    assert not waiter.done and waiter.range == r(4, 6)
    waiters.complete(r(4, 5), True)
    assert not waiter.done and waiter.range == r(5, 6)
    waiters.complete(r(5, 9), True)
    assert waiter.done and waiter.failure is None


def test_a_map_not_covering_the_start_is_ignored() -> None:
    waiters = WaiterSet()
    waiter = waiters.register(r(2, 6), writable=False)
    waiters.complete(r(3, 10), True)  # covers most of it, but not its start
    assert not waiter.done and waiter.range == r(2, 6)
    waiters.complete(r(0, 2), None)  # NoMapping before the start: not about this waiter
    assert not waiter.done


def test_nomapping_fails() -> None:
    waiters = WaiterSet()
    waiter = waiters.register(r(2, 6), writable=False)
    waiters.complete(r(2, 3), None)
    assert waiter.done and waiter.failure == NO_MAPPING


def test_write_on_read_only_fails_but_read_succeeds() -> None:
    waiters = WaiterSet()
    writer = waiters.register(r(0, 1), writable=True)
    reader = waiters.register(r(0, 1), writable=False)
    waiters.complete(r(0, 4), False)
    assert writer.failure == READ_ONLY and reader.failure is None
    assert writer.done and reader.done


def test_nomapping_after_partial_progress_fails_at_the_remaining_start() -> None:
    waiters = WaiterSet()
    waiter = waiters.register(r(0, 4), writable=False)
    waiters.complete(r(0, 2), True)
    waiters.complete(r(2, 4), None)
    assert waiter.failure == NO_MAPPING and waiter.range.start == 2 * P


def test_shutdown_fails_waiters_and_new_ones_at_once() -> None:
    waiters = WaiterSet()
    old = waiters.register(r(0, 1), writable=False)
    waiters.shutdown("manager gone")
    assert old.failure == SHUTDOWN and old.done
    new = waiters.register(r(0, 1), writable=False)
    assert new.failure == SHUTDOWN and new.done
    assert waiters.shutdown_reason == "manager gone"
    waiters.complete(r(0, 1), True)  # harmless after shutdown


def test_discard_forgets_a_waiter() -> None:
    waiters = WaiterSet()
    waiter = waiters.register(r(0, 1), writable=False)
    waiters.discard(waiter)
    waiters.complete(r(0, 1), True)
    assert not waiter.done and len(waiters) == 0
