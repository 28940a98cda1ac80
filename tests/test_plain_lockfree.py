"""The lock-free fast path of aligned plain values: the views of words it uses are retired by
every change of the mappings before that change touches a page (`Reservation.words`), a retired
view sends the access to the general path instead of to the old pages, and a hot word is read
and written without waiting for the access lock."""

from __future__ import annotations

import os
import threading
import time

import pytest

import membacking
from membacking.errors import NoMappingError
from membacking.ffi import PAGE_SIZE, Reservation

from conftest import RunningManager, region_toggled

REGION, OTHER = 0x10000000, 0x10100000


def test_every_change_of_the_mappings_retires_the_views_of_words() -> None:
    reservation = Reservation(4 * PAGE_SIZE)
    fd = os.memfd_create("words")
    try:
        os.ftruncate(fd, PAGE_SIZE)
        reservation.map_anon(0, PAGE_SIZE, True)
        changes = [
            lambda: reservation.map_anon(PAGE_SIZE, PAGE_SIZE, True),  # elsewhere: still retires
            lambda: reservation.map_fd(2 * PAGE_SIZE, PAGE_SIZE, fd, 0, True),
            lambda: reservation.unmap(2 * PAGE_SIZE, PAGE_SIZE),
            reservation.release,
        ]
        for change in changes:
            if change is not reservation.release:
                words, byte = reservation.words("Q"), reservation.words("B")
                assert reservation.words("Q") is words  # one view per code until a change
                words[1] = 0x1122334455667788
                assert words[1] == 0x1122334455667788 and byte[8] == 0x88
            else:
                words = reservation.words("Q")
            change()
            with pytest.raises(ValueError, match="released"):
                words[1]
        with pytest.raises(ValueError, match="released"):
            reservation.words("Q")
    finally:
        reservation.release()
        os.close(fd)


@pytest.fixture
def memory(manager: RunningManager) -> object:
    client = manager.client()
    client.add_region("words", REGION, 0x10000)
    client.add_region("other", OTHER, 0x10000)
    with membacking.attach(manager.runtime_dir) as mem:
        yield mem


def test_a_hot_word_is_read_and_written_while_the_access_lock_is_held(
    memory: membacking.GuestMemory,
) -> None:
    memory.write_plain(REGION + 8, "<Q", 5)
    results: list[object] = []

    def access() -> None:
        memory.write_plain(REGION + 8, "<Q", 6)
        results.append(memory.read_plain(REGION + 8, "<Q"))
        results.append(memory.read_plain(REGION + 8, "<I"))

    lock = memory._mapper.lock
    with lock:
        thread = threading.Thread(target=access)
        thread.start()
        thread.join(10)
        done = not thread.is_alive()
    thread.join(10)
    assert done, "the fast path waited for the access lock"
    assert results == [6, 6]


def test_an_access_with_a_retired_view_takes_the_general_path(
    memory: membacking.GuestMemory,
) -> None:
    memory.write_plain(REGION, "<Q", 7)
    memory.write_plain(REGION + 16, ">I", 0xA1B2C3D4)
    retired = memory._plain["<Q"][0]
    hot = list(memory._hot)
    memory.read_plain(OTHER, "<Q")  # faults OTHER in: the Map retires every view of words
    assert retired is not None
    with pytest.raises(ValueError):
        retired[0]
    # the hot chunk as before the fault, so the fast path's check passes with the retired view
    memory._hot[0:3] = hot[0:3]
    assert memory.read_plain(REGION, "<Q") == 7
    memory._hot[0:3] = hot[0:3]
    memory.write_plain(REGION, "<Q", 8)
    memory._hot[0:3] = hot[0:3]
    assert memory.read_plain(REGION + 16, ">I") == 0xA1B2C3D4
    assert memory.read_at(REGION, 8) == (8).to_bytes(8, "little")
    assert memory._plain["<Q"][0] is not retired  # the general path cached the current view


def test_plain_accesses_racing_a_removal_read_only_what_was_written(
    manager: RunningManager,
) -> None:
    """Aligned words read and written while their region is removed and added again, over and
    over: each access works or raises NoMappingError, and a read finds what this thread last
    wrote since the region came back (or zero)."""
    manager.client().add_region("words", REGION, 0x10000)
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_plain(REGION, "<Q", 1)
        done = failed = 0
        with region_toggled(manager.runtime_dir, "words", REGION, 0x10000) as toggles:
            deadline = time.monotonic() + 1.0
            k = 0
            while time.monotonic() < deadline or not (done and failed):
                k += 1
                try:
                    memory.write_plain(REGION, "<Q", k)
                    for _ in range(50):
                        assert memory.read_plain(REGION, "<Q") in (k, 0)
                        assert memory.read_plain(REGION + 4, "<I") in (0, k >> 32)
                    done += 1
                except NoMappingError:
                    failed += 1
                if time.monotonic() > deadline + 10:
                    break
    assert done and failed and toggles[0], (done, failed, toggles)
