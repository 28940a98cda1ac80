"""`GuestMemory.find` / `find_all` and `membacking mem find` on a real manager: matches across
step boundaries, overlapping matches, ranges beyond what is backed, and the command's errors."""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

import pytest

from membacking.errors import MembackingError
from membacking.mapper import attach
from membacking.mapper.search import find_all

from conftest import RunningManager

MiB = 1 << 20


def test_find_across_steps_and_overlaps(manager: RunningManager) -> None:
    with attach(manager.runtime_dir, name="finder") as memory:
        memory.fill_at(0, 0, 8 * MiB)
        marker = b"MARKER-42"
        # straddling the 4 KiB step boundaries used below, and one at each end of the range
        places = [0x1000 - 4, 0x3000 - 1, 0x5000 - len(marker) + 1, 0x10000, 8 * MiB - 9]
        for gpa in places:
            memory.write_at(gpa, marker)
        seen: list[int] = []
        found = list(find_all(memory, marker, 0, 8 * MiB, step=4096, progress=seen.append))
        assert found == places
        assert sum(seen) == 8 * MiB and max(seen) == 4096
        assert list(memory.find_all(marker, 0, 8 * MiB)) == places  # default step
        assert memory.find(marker, 0x1000, 8 * MiB - 0x1000) == 0x3000 - 1
        assert memory.find(marker, 0x10001, MiB) is None
        # a match must lie wholly inside the range
        assert memory.find(marker, 0, 0x1000 + 4) is None
        memory.write_at(0x20000, b"aaaa")
        assert list(memory.find_all(b"aa", 0x20000, 4)) == [0x20000, 0x20001, 0x20002]
        with pytest.raises(ValueError, match="empty"):
            memory.find(b"", 0, 10)
        with pytest.raises(MembackingError):
            memory.find(b"x", 0, 1 << 50)


def test_mem_find_cli(manager: RunningManager) -> None:
    assert manager.cli("mem", "write", "0x7000", "--hex", "feedface").returncode == 0
    assert manager.cli("mem", "write", "0x3ff0000", "--hex", "feedface").returncode == 0
    text = manager.cli("mem", "find", "--hex", "feedface")
    assert text.returncode == 0, text.stderr
    assert text.stdout.split() == ["0x7000", "0x3ff0000"]
    manager.cli("mem", "write", "0x9000", "--hex", "68656c6c6f")
    js = manager.cli("mem", "find", "hello", "--start", "0x8000", "--length", "64K", "--json")
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == {
        "pattern": b"hello".hex(),
        "start": 0x8000,
        "length": 0x10000,
        "matches": [0x9000],
        "truncated": False,
    }
    capped = manager.cli("mem", "find", "--hex", "00", "--length", "4K", "--max-matches", "3")
    assert capped.stdout.split() == ["0x0", "0x1", "0x2"]
    assert "stopped after 3 matches" in capped.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hex", "xyz"], "not hex bytes"),
        (["--start", "0x10000000", "x"], "no active region backs GPA 0x10000000"),
        (["--length", "128M", "x"], "0x4000000"),  # runs off the end of ram0
    ],
)
def test_mem_find_errors(manager: RunningManager, args: list[str], message: str) -> None:
    result = manager.cli("mem", "find", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_find_all_in_steps_takes_int_subclasses(manager: RunningManager) -> None:
    """search.find_all takes an address and length of an int subclass (IntEnum) as the ints
    they are; a bool is still refused."""

    class At(IntEnum):
        START = 0x4000
        LENGTH = 0x2000

    with attach(manager.runtime_dir, name="finder") as memory:
        memory.write_at(0x5000, b"needle")
        found = list(find_all(memory, b"needle", At.START, At.LENGTH, step=4096))
        assert found == list(find_all(memory, b"needle", 0x4000, 0x2000, step=4096)) == [0x5000]
        with pytest.raises(ValueError, match="non-negative integers"):
            list(find_all(memory, b"needle", True, 0x2000))


def test_all_searches_every_backed_range_across_holes(start_manager: Any) -> None:
    """The default length stops at the first hole, and a --length across one failed: a guest's
    RAM and its DIMM above 4 GiB could not be searched in one command. A search that finds
    nothing says so (it printed nothing at all)."""
    manager = start_manager("--region", "low=0:1M", "--region", "high=0x100000000:1M")
    manager.cli("mem", "write", "0x2000", "--hex", "c0ffee11")
    manager.cli("mem", "write", "0x100003000", "--hex", "c0ffee11")
    first = manager.cli("mem", "find", "--hex", "c0ffee11")
    assert first.stdout.split() == ["0x2000"], first
    both = manager.cli("mem", "find", "--hex", "c0ffee11", "--all")
    assert both.returncode == 0 and both.stdout.split() == ["0x2000", "0x100003000"], both
    high = manager.cli("mem", "find", "--hex", "c0ffee11", "--all", "--start", "0x3000")
    assert high.stdout.split() == ["0x100003000"], high
    none = manager.cli("mem", "find", "absent-pattern", "--all")
    assert none.returncode == 0 and none.stdout == "", none
    assert none.stderr.strip().endswith("no match in 2097152 bytes"), none.stderr
    both_flags = manager.cli("mem", "find", "x", "--all", "--length", "4K")
    assert both_flags.returncode == 2 and "without --length" in both_flags.stderr
