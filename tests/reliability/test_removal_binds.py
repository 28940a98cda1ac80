"""Reliability: removal binds every holder. A holder stopped with SIGSTOP is evicted, and when
it runs again its first accesses fail before touching the removed memory; under --evict-kill it
is killed instead. Each scenario checks the manager's fds and memfds return to where they were.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_eviction_binds import (
    GPA,
    NEW,
    OLD,
    SIZE,
    STRAY,
    answers,
    holds_region,
    queue,
    stop,
    wait_until,
)
from test_faults import manager_fds, record

from conftest import RunningManager, Worker, WorkerError

Spawn = Callable[..., Worker]
Start = Callable[..., RunningManager]


def test_a_holder_evicted_while_stopped_drops_everything_before_it_accesses(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    """The holder maps two regions and is stopped. Removing the first evicts it; the second,
    removed after that, sends it nothing at all (it holds nothing any more, as far as the
    manager knows). A new region takes the second one's GPA. Woken, the holder's very first
    accesses (waiting on its stdin, racing its mapper thread) must fail before touching any
    byte, and it must hold neither memfd any more."""
    running = start_manager("--unmap-timeout", "1")
    client = running.client()
    before = manager_fds(running)
    client.add_region("first", 2 * GPA, SIZE)
    client.add_region("old", GPA, SIZE)
    holder = spawn_worker(running, "holder")
    holder.ask(f"write {2 * GPA:#x} {OLD}")
    holder.ask(f"write {GPA:#x} {OLD}")
    assert holds_region(holder, "first") and holds_region(holder, "old")
    stop(holder)
    try:
        started = time.monotonic()
        result = client.remove_region("first")  # returns once the stopped holder is evicted
        assert time.monotonic() - started >= 1.0
        assert result["unmapped_from"] == [] and result["evicted"] == [holder.mapper_id]
        assert client.remove_region("old")["unmapped_from"] == []  # nobody to wait for
        client.add_region("new", GPA, SIZE)
        writer = spawn_worker(running, "writer")
        writer.ask(f"write {GPA:#x} {NEW}")
        queue(
            holder,
            f"read {GPA:#x} 16",
            f"write {GPA:#x} {STRAY}",
            f"read {2 * GPA:#x} 16",
            f"read {GPA + 32:#x} 1",
        )
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    got = answers(holder, 4)
    for answer in got:
        assert answer.startswith("err MappingsDroppedError"), got
    assert "evicted" in got[0]
    assert writer.ask(f"read {GPA:#x} 16") == NEW  # the new region is untouched
    assert holder.ask("mapped") == ""
    for name in ("first", "old"):
        assert not holds_region(holder, name)  # neither mapped nor held as an fd
    assert client.stats()["evictions"] == 1
    holder.close()
    writer.close()
    client.remove_region("new")
    assert wait_until(lambda: manager_fds(running) == before)
    record(
        "holder SIGSTOPped, evicted; a region removed after that; a new one at its GPA; SIGCONT",
        1,
        "the holder's first accesses (racing its mapper thread) raised MappingsDroppedError "
        "before touching a byte; both memfds gone from it; new region intact",
        "nothing",
        before,
        manager_fds(running),
    )


@pytest.mark.parametrize("how", ["option", "config"])
def test_evict_kill_kills_a_stopped_holder(
    start_manager: Start, spawn_worker: Spawn, tmp_path: Path, how: str
) -> None:
    config = tmp_path / "membacking.toml"
    config.write_text("evict_kill = true\nunmap_timeout = 1\n")
    flags = ["--unmap-timeout", "1", "--evict-kill"]
    running = start_manager(*(["--config", str(config)] if how == "config" else flags))
    client = running.client()
    before = manager_fds(running)
    client.add_region("old", GPA, SIZE)
    holder = spawn_worker(running, "frozen")
    bystander = spawn_worker(running, "bystander")
    holder.ask(f"read {GPA:#x} 1")
    bystander.ask(f"write {GPA:#x} {OLD}")
    stop(holder)
    result = client.remove_region("old")
    assert result["evicted"] == [holder.mapper_id]
    assert result["evicted_why"][str(holder.mapper_id)].endswith("and killed (--evict-kill)")
    assert holder.proc.wait(10) == -signal.SIGKILL
    assert client.stats()["evict_kills"] == 1
    assert f"(pid {holder.pid}) killed (SIGKILL, --evict-kill)" in running.log()
    with pytest.raises(WorkerError, match="NoMappingError"):
        bystander.ask(f"read {GPA:#x} 1")  # answered (not evicted), and the region is gone
    bystander.close()
    assert wait_until(lambda: manager_fds(running) == before)
    if how == "option":
        record(
            "holder SIGSTOPped during a removal, under --evict-kill",
            1,
            "evicted after --unmap-timeout and killed (SIGKILL by pidfd); counted in evict_kills",
            "nothing",
            before,
            manager_fds(running),
        )
