"""Plain accesses and atomic words across processes: an aligned read_plain / write_plain of 1,
2, 4 or 8 bytes is one load or store (another mapper never sees a value that was not written),
and fetch_add / compare_exchange are atomic between mappers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import membacking
from membacking import ffi
from membacking.errors import AtomicsUnavailableError, NoMappingError, ReadOnlyError

from conftest import READY_TIMEOUT, RunningManager, cli_env

WORKER = Path(__file__).with_name("plain_worker.py")
#: how long a reader watches a writer (longer if it saw the value change less than 1,000 times)
WATCH_SECONDS = 1.0


def run_pair(
    manager: RunningManager, gpa: int, fmt: str, modes: list[tuple[str, str]]
) -> list[dict[str, object]]:
    """Start one worker process per (mode, arg), let them go at once, return their results."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(manager.runtime_dir), f"w{i}", hex(gpa), fmt, *mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        for i, mode in enumerate(modes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", line + (proc.stderr.read() if proc.stderr else "")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=READY_TIMEOUT + 30)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# every width, both byte orders, signed and unsigned
FORMATS = ["B", "b", "<H", ">H", "<I", ">i", "<Q", ">Q", "=q", "!I"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_another_mapper_only_ever_reads_values_that_were_written(
    manager: RunningManager, fmt: str
) -> None:
    """A writer alternates two values whose bytes differ from 0 and from each other; the reader
    in another process must only ever see one of them (before, struct's packer cleared the
    word before storing, and its standard-size unpacker read it byte by byte)."""
    size = struct.calcsize(fmt)
    gpa = 0x4000 + 8 * size  # aligned to the size, and to 8
    reader, _ = run_pair(
        manager, gpa, fmt, [("read", str(WATCH_SECONDS)), ("write", str(6 * WATCH_SECONDS))]
    )
    assert reader["bad"] is None, (
        f"{fmt}: read {reader['bad']!r}, which was never written (after {reader['reads']} reads)"
    )
    # the processes really ran side by side: the reader saw the value change
    assert isinstance(reader["changes"], int) and reader["changes"] >= 20, reader


@pytest.mark.parametrize("fmt", ["<Q", "<i", ">I", ">q"])
def test_fetch_add_from_two_mappers_loses_no_increment(manager: RunningManager, fmt: str) -> None:
    n = 20_000
    run_pair(manager, 0x8000, fmt, [("add", str(n)), ("add", str(n))])
    with membacking.attach(manager.runtime_dir) as memory:
        assert memory.read_plain(0x8000, fmt) == 2 * n


@pytest.mark.parametrize("fmt", ["<I", ">Q"])
def test_compare_exchange_from_two_mappers_loses_no_increment(
    manager: RunningManager, fmt: str
) -> None:
    n = 10_000
    run_pair(manager, 0x9000, fmt, [("cas", str(n)), ("cas", str(n))])
    with membacking.attach(manager.runtime_dir) as memory:
        assert memory.read_plain(0x9000, fmt) == 2 * n


def test_plain_values_round_trip_in_their_byte_order(manager: RunningManager) -> None:
    cases: list[tuple[str, object]] = [
        ("B", 0xFE),
        ("b", -2),
        ("<H", 0x1234),
        (">H", 0x1234),
        ("<h", -300),
        ("<I", 0x12345678),
        (">i", -5),
        ("<Q", 0x1122334455667788),
        (">Q", 0x1122334455667788),
        ("=q", -(1 << 62)),
        ("@L", 7),
        ("<d", 1.5),
        (">f", -2.5),
        ("?", True),
        ("<e", 0.5),
        ("<HH", (1, 2)),
        ("<3H", (1, 2, 3)),
        ("8s", b"abcdefgh"),
    ]
    with membacking.attach(manager.runtime_dir) as memory:
        for fmt, value in cases:
            values = value if isinstance(value, tuple) else (value,)
            for gpa in (0x100, 0x101):  # aligned (one store) and not (a copy)
                memory.write_plain(gpa, fmt, value)
                assert memory.read_plain(gpa, fmt) == value, (fmt, gpa)
                assert memory.read_at(gpa, struct.calcsize(fmt)) == struct.pack(fmt, *values)
        memory.write_at(0x200, bytes(range(1, 9)))
        assert memory.read_plain(0x200, "<Q") == 0x0807060504030201
        assert memory.read_plain(0x200, ">Q") == 0x0102030405060708
        assert memory.read_plain(0x200, ">I") == 0x01020304


def test_atomic_operations(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_plain(0x300, "<Q", 5)
        assert memory.compare_exchange(0x300, "<Q", 4, 9) == (False, 5)
        assert memory.read_plain(0x300, "<Q") == 5  # not replaced
        assert memory.compare_exchange(0x300, "<Q", 5, 9) == (True, 5)
        assert memory.read_plain(0x300, "<Q") == 9
        assert memory.fetch_add(0x300, "<Q", 3) == 9
        assert memory.fetch_add(0x300, "<Q", -12) == 12
        assert memory.fetch_add(0x300, "<Q", -1) == 0
        assert memory.read_plain(0x300, "<Q") == (1 << 64) - 1  # wrapped like the hardware
        memory.write_plain(0x308, ">I", 0x01020304)
        assert memory.fetch_add(0x308, ">I", 0x100) == 0x01020304
        assert memory.read_at(0x308, 4) == b"\x01\x02\x04\x04"
        assert memory.compare_exchange(0x308, ">I", 0x01020404, 7) == (True, 0x01020404)
        assert memory.read_at(0x308, 4) == b"\x00\x00\x00\x07"
        memory.write_plain(0x310, "<i", -1)
        assert memory.fetch_add(0x310, "<i", 1) == -1
        assert memory.compare_exchange(0x310, "<i", 0, -7) == (True, 0)
        assert memory.read_plain(0x310, "<i") == -7
        assert memory.fetch_add(0x310, ">q", 1) == struct.unpack(">q", struct.pack("<iI", -7, 0))[0]
        # what they refuse, before touching memory
        with pytest.raises(ValueError, match="not aligned"):
            memory.fetch_add(0x304, "<Q", 1)
        with pytest.raises(ValueError, match="4- or 8-byte integer"):
            memory.fetch_add(0x300, "<H", 1)
        with pytest.raises(ValueError, match="4- or 8-byte integer"):
            memory.compare_exchange(0x300, "<d", 1.0, 2.0)
        with pytest.raises(ValueError, match="does not fit"):
            memory.fetch_add(0x300, "<I", 1 << 32)
        # a negative delta within the width's signed range subtracts (unsigned formats too)
        memory.write_plain(0x318, "<I", 5)
        assert memory.fetch_add(0x318, "<I", -1) == 5
        assert memory.fetch_add(0x318, "<I", -(1 << 31)) == 4
        assert memory.read_plain(0x318, "<I") == (4 - (1 << 31)) % (1 << 32)
        assert memory.fetch_add(0x318, "<I", (1 << 32) - 1) == (4 - (1 << 31)) % (1 << 32)
        for delta in (-(1 << 31) - 1, 1 << 32):
            with pytest.raises(ValueError, match=r"takes -2\*\*31 to 2\*\*32-1"):
                memory.fetch_add(0x318, "<I", delta)
        with pytest.raises(ValueError, match=r"takes -2\*\*63 to 2\*\*64-1"):
            memory.fetch_add(0x318, ">q", -(1 << 63) - 1)
        assert memory.read_plain(0x318, "<I") == (3 - (1 << 31)) % (1 << 32)
        with pytest.raises(TypeError, match="integer to add"):
            memory.fetch_add(0x300, "<I", 1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cannot be stored"):
            memory.compare_exchange(0x300, "<I", -1, 0)
        with pytest.raises(TypeError, match="must be integers"):
            memory.compare_exchange(True, "<I", 0, 0)  # type: ignore[arg-type]
        with pytest.raises(ReadOnlyError):
            memory.fetch_add(0xFFF00000, "<Q", 1)
        with pytest.raises(NoMappingError):
            memory.compare_exchange(0x10000000, "<Q", 0, 1)


def test_atomics_say_so_when_libatomic_is_missing(
    manager: RunningManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ffi, "_ATOMICS_LIBRARIES", ("libmembacking-absent.so.1",))
    monkeypatch.setattr(ffi.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(ffi, "_atomics", None)
    assert "libatomic" in (ffi.atomics_unavailable() or "")
    with membacking.attach(manager.runtime_dir) as memory:
        with pytest.raises(AtomicsUnavailableError, match="libatomic"):
            memory.fetch_add(0x300, "<Q", 1)
        with pytest.raises(AtomicsUnavailableError, match="libatomic"):
            memory.compare_exchange(0x300, "<Q", 0, 1)
        memory.write_plain(0x300, "<Q", 3)  # plain accesses need no library
        assert memory.read_plain(0x300, "<Q") == 3
    monkeypatch.setattr(ffi, "_atomics", None)  # loaded again for real by the next caller


def test_plain_accesses_after_detach_raise(manager: RunningManager) -> None:
    """The word views outlive the reservation's own view: an access after detach must be
    refused, not reach the unmapped address space."""
    memory = membacking.attach(manager.runtime_dir)
    for fmt in ("<Q", ">I", "B", "<3H"):
        memory.write_plain(0x400, fmt, (1, 2, 3) if fmt == "<3H" else 1)
    memory.detach()
    for call in (
        lambda: memory.read_plain(0x400, "<Q"),
        lambda: memory.write_plain(0x400, ">I", 1),
        lambda: memory.read_plain(0x400, "<3H"),
        lambda: memory.fetch_add(0x400, "<Q", 1),
        lambda: memory.compare_exchange(0x400, ">I", 0, 1),
        lambda: memory.read_at(0x400, 0),
        lambda: memory.read_plain(0x400, ">h"),  # a format first used now
        lambda: memory.write_plain(0x400, "<d", 1.0),
        lambda: memory.fetch_add(0x400, "<i", 1),
    ):
        with pytest.raises(membacking.DetachedError):
            call()
