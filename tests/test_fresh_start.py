"""What a mapper does when the manager it registers again with is not the one it had: one
serving other memory (a --no-state or --fresh restart) is left by default and said at the next
access; one lost mid-detach is not waited for; a hook on registering again must be callable."""

from __future__ import annotations

import time
from typing import Any

import pytest


@pytest.mark.parametrize("fresh_start", ["raise", "follow"])
def test_a_manager_back_on_other_memory_is_said_at_the_next_access_unless_followed(
    start_manager: Any, fresh_start: str
) -> None:
    """A manager restarted with --no-state (or --fresh) serves other memory: a device model
    attached with the defaults went on reading and writing the new, zeroed memory, told by a
    log line and an optional hook only. Its next access raises MappingsDroppedError now, and it
    leaves that manager; `fresh_start="follow"` goes on as before, its hooks told `kept` False."""
    import signal

    import membacking

    regions = ("--region", "ram0=0:8M")
    first = start_manager(*regions)
    told: list[bool] = []
    memory = membacking.attach(first.runtime_dir, fresh_start=fresh_start)
    try:
        memory.on_registered_again(lambda kept, old_id: told.append(kept))
        memory.write_at(0x1000, b"kept")
        first.stop(signal.SIGKILL)
        second = start_manager(*regions, "--no-state", runtime_dir=first.runtime_dir)
        if fresh_start == "follow":
            deadline = time.monotonic() + 15
            while not told and time.monotonic() < deadline:
                time.sleep(0.05)
            assert told == [False]
            assert memory.read_at(0x1000, 4) == bytes(4)  # the new manager's memory
            assert [p["name"] for p in second.client().mappers()] == [memory.name]
            return
        deadline = time.monotonic() + 15
        while memory.manager_gone is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(membacking.MappingsDroppedError, match="serving other memory"):
            memory.read_at(0x1000, 4)
        while second.client().mappers() and time.monotonic() < deadline:
            time.sleep(0.05)  # (it has left: the daemon sees its fd.sock end on a later turn)
        assert told == [] and second.client().mappers() == []
    finally:
        memory.detach()


def test_fresh_start_takes_raise_or_follow() -> None:
    import membacking

    with pytest.raises(membacking.ArgumentValueError, match="'raise' or 'follow'"):
        membacking.attach("/nonexistent", fresh_start="keep")
    with pytest.raises(membacking.ArgumentTypeError, match="fresh_start must be a str"):
        membacking.attach("/nonexistent", fresh_start=True)  # type: ignore[arg-type]


def test_a_detach_right_after_the_manager_died_does_not_wait_for_its_answer(
    start_manager: Any,
) -> None:
    """A VM's launcher whose QEMU exited just after the manager was killed took 10 s to leave:
    its detach waited the whole link timeout for a DetachAck no manager would send, since the
    mapper had not yet taken the manager for lost. It stops waiting once it does."""
    import signal

    import membacking

    manager = start_manager("--region", "ram0=0:8M")
    memory = membacking.attach(manager.runtime_dir, timeout=10.0)
    memory.write_at(0, b"x")
    manager.stop(signal.SIGKILL)
    started = time.monotonic()
    memory.detach()
    assert time.monotonic() - started < 5


def test_a_hook_that_is_not_callable_is_refused_when_given(start_manager: Any) -> None:
    import membacking

    manager = start_manager("--region", "ram0=0:8M")
    with (
        membacking.attach(manager.runtime_dir) as memory,
        pytest.raises(membacking.ArgumentTypeError, match="hook must be callable"),
    ):
        memory.on_registered_again("notcallable")  # type: ignore[arg-type]
