"""ViewPins alone: a view whose slice outlived its block keeps its range pinned exactly as long
as the slice lives, told by the exporter's life (a weak reference), not by reference counts."""

from __future__ import annotations

import ctypes
import weakref

from membacking.mapper.views import ViewPins
from membacking.protocol.ranges import MemoryRange


def _exporter() -> ctypes.Array[ctypes.c_char]:
    return (ctypes.c_char * 8192)()


def test_an_escaped_slice_keeps_the_pin_until_it_is_released() -> None:
    pins = ViewPins()
    view_id = pins.pin(0x1000, 0x3000, False)
    exporter = _exporter()
    kept = memoryview(exporter).cast("B")[16:32]  # a slice that outlives the block
    ref = weakref.ref(exporter)
    del exporter
    assert ref() is not None
    assert pins.end(view_id, ref) == (0x1000, 0x3000)
    pins.release_escaped()
    assert pins.pinned(MemoryRange(0x2000, 0x3000))  # the slice still reaches the memory
    kept.release()
    pins.release_escaped()
    assert not pins.pinned(MemoryRange(0x2000, 0x3000))
    assert not pins


def test_a_view_without_escaped_slices_ends_its_pin_at_once() -> None:
    pins = ViewPins()
    view_id = pins.pin(0x1000, 0x3000, True)
    assert pins.pinned(MemoryRange(0x1000, 0x2000), for_writing=True)
    assert pins.end(view_id) is None
    assert not pins.pinned(MemoryRange(0x1000, 0x2000))


def test_a_slice_of_a_slice_keeps_the_exporter_alive_too() -> None:
    exporter = _exporter()
    ref = weakref.ref(exporter)
    outer = memoryview(exporter).cast("B")
    inner = outer[100:200][10:20]
    outer.release()
    del exporter
    assert ref() is not None
    inner.release()
    assert ref() is None
