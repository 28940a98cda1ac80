"""GuestMemory's accessors: bad arguments raise TypeError / ValueError / OutOfRangeError with a
clear message before anything is touched; a huge read of unmapped memory fails before it
allocates; a write that cannot be done completely (a hole, read-only memory) writes nothing."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import pytest

import membacking
from membacking import GuestMemory
from membacking.errors import NoMappingError, OutOfRangeError, ReadOnlyError

from conftest import RunningManager, region_toggled

GiB = 1 << 30
#: a 64 KiB region with a hole after it, and a read-only one right after that hole
REGION, REGION_SIZE = 0x10000000, 0x10000
HOLE_END = REGION + 2 * REGION_SIZE


@pytest.fixture
def memory(manager: RunningManager) -> Any:
    client = manager.client()
    client.add_region("dev", REGION, REGION_SIZE)
    client.add_region("devrom", HOLE_END, REGION_SIZE, readonly=True)
    client.add_region("dev2", HOLE_END - 0x1000, 0x1000)  # writable, right before devrom
    with membacking.attach(manager.runtime_dir) as mem:
        yield mem


def accessors(memory: GuestMemory, gpa: Any) -> dict[str, Callable[[], object]]:
    """Every accessor, at `gpa`."""
    buf = bytearray(4)
    return {
        "read_at": lambda: memory.read_at(gpa, 4),
        "read_into": lambda: memory.read_into(gpa, buf),
        "write_at": lambda: memory.write_at(gpa, b"abcd"),
        "fill_at": lambda: memory.fill_at(gpa, 1, 4),
        "read_plain": lambda: memory.read_plain(gpa, "<I"),
        "read_plain (several fields)": lambda: memory.read_plain(gpa, "<3H"),
        "write_plain": lambda: memory.write_plain(gpa, "<I", 1),
        "write_plain (several fields)": lambda: memory.write_plain(gpa, "<3H", (1, 2, 3)),
        "compare_exchange": lambda: memory.compare_exchange(gpa, "<I", 0, 1),
        "fetch_add": lambda: memory.fetch_add(gpa, "<I", 1),
        "ensure_mapped": lambda: memory.ensure_mapped(gpa, 4),
        "view": lambda: memory.view(gpa, 4).__enter__(),
    }


def test_addresses_and_lengths_that_are_not_integers_are_refused(memory: GuestMemory) -> None:
    memory.write_at(0, b"\x07" * 8)
    for gpa in (True, False, "0", 0.0, 1.5, None, b"\x00"):
        for name, call in accessors(memory, gpa).items():
            with pytest.raises(TypeError, match="guest address and length must be integers"):
                call()
            assert memory.read_at(0, 8) == b"\x07" * 8, name  # nothing written at 0 (False)
    for n in (True, "4", 4.0, b"4"):
        with pytest.raises(TypeError, match="must be integers"):
            memory.read_at(0, n)
        with pytest.raises(TypeError, match="must be integers"):
            memory.fill_at(0, 1, n)
        with pytest.raises(TypeError, match="must be integers"):
            memory.ensure_mapped(0, n)
        with pytest.raises(TypeError, match="must be integers"), memory.view(0, n):
            pass


def test_negative_and_outside_addresses(memory: GuestMemory) -> None:
    for call in accessors(memory, -8).values():
        with pytest.raises(ValueError, match="must not be negative"):
            call()
    space = memory.address_space
    for call in accessors(memory, space).values():
        with pytest.raises(OutOfRangeError, match="outside"):
            call()
    with pytest.raises(ValueError, match="must not be negative"):
        memory.read_at(0, -1)


def test_plain_values_that_do_not_fit_their_format(memory: GuestMemory) -> None:
    memory.write_at(0x100, b"\x07" * 8)
    for gpa in (0x100, 0x101):  # the one-store path and the copy path
        for fmt, value in (("<H", 70000), ("<Q", -1), ("b", 128), ("<I", 1 << 32), ("<HH", (1,))):
            with pytest.raises(ValueError, match="cannot be stored as"):
                memory.write_plain(gpa, fmt, value)
        for fmt, value in (("<Q", 1.5), ("<Q", "1"), ("<d", "x"), ("<I", None)):
            with pytest.raises(TypeError, match="cannot be stored as"):
                memory.write_plain(gpa, fmt, value)
        assert memory.read_at(0x100, 8) == b"\x07" * 8
    for fmt in ("<Z", "<Q<Q", "Q!", "0p", "", "<0s", "0Q"):
        with pytest.raises(ValueError, match="invalid struct format"):
            memory.read_plain(0x100, fmt)
        with pytest.raises(ValueError, match="invalid struct format"):
            memory.write_plain(0x100, fmt, 0)
    for fmt_arg in (b"<Q", 8, None, ["<Q"]):
        with pytest.raises(TypeError, match="struct format string"):
            memory.read_plain(0x100, fmt_arg)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="struct format string"):
            memory.write_plain(0x100, fmt_arg, 1)  # type: ignore[arg-type]


def test_buffers_bytes_and_flags(memory: GuestMemory) -> None:
    with pytest.raises(TypeError, match="writable buffer"):
        memory.read_into(0, b"1234")
    with pytest.raises(TypeError, match="bytes-like"):
        memory.read_into(0, [0, 0])
    with pytest.raises(TypeError, match="bytes-like"):
        memory.write_at(0, "text")
    with pytest.raises(TypeError, match="bytes-like"):
        memory.write_at(0, 5)
    with pytest.raises(TypeError, match="fill byte must be an integer"):
        memory.fill_at(0, True, 4)
    with pytest.raises(TypeError, match="fill byte must be an integer"):
        memory.fill_at(0, "a", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fill byte must be 0\.\.255"):
        memory.fill_at(0, 256, 4)
    # the byte comes before the length (the CLI's `mem fill` has them the other way round):
    # the error says which is which
    with pytest.raises(ValueError, match=r"takes the fill byte 2nd, the length n 3rd"):
        memory.fill_at(0x1000, 256, 4)
    assert memory.read_at(0x1000, 4) == bytes(4)
    with pytest.raises(TypeError, match="write must be True or False"):
        memory.ensure_mapped(0, 4, write=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="write must be True or False"):
        memory.view(0, 4, write="yes").__enter__()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a size"):
        memory.ensure_mapped(0)


def test_a_huge_read_of_unmapped_memory_fails_before_allocating(memory: GuestMemory) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(NoMappingError):
            memory.read_at(REGION + REGION_SIZE, GiB)  # the hole, and far beyond
        with pytest.raises(NoMappingError):
            memory.read_at(REGION, GiB)  # mapped at first, then not
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated for a read that failed"


def test_a_huge_read_plain_checks_its_range_before_allocating(memory: GuestMemory) -> None:
    """A struct format of hundreds of MB: the read fails on its range (unmapped, or outside
    the address space) before anything its size is allocated. Parsing it unpacked zeros of
    its size first: a "4000000000s" took 17 s and 3.8 GiB before NoMappingError."""
    tracemalloc.start()
    try:
        with pytest.raises(NoMappingError):
            memory.read_plain(REGION + REGION_SIZE, "300000000s")  # the hole
        with pytest.raises(NoMappingError):
            memory.read_plain(REGION, "30000000Q")  # mapped at first, then not
        with pytest.raises(OutOfRangeError):
            memory.read_plain(memory.address_space - 4096, "200000000s")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated for a read that failed"
    assert memory.read_plain(REGION, "2s3x") == memory.read_at(REGION, 2)  # small formats


def test_a_huge_write_plain_checks_its_range_before_packing(
    manager: RunningManager, memory: GuestMemory
) -> None:
    """A struct format of hundreds of MB: the write fails on its range (unmapped, read-only
    beyond, or outside the address space) before its value is packed to the format's size,
    and nothing is written. It packed first: 300 MB allocated for a write that failed."""
    before = memory.read_at(REGION, 8)
    tracemalloc.start()
    try:
        with pytest.raises(NoMappingError):
            memory.write_plain(REGION + REGION_SIZE, "300000000s", b"x")  # the hole
        with pytest.raises(NoMappingError):
            memory.write_plain(REGION, "300000000s", b"xyz")  # mapped at first, then not
        with pytest.raises(OutOfRangeError):
            memory.write_plain(memory.address_space - 4096, "200000000s", b"x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated for a write that failed"
    assert memory.read_at(REGION, 8) == before
    with pytest.raises(ReadOnlyError):  # past the hole: read-only
        memory.write_plain(HOLE_END, "200000s", b"x")
    manager.client().add_region("large", 0x20000000, 0x40000)
    memory.write_plain(0x20000000, "200000s", b"ab")  # a large value that fits: written
    assert memory.read_at(0x20000000, 3) == b"ab\0"


def test_a_huge_access_across_a_hole_maps_nothing_past_it(memory: GuestMemory) -> None:
    """An access fails at the first hole it reaches: the regions past the hole (and their
    VMAs) are not mapped for it. A read of 1 TiB from mapped memory across a hole mapped every
    region in the terabyte, 61,000 VMAs, and the mapper's later faults ran out of them."""
    for name, call in {
        "read_at": lambda: memory.read_at(REGION, 1 << 39),
        "ensure_mapped": lambda: memory.ensure_mapped(REGION, 1 << 39),
        "write_at": lambda: memory.write_at(REGION, bytes(4 * REGION_SIZE)),
    }.items():
        with pytest.raises(NoMappingError, match=f"{REGION + REGION_SIZE:#x}"):
            call()
        mapped = [rng for rng, _ in memory.mapped_ranges()]
        assert all(r.end <= REGION + REGION_SIZE for r in mapped), (name, mapped)
    assert memory.read_at(HOLE_END, 4) == bytes(4)  # past the hole: mapped when asked for


