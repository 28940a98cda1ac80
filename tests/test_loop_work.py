"""The daemon's loop runs the work changes leave for later turns (`ManagerState.work`) between
the messages it serves, with real mapper processes: a removal answered, its bookkeeping done
soon after, and the mapper served meanwhile."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from membacking import ControlClient
from membacking.manager.daemon import Daemon
from membacking.manager.persist import PersistConfig
from membacking.manager.settings import ManagerConfig, RegionSpec

from conftest import Worker, WorkerError, short_tmpdir

PAGE = 4096


def test_the_loop_finishes_what_a_removal_left_for_later() -> None:
    runtime = short_tmpdir()
    config = ManagerConfig(
        runtime_dir=runtime,
        regions=[RegionSpec("ram", 0, 64 * PAGE), RegionSpec("other", 1 << 20, PAGE)],
        persist=PersistConfig(enabled=False),
    )
    daemon = Daemon(config)
    ready = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(lambda d: ready.set(), False))
    thread.start()
    worker = None
    try:
        assert ready.wait(30)
        worker = Worker(runtime, "holder")
        client = ControlClient(runtime)
        worker.ask(f"read 0x0 {64 * PAGE:#x}")  # it holds the whole region
        for i in range(20):  # 20 holes: it holds 21 pieces
            reply = client.unmap_range("ram", (2 * i + 1) * PAGE, PAGE)
        assert reply["pieces"] == 21
        result = client.remove_region("ram")
        assert result["unmapped_from"] == [worker.mapper_id]
        with pytest.raises(WorkerError, match="NoMappingError"):
            worker.ask("read 0x0 1")
        assert worker.ask(f"read {1 << 20:#x} 1") == "00"  # served as ever
        deadline = time.monotonic() + 10
        while daemon.state.has_work and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not daemon.state.has_work  # the loop did it, between the messages it served
        held = daemon.state.mappers[worker.mapper_id].held
        assert held.later == 0 and len(held) == 1
    finally:
        if worker is not None:
            worker.close()
        daemon.stop()
        thread.join(30)
        shutil.rmtree(runtime, ignore_errors=True)


@contextlib.contextmanager
def _daemon_of(count: int, on_step: Callable[[Daemon], None]) -> Iterator[tuple[Daemon, Path]]:
    """A daemon in this process serving `count` regions of a page each (a page apart), every
    call of its state's `step` reported to `on_step` first; stopped and cleaned up after."""
    runtime = short_tmpdir()
    regions = [RegionSpec(f"r{i}", i * 2 * PAGE, PAGE) for i in range(count)]
    config = ManagerConfig(
        runtime_dir=runtime, regions=regions, persist=PersistConfig(enabled=False)
    )
    daemon = Daemon(config)
    ready = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(lambda d: ready.set(), False))
    thread.start()
    real_step = daemon.state.step

    def counted_step() -> list[object]:
        on_step(daemon)
        return real_step()  # type: ignore[return-value]

    daemon.state.step = counted_step  # type: ignore[method-assign]
    try:
        assert ready.wait(30)
        yield daemon, runtime
    finally:
        daemon.stop()
        thread.join(30)
        shutil.rmtree(runtime, ignore_errors=True)


def test_the_loop_sends_an_eager_replay_a_batch_at_a_time() -> None:
    """A mapper becoming eager over many regions: the replay goes out in batches the loop
    sends between the messages it serves (state.step), and ends with every region mapped."""
    from membacking.manager.steps import STEP_MESSAGES

    count = 3 * STEP_MESSAGES
    steps: list[int] = []
    worker = other = None
    with _daemon_of(count, lambda d: steps.append(1)) as (daemon, runtime):
        try:
            worker = Worker(runtime, "eager")
            other = Worker(runtime, "other")
            worker.send("eager")
            assert other.ask(f"read {2 * PAGE:#x} 1") == "00"  # served meanwhile
            assert worker.answer(timeout=30) == ""
            mapped = worker.ask("mapped").split(",")
            assert len(mapped) == count
            assert len(steps) >= 2  # the rest of the replay, after the first batch
            modes = {e.name: e.mode for e in daemon.state.mappers.values()}
            assert modes == {"eager": "eager", "other": "lazy"}
        finally:
            for w in (worker, other):
                if w is not None:
                    w.close()


def test_the_loop_puts_a_large_activation_in_place_a_batch_at_a_time() -> None:
    """Disabling a region that hid hundreds of others: the loop puts them back in the table a
    batch per turn (placing.py) between the messages it serves, then pushes them to the eager
    mapper and refills the lazy holder of the region that hid them; the answer comes after.
    Hiding them again sends each mapper one Unmap spanning them all."""
    from membacking.manager.placing import PIECES_PER_MESSAGE, Place
    from membacking.manager.steps import STEP_MESSAGES

    count = 2 * STEP_MESSAGES * PIECES_PER_MESSAGE  # more than one turn places
    last = (count - 1) * 2 * PAGE
    places: list[int] = []

    def placing(daemon: Daemon) -> None:
        queue = daemon.state.steps._queue
        if queue and isinstance(queue[0], Place):
            places.append(1)

    worker = eager = None
    with _daemon_of(count, placing) as (daemon, runtime):
        try:
            worker = Worker(runtime, "lazy")
            worker.ask(f"write {last:#x} ab")
            client = ControlClient(runtime)
            client.add_region("cover", 0, count * 2 * PAGE, priority=1)
            assert worker.ask(f"read {last:#x} 1") == "00"  # the cover's memory, held now
            eager = Worker(runtime, "eager")
            eager.send("eager")
            assert eager.answer(timeout=30) == ""
            reply = client.disable_region("cover")
            assert reply["state"] == "disabled"
            assert len(places) >= 2  # the pieces went in place over several turns
            assert worker.ask(f"read {last:#x} 1") == "ab"
            assert len(eager.ask("mapped").split(",")) == count
            lazy = daemon.state.mappers[worker.mapper_id]
            assert len(lazy.held) == count  # refilled with every region it lost the cover over
            # hidden again: each of the two mappers gets one Unmap spanning every region
            unmaps = client.stats()["unmaps_sent"]
            client.enable_region("cover")
            assert client.stats()["unmaps_sent"] - unmaps == 2
            assert worker.ask(f"read {last:#x} 1") == "00"
            assert eager.ask("mapped").split(",") == [f"{0:#x}-{count * 2 * PAGE:#x}"]
        finally:
            for w in (worker, eager):
                if w is not None:
                    w.close()
