"""Room in the daemon's descriptor table, made before the descriptors come (fdroom.py): the
table holds `extra` more above the highest open descriptor, no descriptor in use is replaced,
the open-file ceiling is kept; a started daemon, and one that took over, have room for their
mappers' connections before any connects (growing the table in a process of several threads
waits for an RCU grace period)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from membacking.manager import fdroom
from membacking.manager.fdserver import MAX_UNREGISTERED


def _highest(pid: int | str = "self") -> int:
    return max(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


def _room(pid: int | str = "self") -> int:
    """Free slots above the highest open descriptor of `pid`."""
    size = fdroom.table_size(pid)
    assert size is not None
    return size - 1 - _highest(pid)


def _open_files() -> dict[int, tuple[int, int]]:
    """Each open descriptor's file (device, inode)."""
    files = {}
    for name in os.listdir("/proc/self/fd"):
        try:  # (the listing's own descriptor is closed by now)
            info = os.fstat(int(name))
        except OSError:
            continue
        files[int(name)] = (info.st_dev, info.st_ino)
    return files


def test_room_is_made_above_the_highest_descriptor_and_nothing_is_replaced() -> None:
    extra = fdroom.table_size() or 64  # more than the table has: it must grow
    # a descriptor at the very slot the duplicate that grows the table asks for
    probe = os.open("/dev/null", os.O_RDONLY)
    blocker = os.dup2(probe, _highest() + extra)
    os.close(probe)
    try:
        before = _open_files()
        fdroom.make_room(extra, ceiling=1 << 20)
        assert _room() >= extra
        assert _open_files() == before  # the duplicate was closed; nothing was replaced
        size = fdroom.table_size()
        fdroom.make_room(extra, ceiling=1 << 20)  # it fits: nothing changes
        assert fdroom.table_size() == size
    finally:
        os.close(blocker)


def test_room_stops_at_the_ceiling() -> None:
    highest = _highest()
    size = fdroom.table_size()
    assert size is not None
    fdroom.make_room(1 << 20, ceiling=size)  # the daemon's own limit: within the table
    assert fdroom.table_size() == size and _highest() == highest


#: regions enough that the table a start leaves (256 slots for a small daemon) is full
REGIONS = [f"--region=r{i}=0x{i << 20:x}:1M" for i in range(200)]


def test_a_started_daemon_has_room_for_its_mappers_connections(start_manager: Any) -> None:
    manager = start_manager(*REGIONS)
    assert _room(manager.pid) >= fdroom.PER_MAPPER * MAX_UNREGISTERED + fdroom.SPARE


def test_a_daemon_that_took_over_had_room_before_it_asked(start_manager: Any) -> None:
    regions = REGIONS
    first = start_manager(*regions)
    held = fdroom.open_count(first.pid)
    assert held is not None and held > 200
    second = start_manager(*regions, "--takeover", runtime_dir=Path(first.runtime_dir))
    # what the old daemon held (sent over, then adopted) and the mappers' first connections
    assert _room(second.pid) >= fdroom.PER_MAPPER * MAX_UNREGISTERED
    size = fdroom.table_size(second.pid)
    assert size is not None and size > held + fdroom.PER_MAPPER * MAX_UNREGISTERED
