"""A mapper of the previous manager whose wait ran out is "not back" (and killed under
--evict-kill) only while its process may still map guest memory: one that gave up, dropped
everything as a mapper must and attached again holds nothing of the old manager's, and was
killed all the same, or left `status` degraded for as long as it lived."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from membacking.manager.awaited import AwaitedMappers
from membacking.manager.journal import MapperRecord

from conftest import RunningManager, cli_env

Start = Callable[..., RunningManager]

#: attaches, maps, and once the manager is gone for longer than its reconnect_timeout (its
#: mappings dropped) attaches again and again, as the docs say to
GIVER = """
import sys, time
import membacking
runtime = sys.argv[1]
memory = membacking.attach(runtime, name="giver", reconnect_timeout=0.5)
memory.write_at(0, b"x")
print("attached", flush=True)
while True:
    try:
        memory.read_at(0, 1)
    except membacking.MappingsDroppedError:
        break
    except membacking.ManagerGoneError:
        pass
    time.sleep(0.05)
print("dropped", flush=True)
while True:
    try:
        memory = membacking.attach(runtime, name="again", timeout=1)
        break
    except membacking.MembackingError:
        time.sleep(0.1)
print("again", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def given_up(
    start_manager: Start, regions: tuple[str, ...], *options: str
) -> Iterator[tuple[subprocess.Popen[str], RunningManager]]:
    """A GIVER that attached, saw its manager killed and gave up waiting (it dropped all it
    held), and the manager started again on the same state with `options`."""
    first = start_manager(*regions)
    giver = subprocess.Popen(
        [sys.executable, "-c", GIVER, str(first.runtime_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )
    try:
        assert giver.stdout is not None and giver.stdout.readline().strip() == "attached"
        time.sleep(1.5)  # journaled (the daemon's tick)
        first.stop(signal.SIGKILL)
        assert giver.stdout.readline().strip() == "dropped"  # its wait ran out
        yield giver, start_manager(*regions, *options, runtime_dir=first.runtime_dir)
    finally:
        giver.kill()
        giver.wait(10)


def test_a_mapper_that_gave_up_and_attached_again_is_neither_killed_nor_not_back(
    start_manager: Start,
) -> None:
    regions = ("--region", "ram=0:4M")
    with given_up(start_manager, regions, "--unmap-timeout", "1", "--evict-kill") as (
        giver,
        second,
    ):
        assert giver.stdout is not None and giver.stdout.readline().strip() == "again"
        deadline = time.monotonic() + 20
        while second.client().status()["awaited"]:
            assert time.monotonic() < deadline, second.log()
            time.sleep(0.1)
        time.sleep(1.5)  # a tick past the wait
        assert giver.poll() is None, second.log()  # not killed
        status = json.loads(second.cli("status", "--json").stdout)
        assert status["not_back"] == [] and status["health"] == "ok", status
        assert "maps no guest memory any more: not awaited" in second.log()


def test_only_a_process_that_may_map_guest_memory_is_not_back() -> None:
    record = MapperRecord(3, 4242, 77)
    for maps, files, expected in (
        (False, False, []),  # seen to map none: done
        (True, False, [record]),  # maps some: not back
        (None, False, [record]),  # cannot tell: not back
        (False, True, [record]),  # some regions are the operator's files: names say nothing
    ):
        awaited = AwaitedMappers(started={4242: 77}.get, maps=lambda pid, m=maps: m)
        awaited.adopt((record,))
        awaited.begin(0.0, 1.0)
        assert awaited.tick(2.0, files) == expected, (maps, files)
        assert awaited.not_back() == [r.pid for r in expected]


def test_a_mapper_seen_to_map_nothing_is_not_awaited_for_the_whole_wait() -> None:
    """It was checked only once the wait ran out: a mapper that had given up and dropped
    everything held every removal, move and map for the whole --unmap-timeout (30 s)."""
    record = MapperRecord(3, 4242, 77)
    for maps, expected in ((False, False), (True, True), (None, True)):
        awaited = AwaitedMappers(started={4242: 77}.get, maps=lambda pid, m=maps: m)
        awaited.adopt((record,))
        awaited.begin(0.0, 30.0)
        assert awaited.tick(1.0) == [] and awaited.open is expected, maps
        assert awaited.not_back() == []
    # /proc/PID/maps is read once while a mapper is awaited (15 ms with 30,000 VMAs, each
    # tick, on the daemon's loop), and again when the wait runs out
    looked: list[int] = []
    awaited = AwaitedMappers(started={4242: 77}.get, maps=lambda pid: looked.append(pid) or True)
    awaited.adopt((record,))
    awaited.begin(0.0, 30.0)
    for now in range(1, 30):
        assert awaited.tick(float(now)) == []
    assert looked == [4242] and awaited.open
    assert awaited.tick(31.0) == [record] and looked == [4242, 4242]


def test_a_removal_after_a_restart_does_not_wait_for_a_mapper_that_gave_up(
    start_manager: Start,
) -> None:
    regions = ("--region", "ram=0:4M", "--region", "dev=0x10000000:1M")
    with given_up(start_manager, regions) as (_, second):
        started = time.monotonic()
        second.client().remove_region("dev")  # (the default unmap timeout: 30 s)
        assert time.monotonic() - started < 10, second.log()


def test_a_launcher_not_back_is_said_to_keep_its_vm_pinned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without --evict-kill a VM's launcher that did not come back was logged with the hint
    that --evict-kill would kill it, which it does not (its pin spares it)."""
    from collections import Counter

    from membacking.manager.fdconn import not_back
    from membacking.manager.pins import Pin

    lent = Pin(3, "VM 'web'", 4343, frozenset({"ram"}), 9)
    with caplog.at_level(logging.ERROR, logger="membacking.manager"):
        not_back(MapperRecord(3, 4242, 77), 30.0, False, Counter(), lent)
    assert "did not come back within 30s" in caplog.text
    assert "lent regions ram to VM 'web' (pid 4343), which stay pinned" in caplog.text
    assert "--evict-kill would kill it" not in caplog.text