@pytest.mark.parametrize(
    "write",
    [
        lambda m, gpa, n: m.write_at(gpa, b"\xee" * n),
        lambda m, gpa, n: m.fill_at(gpa, 0xEE, n),
        lambda m, gpa, n: m.write_plain(gpa, f"<{n}B", (0xEE,) * n),
    ],
    ids=["write_at", "fill_at", "write_plain"],
)
def test_a_write_into_a_hole_or_read_only_memory_writes_nothing(
    memory: GuestMemory, write: Callable[[GuestMemory, int, int], None]
) -> None:
    end = REGION + REGION_SIZE
    memory.fill_at(end - 0x2000, 0x11, 0x2000)
    with pytest.raises(NoMappingError, match=f"{end:#x}"):
        write(memory, end - 16, 32)  # 16 mapped bytes, then the hole
    with pytest.raises(NoMappingError):
        write(memory, end - 0x1800, 0x2000)  # across a page into the hole
    assert memory.read_at(end - 0x2000, 0x2000) == b"\x11" * 0x2000
    memory.fill_at(HOLE_END - 0x1000, 0x22, 0x1000)
    with pytest.raises(ReadOnlyError):
        write(memory, HOLE_END - 8, 16)  # 8 writable bytes, then read-only ones
    assert memory.read_at(HOLE_END - 0x1000, 0x1000) == b"\x22" * 0x1000
    write(memory, end - 16, 16)  # what fits is written
    assert memory.read_at(end - 16, 16) == b"\xee" * 16


