"""The libc layer (`membacking.ffi.Reservation`), including the four private-RAM tests at the end
of OpenVMM's va_mapper.rs, ported: alloc/write/read, decommit reads zeros, recommit after
decommit, idempotent commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from membacking.ffi import (
    MADV_DONTDUMP,
    MADV_DONTNEED,
    MADV_POPULATE_WRITE,
    PAGE_SIZE,
    Reservation,
)


@pytest.fixture
def mapping() -> Reservation:
    reservation = Reservation(4 * PAGE_SIZE)
    yield reservation  # type: ignore[misc]
    reservation.release()


def commit(mapping: Reservation, offset: int, size: int) -> None:
    mapping.madvise(offset, size, MADV_POPULATE_WRITE)


def test_private_ram_alloc_write_read(mapping: Reservation) -> None:
    mapping.map_anon(0, 2 * PAGE_SIZE, writable=True)
    view = mapping.buffer()
    view[0:128] = b"\xab" * 128
    assert bytes(view[0:128]) == b"\xab" * 128
    assert bytes(view[PAGE_SIZE : PAGE_SIZE + 64]) == bytes(64)  # untouched committed memory
    view.release()


def test_private_ram_decommit_zeros(mapping: Reservation) -> None:
    mapping.map_anon(0, 2 * PAGE_SIZE, writable=True)
    view = mapping.buffer()
    pattern = b"\xab" * 64
    view[0:64] = pattern
    view[PAGE_SIZE : PAGE_SIZE + 64] = pattern
    mapping.madvise(0, PAGE_SIZE, MADV_DONTNEED)
    assert bytes(view[0:64]) == bytes(64)  # decommitted page reads back as zeros
    assert bytes(view[PAGE_SIZE : PAGE_SIZE + 64]) == pattern  # the second page keeps its data
    view.release()


def test_private_ram_recommit_after_decommit(mapping: Reservation) -> None:
    mapping.map_anon(0, PAGE_SIZE, writable=True)
    view = mapping.buffer()
    view[0:64] = b"\xcd" * 64
    mapping.madvise(0, PAGE_SIZE, MADV_DONTNEED)
    commit(mapping, 0, PAGE_SIZE)
    assert bytes(view[0:64]) == bytes(64)  # the old data is gone
    view[0:64] = b"\xef" * 64
    assert bytes(view[0:64]) == b"\xef" * 64
    view.release()


def test_private_ram_commit_idempotent(mapping: Reservation) -> None:
    mapping.map_anon(0, 2 * PAGE_SIZE, writable=True)
    commit(mapping, 0, 2 * PAGE_SIZE)
    commit(mapping, 0, PAGE_SIZE)
    view = mapping.buffer()
    view[0:64] = b"\xef" * 64
    assert bytes(view[0:64]) == b"\xef" * 64
    view.release()


def maps_line(mapping: Reservation, offset: int) -> str:
    """The /proc/self/maps line of the VMA containing `offset` (VMAs merge and split)."""
    addr = mapping.base + offset
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line
    raise AssertionError(f"{addr:#x} is not mapped at all")


def test_map_fd_then_unmap_keeps_the_reservation(mapping: Reservation) -> None:
    fd = os.memfd_create("ffi-test")
    try:
        os.ftruncate(fd, 2 * PAGE_SIZE)
        os.pwrite(fd, b"memfd!", PAGE_SIZE)
        mapping.map_fd(PAGE_SIZE, PAGE_SIZE, fd, PAGE_SIZE, writable=False)
        mapping.madvise(PAGE_SIZE, PAGE_SIZE, MADV_DONTDUMP)
        view = mapping.buffer()
        assert bytes(view[PAGE_SIZE : PAGE_SIZE + 6]) == b"memfd!"
        assert "memfd:ffi-test" in maps_line(mapping, PAGE_SIZE)
        assert maps_line(mapping, PAGE_SIZE).split()[1] == "r--s"
        mapping.unmap(PAGE_SIZE, PAGE_SIZE)
        line = maps_line(mapping, PAGE_SIZE)
        assert "memfd" not in line and line.split()[1] == "---p"  # placeholder, still reserved
        view.release()
    finally:
        os.close(fd)


def test_ranges_outside_the_reservation_are_refused(mapping: Reservation) -> None:
    for offset, size in (
        (-PAGE_SIZE, PAGE_SIZE),
        (0, 5 * PAGE_SIZE),
        (100, PAGE_SIZE),
        (0, 0),
        (4 * PAGE_SIZE, PAGE_SIZE),
    ):
        with pytest.raises(ValueError, match="not a page-aligned part"):
            mapping.unmap(offset, size)
    with pytest.raises(ValueError, match="outside the reservation"):
        mapping.fill(4 * PAGE_SIZE - 1, 2, 0)
    with pytest.raises(OSError):
        mapping.map_fd(0, PAGE_SIZE, 987654, 0, writable=True)  # not an fd


def test_vma_naming_degrades(mapping: Reservation) -> None:
    named = mapping.set_name(0, PAGE_SIZE, "guest")
    assert isinstance(named, bool)
    if not named:
        pytest.skip("this kernel cannot name anonymous VMAs (PR_SET_VMA_ANON_NAME)")
    assert "[anon:guest]" in maps_line(mapping, 0)


def test_release_is_idempotent() -> None:
    reservation = Reservation(PAGE_SIZE)
    reservation.release()
    reservation.release()
    with pytest.raises(ValueError, match="released"):
        reservation.buffer()
