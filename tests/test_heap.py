"""The daemon's garbage-collection policy (membacking/manager/heap.py): its long-lived state is
frozen once it has started and on each tick, garbage cycles are collected before anything is
frozen, and frozen garbage cycles are collected once the frozen heap has doubled."""

from __future__ import annotations

import gc
import shutil
import threading
import weakref
from collections.abc import Iterator

import pytest

from membacking.manager import heap as heap_module
from membacking.manager.daemon import Daemon
from membacking.manager.heap import Heap
from membacking.manager.persist import PersistConfig
from membacking.manager.settings import ManagerConfig, RegionSpec

from conftest import short_tmpdir


class _Node:
    """A tracked object that can be put in a reference cycle."""

    def __init__(self) -> None:
        self.other: object = None


def _garbage_cycle() -> list[bool]:
    """A reference cycle no one refers to; the returned flag turns True when it is freed."""
    freed = [False]
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.__setitem__, 0, True)
    return freed


def _is_frozen(obj: object) -> bool:
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (the freeze is process-wide)."""
    gc.unfreeze()
    callbacks = list(gc.callbacks)
    yield
    gc.callbacks[:] = callbacks
    gc.unfreeze()


@pytest.fixture
def heap() -> Iterator[Heap]:
    heap = Heap()
    yield heap
    heap.close()


def test_the_daemon_freezes_its_state_once_it_has_started() -> None:
    """Once the daemon is ready its regions are in the frozen generation: collections no
    longer walk them (at 10,000 regions a full collection walked them for 118 to 280 ms)."""
    runtime = short_tmpdir()
    config = ManagerConfig(
        runtime_dir=runtime,
        regions=[RegionSpec("ram", 0, 1 << 20)],
        persist=PersistConfig(enabled=False),
    )
    daemon = Daemon(config)
    seen: dict[str, object] = {}
    ready = threading.Event()

    def on_ready(d: Daemon) -> None:
        seen["frozen"] = gc.get_freeze_count()
        seen["region frozen"] = _is_frozen(d.state.regions["ram"])
        seen["pieces frozen"] = _is_frozen(d.state.regions["ram"].submappings[0])
        ready.set()

    thread = threading.Thread(target=daemon.run, args=(on_ready, False))
    thread.start()
    try:
        assert ready.wait(30)
    finally:
        daemon.stop()
        thread.join(30)
        shutil.rmtree(runtime, ignore_errors=True)
    assert seen["frozen"] and seen["region frozen"] and seen["pieces frozen"]
    assert gc.get_freeze_count() == 0  # stopped: the collector walks everything again


def test_what_survives_a_middle_collection_is_frozen_right_after_it(heap: Heap) -> None:
    """Between ticks, the oldest generation does not fill up with what survived the young
    collections (collections of it walked a second's worth of new objects)."""
    heap.settle()
    live = _Node()
    gc.collect(0)
    assert not _is_frozen(live)
    gc.collect(1)
    assert _is_frozen(live)
    heap.close()
    other = _Node()
    gc.collect(1)
    assert not _is_frozen(other) and gc.get_freeze_count() == 0


def test_a_tick_collects_cycles_first_and_freezes_what_lives(heap: Heap) -> None:
    heap.settle()
    freed = _garbage_cycle()
    live = _Node()
    assert not _is_frozen(live)
    heap.tick()
    assert freed == [True]  # collected, not frozen
    assert _is_frozen(live)


def test_frozen_garbage_cycles_are_collected_once_the_heap_doubled(
    monkeypatch: pytest.MonkeyPatch, heap: Heap
) -> None:
    monkeypatch.setattr(heap_module, "FLOOR", 0)
    heap.settle()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    freed = [False]
    weakref.finalize(a, freed.__setitem__, 0, True)
    heap.tick()  # the cycle is alive: frozen
    del a, b  # now garbage, but frozen: no collection walks it
    heap.tick()
    assert freed == [False] and heap.full_collections == 0
    # the heap doubles: more objects frozen, and more of the allocator's blocks in use
    grown: list[list[int]] = [[] for _ in range(2 * heap.blocks_after_full)]
    heap.tick(idle=False)  # a busy tick waits for a fourfold heap
    assert freed == [False] and heap.full_collections == 0
    heap.tick(idle=True)
    assert freed == [True] and heap.full_collections == 1
    assert heap.frozen_after_full > len(grown)


def test_a_heap_that_grows_with_the_state_is_not_collected_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twice the objects for twice the state (regions, table entries, mappers) is no sign of
    garbage: no full collection (one took 120 to 180 ms at 10,000 regions). The allocator's
    blocks in use are given, as the heap's growth the test sets."""
    monkeypatch.setattr(heap_module, "FLOOR", 0)
    blocks = [1_000_000]
    heap = Heap(blocks=lambda: blocks[0])
    try:
        heap.settle(size=5_000)
        grown: list[list[int]] = [[] for _ in range(heap.frozen_after_full + 1)]
        blocks[0] = 2_000_000  # the heap doubled with the state
        heap.tick(idle=True, size=10_000)
        assert heap.full_collections == 0
        more: list[list[int]] = [[] for _ in range(3 * len(grown))]
        blocks[0] = 4_000_000  # beyond what the state explains, but by less than its heap
        heap.tick(idle=True, size=10_000)
        assert heap.checks == 1 and heap.full_collections == 0
        more += [[] for _ in range(4 * len(grown))]
        blocks[0] = 4_500_000  # by more than a heap of its size
        heap.tick(idle=True, size=10_000)
        assert heap.checks == 2 and heap.full_collections == 1
    finally:
        heap.close()


def test_a_tick_does_not_walk_the_frozen_heap(monkeypatch: pytest.MonkeyPatch, heap: Heap) -> None:
    """Counting the frozen objects (`gc.get_freeze_count`) walks every one of them: 14 to 23 ms
    at 10,000 regions, in every tick. A tick counts only what it freezes, and not even when it
    checks whether they died (it reads the allocator's blocks)."""
    heap.settle()

    def walk() -> int:
        raise AssertionError("the tick walked the frozen heap")

    monkeypatch.setattr(heap_module.gc, "get_freeze_count", walk)
    live = [_Node() for _ in range(10)]
    heap.tick()
    assert heap.frozen_since >= len(live) and all(_is_frozen(n) for n in live)


def test_objects_frozen_and_freed_since_make_a_count_not_a_full_collection(
    monkeypatch: pytest.MonkeyPatch, heap: Heap
) -> None:
    """Objects frozen because they were alive at a collection, then freed, are no garbage:
    the tick looks at the allocator's blocks once and collects nothing whole."""
    monkeypatch.setattr(heap_module, "FLOOR", 0)
    heap.settle()
    churn: list[list[int]] = [[] for _ in range(2 * heap.frozen_after_full)]
    assert heap.frozen_since > heap.frozen_after_full  # frozen by the middle collections
    del churn

    def walk() -> int:  # (a walk of every frozen object: 14 to 23 ms at 10,000 regions)
        raise AssertionError("the tick counted the frozen heap")

    monkeypatch.setattr(heap_module.gc, "get_freeze_count", walk)
    heap.tick()
    assert heap.checks == 1 and heap.full_collections == 0
    assert heap.frozen_since < heap.frozen_after_full


def test_a_settle_that_is_not_full_leaves_the_frozen_heap_frozen() -> None:
    """After the state was settled before a handover's ask, the start of service collects
    only what came since: what was frozen stays so (it is not walked again), the new objects
    are frozen too, and a garbage cycle among them is collected first."""
    heap = Heap()
    try:
        heap.settle()
        frozen = gc.get_freeze_count()
        kept = [_Node() for _ in range(1000)]
        dead = _Node()
        dead.other = dead
        gone = weakref.ref(dead)
        del dead
        heap.settle(full=False)
        assert gone() is None
        assert gc.get_freeze_count() >= frozen + len(kept)
        assert heap.frozen_after_full >= frozen + len(kept)
    finally:
        heap.close()