def test_reads_and_writes_spanning_regions(memory: GuestMemory) -> None:
    memory.write_at(HOLE_END - 4, b"abcd")  # dev2's end
    data = memory.read_at(HOLE_END - 4, 8)  # dev2's end and devrom's start
    assert data == b"abcd" + bytes(4)
    buf = bytearray(8)
    memory.read_into(HOLE_END - 4, buf)
    assert bytes(buf) == data
    with memory.view(HOLE_END - 4, 8) as view:
        assert view.readonly and bytes(view) == data
    with pytest.raises(ReadOnlyError), memory.view(HOLE_END - 4, 8, write=True):
        pass


def test_a_write_racing_a_removal_is_all_or_nothing(manager: RunningManager) -> None:
    """A write across two regions while the second is removed and added again, over and over:
    each write either lands completely or raises having changed nothing (the first region's
    part, which nobody else writes, shows which)."""
    client = manager.client()
    first, second = 0x20000000, 0x20010000
    client.add_region("first", first, 0x10000)
    client.add_region("second", second, 0x10000)
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_at(second - 16, bytes(16))
        landed = failed = 0
        with region_toggled(manager.runtime_dir, "second", second, 0x10000) as toggles:
            expected = bytes(16)
            deadline = time.monotonic() + 1.0
            k = 0
            while time.monotonic() < deadline or not (landed and failed):
                k = k % 255 + 1
                try:
                    memory.write_at(second - 16, bytes([k]) * 32)
                    expected = bytes([k]) * 16
                    landed += 1
                except NoMappingError:
                    failed += 1
                assert memory.read_at(second - 16, 16) == expected, (landed, failed)
                if time.monotonic() > deadline + 10:
                    break
    assert landed and failed and toggles[0], (landed, failed, toggles)


