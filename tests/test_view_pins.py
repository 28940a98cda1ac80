"""ViewPins and lent() alone: a view whose slice outlived its block keeps its range pinned exactly
as long as the slice lives, whatever holds the slice (a cycle the collector frees included)."""

from __future__ import annotations

import ctypes
import gc
import weakref
from typing import Any, cast

from membacking.mapper.views import ViewPins, lent
from membacking.protocol.ranges import MemoryRange


def _exporter() -> ctypes.Array[ctypes.c_char]:
    return (ctypes.c_char * 8192)()


class _Holder:
    """Holds a slice in a cycle only the collector frees; its finalizer keeps the slice."""

    def __init__(self, piece: memoryview, saved: list[memoryview]) -> None:
        self.piece, self.me, self.saved = piece, self, saved

    def __del__(self) -> None:
        self.saved.append(self.piece)


def _released_only_with(pins: ViewPins, slices: list[memoryview]) -> None:
    """The pin of 0x1000-0x3000 holds while `slices` do, and ends with the last of them."""
    pins.release_escaped()
    assert pins.pinned(MemoryRange(0x2000, 0x3000)), "a kept slice lost its pin"
    for piece in slices:
        piece.release()
    slices.clear()
    pins.release_escaped()
    assert not pins


def test_an_escaped_slice_keeps_the_pin_until_it_is_released() -> None:
    pins = ViewPins()
    view_id = pins.pin(0x1000, 0x3000, False)
    exporter = _exporter()
    kept = [memoryview(exporter).cast("B")[16:32]]  # a slice that outlives the block
    assert pins.end(view_id, exporter) == (0x1000, 0x3000)
    del exporter
    _released_only_with(pins, kept)


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


def test_a_slice_a_collected_cycle_still_holds_keeps_the_pin() -> None:
    """The cyclic collector clears weak references to what it collects before it runs the
    finalizers, which may still read (or keep) a slice: the pin must outlast the slice itself,
    not a weak reference to its exporter."""
    pins = ViewPins()
    view_id = pins.pin(0x1000, 0x3000, False)
    saved: list[memoryview] = []
    exporter = _exporter()
    _Holder(memoryview(exporter).cast("B")[16:32], saved)
    assert pins.end(view_id, exporter) == (0x1000, 0x3000)
    del exporter
    gc.collect()
    assert saved
    _released_only_with(pins, saved)


class _Unpinner:
    """What lent() asks of its mapper: the end of a view's pin (the real one takes the lock)."""

    def __init__(self, pins: ViewPins) -> None:
        self.pins = pins

    def unpin(self, view_id: int, escaped: object = None) -> None:
        self.pins.end(view_id, escaped)


def test_lent_keeps_the_pin_of_a_slice_held_by_a_collected_cycle() -> None:
    pins = ViewPins()
    view_id = pins.pin(0x1000, 0x3000, False)
    saved: list[memoryview] = []

    def block() -> None:  # (so that no name of the test refers to the view after it)
        with lent(cast(Any, _Unpinner(pins)), view_id, _exporter(), False) as view:
            _Holder(view[0:16], saved)

    block()
    gc.collect()
    assert saved and bytes(saved[0][:4]) == b"\0\0\0\0"
    _released_only_with(pins, saved)


def test_lent_ends_the_pin_of_a_view_nothing_kept() -> None:
    pins = ViewPins()
    view_id = pins.pin(0x1000, 0x3000, True)
    with lent(cast(Any, _Unpinner(pins)), view_id, _exporter(), True) as view:
        view[0:4] = b"abcd"
        assert bytes(view[1:3]) == b"bc"  # (a temporary slice, gone at once)
    assert not pins