def test_a_read_into_across_a_hole_leaves_the_buffer_alone(memory: GuestMemory) -> None:
    end = REGION + REGION_SIZE
    memory.fill_at(end - 16, 0x33, 16)
    buf = bytearray(b"\x55" * 32)
    with pytest.raises(NoMappingError):
        memory.read_into(end - 16, buf)
    assert buf == b"\x55" * 32
    memory.read_into(end - 16, memoryview(buf)[:16])
    assert buf == b"\x33" * 16 + b"\x55" * 16


def test_a_view_without_write_is_read_only_on_writable_memory(memory: GuestMemory) -> None:
    """A device model asking for a view without `write` gets a read-only one, whatever the
    memory is; `write=True` gives a writable view (and insists on writable memory)."""
    with memory.view(REGION, 8) as view:
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        with pytest.raises(TypeError):
            view[:4] = b"abcd"
    assert memory.read_at(REGION, 8) == bytes(8)
    with memory.view(REGION, 8, write=True) as view:
        assert not view.readonly
        view[:4] = b"abcd"
    assert memory.read_at(REGION, 4) == b"abcd"


def test_find_takes_bytes_like_patterns_only(memory: GuestMemory) -> None:
    memory.write_at(REGION + 0x10, b"abc")
    for pattern in ("abc", 3, None, ["a"]):
        with pytest.raises(TypeError, match="the pattern to find must be bytes-like") as exc:
            memory.find(pattern, REGION, 100)  # type: ignore[arg-type]
        assert ("encode" in str(exc.value)) == isinstance(pattern, str)
        with pytest.raises(TypeError, match="the pattern to find must be bytes-like"):
            memory.find_all(pattern, REGION, 100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        memory.find_all(b"", REGION, 100)  # refused at once, not at the first next()
    for pattern in (b"abc", bytearray(b"abc"), memoryview(b"xabc")[1:]):
        assert memory.find(pattern, REGION, 100) == REGION + 0x10


def test_bools_are_not_values_of_integer_formats(memory: GuestMemory) -> None:
    """As fetch_add refuses True, so do write_plain and compare_exchange, on every path;
    a '?' field still takes a bool."""
    memory.write_at(0x2000, b"\x07" * 16)
    for gpa in (0x2000, 0x2001):  # the one-store path and the copy path
        for fmt, value in (
            ("<Q", True),
            ("<I", False),
            (">I", True),
            ("B", True),
            ("<d", True),
            ("<HH", (1, True)),
            ("<II", (False, 2)),
            ("<3H", (1, 2, True)),
        ):
            with pytest.raises(TypeError, match="a bool is not a number"):
                memory.write_plain(gpa, fmt, value)
        assert memory.read_at(0x2000, 16) == b"\x07" * 16
    for expected, new in ((True, 1), (7, False)):
        with pytest.raises(TypeError, match="a bool is not a number"):
            memory.compare_exchange(0x2000, "<I", expected, new)
    with pytest.raises(TypeError, match="integer to add"):
        memory.fetch_add(0x2000, "<I", True)
    assert memory.read_at(0x2000, 16) == b"\x07" * 16
    memory.write_plain(0x2000, "?", True)
    memory.write_plain(0x2002, "<?H", (False, 5))
    assert memory.read_plain(0x2000, "?") is True
    assert memory.read_plain(0x2002, "<?H") == (False, 5)


class At(IntEnum):
    """Guest addresses of an int subclass: every accessor takes them as the ints they are."""

    WORD = 0x3000  # aligned to every word size: the one-load / one-store paths
    ODD = 0x3001  # aligned to none: the byte-copy paths
    PRIVATE = 0x30000000  # private RAM (`private_memory`)


class Num(IntEnum):
    """Lengths, fill bytes and deltas of an int subclass."""

    FOUR = 4
    FILL = 0x5A
    PAGE = 0x1000


def _read_into(m: GuestMemory, gpa: Any, n: Any) -> bytes:
    buf = bytearray(n)
    m.read_into(gpa, buf)
    return bytes(buf)


def _view(m: GuestMemory, gpa: Any, n: Any, write: bool = False) -> bytes:
    with m.view(gpa, n, write=write) as view:
        if write:
            view[:] = b"wxyz"
        return bytes(view)


#: accessor -> a call of it at `gpa` with length `n` (4) and, where it takes one, the fill
#: byte or delta `k`, returning what it gave back
BY_ADDRESS: dict[str, Callable[[GuestMemory, Any, Any, Any], object]] = {
    "read_at": lambda m, gpa, n, k: m.read_at(gpa, n),
    "read_into": lambda m, gpa, n, k: _read_into(m, gpa, n),
    "write_at": lambda m, gpa, n, k: m.write_at(gpa, b"abcd"),
    "fill_at": lambda m, gpa, n, k: m.fill_at(gpa, k, n),
    "read_plain": lambda m, gpa, n, k: m.read_plain(gpa, "<I"),
    "read_plain (bytes)": lambda m, gpa, n, k: m.read_plain(gpa, "<3B"),
    "write_plain": lambda m, gpa, n, k: m.write_plain(gpa, "<I", 0x11223344),
    "write_plain (bytes)": lambda m, gpa, n, k: m.write_plain(gpa, "<3B", (7, 8, 9)),
    "compare_exchange": lambda m, gpa, n, k: m.compare_exchange(gpa, "<I", 0x04030201, 9),
    "fetch_add": lambda m, gpa, n, k: m.fetch_add(gpa, "<I", k),
    "ensure_mapped": lambda m, gpa, n, k: m.ensure_mapped(gpa, n),
    "view": lambda m, gpa, n, k: _view(m, gpa, n),
    "view (write)": lambda m, gpa, n, k: _view(m, gpa, n, write=True),
    "find": lambda m, gpa, n, k: m.find(b"\x03\x04", gpa, n),
    "find_all": lambda m, gpa, n, k: list(m.find_all(b"\x03\x04", gpa, n)),
}


@pytest.mark.parametrize(
    ("accessor", "where"),
    [pytest.param(name, At.WORD, id=f"{name}-aligned") for name in BY_ADDRESS]
    + [
        pytest.param(name, At.ODD, id=f"{name}-unaligned")
        for name in BY_ADDRESS
        if name not in ("compare_exchange", "fetch_add")
    ],
)
def test_an_int_subclass_is_an_address(memory: GuestMemory, accessor: str, where: At) -> None:
    """An IntEnum address (and length, fill byte, delta) reads and writes the same bytes as
    the plain int; a bool is still no address."""
    call = BY_ADDRESS[accessor]
    seen = []
    for gpa, n, k in ((int(where), 4, 0x5A), (where, Num.FOUR, Num.FILL)):
        memory.write_at(At.WORD.value, bytes(range(1, 17)))
        seen.append((call(memory, gpa, n, k), memory.read_at(At.WORD.value, 16)))
    assert seen[0] == seen[1]
    for refused in (False, True):
        with pytest.raises(TypeError, match="guest address and length must be integers"):
            call(memory, refused, 4, 0x5A)


@pytest.fixture
def private_memory(start_manager: Callable[..., RunningManager]) -> Any:
    running = start_manager()
    running.client().add_region("pram", At.PRIVATE.value, 1 << 20, private=True)
    with membacking.attach(running.runtime_dir) as mem:
        yield mem


@pytest.mark.parametrize("accessor", ["commit", "decommit", "madvise_hugepage"])
def test_an_int_subclass_is_an_address_of_private_ram(
    private_memory: GuestMemory, accessor: str
) -> None:
    call = getattr(private_memory, accessor)
    seen = []
    for gpa, n in ((int(At.PRIVATE), 0x1000), (At.PRIVATE, Num.PAGE)):
        private_memory.write_at(At.PRIVATE.value, b"abcd")
        seen.append((call(gpa, n), private_memory.read_at(At.PRIVATE.value, 4)))
    assert seen[0] == seen[1]
    with pytest.raises(TypeError, match="guest address and length must be integers"):
        call(True, 0x1000)
