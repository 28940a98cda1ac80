"""Pins at the state-machine level: regions lent to a VM cannot be removed, disabled, moved,
re-mapped or covered while the lending mapper is attached; everything is allowed once it is gone.
Pins taken up from a journal hold while their process runs, until the lender pins again."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import zlib
from typing import Any

import msgpack
import pytest
from test_manager_state import MiB, RecordingStore, attach

from membacking.manager import journal
from membacking.manager.awaited import AwaitedMappers
from membacking.manager.journal import MapperRecord, PinRecord, Snapshot
from membacking.manager.pins import Pin, Pins, process_start
from membacking.manager.state import ManagerState
from membacking.protocol import messages as m
from membacking.protocol.messages import Channel


@pytest.fixture
def state() -> ManagerState:
    return ManagerState(RecordingStore(), address_space=1 << 32, unmap_timeout=5.0)


def control(state: ManagerState, op: str, **args: Any) -> m.Message:
    """Run one control request; the reply (or error) the client gets, if it came at once."""
    out = state.handle_control(b"client", m.ControlRequest(op, args))
    replies = [e.msg for e in out if getattr(e, "channel", None) == Channel.CONTROL]
    assert len(replies) == 1, out
    return replies[0]


def pinned_vm(state: ManagerState) -> int:
    control(state, "add_region", name="ram", gpa=0, size=64 * MiB)
    control(state, "add_region", name="other", gpa=128 * MiB, size=16 * MiB)
    mid, _, _ = attach(state, "qemu-vm1")
    reply = control(state, "pin_regions", mapper=mid, label="VM 'vm1'", pid=777, regions="ram")
    assert reply == m.ControlReply({"label": "VM 'vm1'", "pid": 777, "regions": ["ram"]})
    return mid


@pytest.mark.parametrize(
    ("op", "args", "action"),
    [
        ("remove_region", {"name": "ram"}, "removed"),
        ("disable_region", {"name": "ram"}, "disabled"),
        ("move_region", {"name": "ram", "gpa": 256 * MiB}, "moved"),
        ("unmap_range", {"name": "ram", "offset": 0, "size": MiB}, "re-mapped"),
        ("map_range", {"name": "ram", "offset": 0, "size": MiB}, "re-mapped"),
        (
            "add_region",
            {"name": "cover", "gpa": 0, "size": 64 * MiB, "priority": 1},
            "covered by region 'cover'",
        ),
    ],
)
def test_changes_to_a_pinned_region_are_refused_naming_the_vm(
    state: ManagerState, op: str, args: dict[str, Any], action: str
) -> None:
    pinned_vm(state)
    reply = control(state, op, **args)
    assert isinstance(reply, m.Error), reply
    assert reply.code == "pinned"
    assert "VM 'vm1' (pid 777" in reply.message and action in reply.message
    assert state.regions["ram"].active and state.regions["ram"].gpa == 0
    assert "cover" not in state.regions


def test_unpinned_regions_stay_free(state: ManagerState) -> None:
    pinned_vm(state)
    assert isinstance(control(state, "disable_region", name="other"), m.ControlReply)
    # a newer region of equal priority on the same range hides nothing: the older one wins
    assert isinstance(
        control(state, "add_region", name="same", gpa=0, size=64 * MiB), m.ControlReply
    )
    assert state.regions["ram"].active and not state.regions["same"].active


def test_pins_go_with_their_mapper(state: ManagerState) -> None:
    mid = pinned_vm(state)
    listed = control(state, "mappers")
    assert isinstance(listed, m.ControlReply)
    assert listed.result[0]["pin"] == {"label": "VM 'vm1'", "pid": 777, "regions": ["ram"]}
    state.mapper_gone(mid, "detached")
    reply = control(state, "remove_region", name="ram")
    assert isinstance(reply, m.ControlReply), reply
    assert "ram" not in state.regions


def test_enabling_a_region_that_would_hide_a_pinned_one_is_refused(state: ManagerState) -> None:
    control(state, "add_region", name="old", gpa=0, size=64 * MiB, disabled=True)
    pinned_vm(state)
    reply = control(state, "enable_region", name="old")  # older, equal priority: it would win
    assert isinstance(reply, m.Error) and reply.code == "pinned", reply
    assert "covered by region 'old'" in reply.message


@pytest.mark.parametrize(
    ("setup", "op", "args"),
    [
        # enabled at another GPA, over the lent region (which it would hide: higher priority)
        (
            {"name": "high", "gpa": 512 * MiB, "size": 64 * MiB, "priority": 5, "disabled": True},
            "enable_region",
            {"name": "high", "gpa": 0},
        ),
        # moved over it
        (
            {"name": "high", "gpa": 512 * MiB, "size": 64 * MiB, "priority": 5},
            "move_region",
            {"name": "high", "gpa": 0},
        ),
    ],
)
def test_a_region_placed_over_a_pinned_one_is_refused(
    state: ManagerState, setup: dict[str, Any], op: str, args: dict[str, Any]
) -> None:
    """Enabling a region at a new GPA, or moving one, so that it would hide a lent region is
    refused as adding one there is: the VM would run on memory mappers no longer see there."""
    control(state, "add_region", **setup)
    pinned_vm(state)
    reply = control(state, op, **args)
    assert isinstance(reply, m.Error) and reply.code == "pinned", reply
    assert "covered by region 'high'" in reply.message and "VM 'vm1'" in reply.message
    assert state.regions["ram"].active and state.regions["high"].gpa == 512 * MiB
    # a newer region of the lent one's priority hides nothing there: allowed
    added = control(state, "add_region", name="low", gpa=768 * MiB, size=64 * MiB)
    assert isinstance(added, m.ControlReply), added
    assert isinstance(control(state, "move_region", name="low", gpa=0), m.ControlReply)
    assert state.regions["ram"].active


def test_a_second_lender_of_a_pinned_region_is_refused(state: ManagerState) -> None:
    """A second VM on regions another VM runs on would overwrite its RAM: refused, naming the
    first; the first lender pinning again (after a restart, or its QEMU's pid) is not."""
    first = pinned_vm(state)
    second, _, _ = attach(state, "qemu-vm2")
    reply = control(state, "pin_regions", mapper=second, label="VM 'vm2'", pid=778, regions="ram")
    assert isinstance(reply, m.Error) and reply.code == "pinned", reply
    assert "region 'ram' is lent to VM 'vm1' (pid 777) already" in reply.message
    assert state.pins.of(second) is None
    other = control(state, "pin_regions", mapper=second, label="VM 'vm2'", pid=778, regions="other")
    assert isinstance(other, m.ControlReply), other  # regions of its own: fine
    again = control(state, "pin_regions", mapper=first, label="VM 'vm1'", pid=779, regions="ram")
    assert isinstance(again, m.ControlReply), again


def test_an_empty_pin_unpins(state: ManagerState) -> None:
    mid = pinned_vm(state)
    control(state, "pin_regions", mapper=mid, label="VM 'vm1'", pid=777, regions="")
    assert isinstance(control(state, "disable_region", name="ram"), m.ControlReply)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"mapper": 99, "label": "x", "pid": 1, "regions": "ram"}, "not-found"),
        ({"mapper": 1, "label": "x", "pid": 1, "regions": "ram,nope"}, "not-found"),
        ({"mapper": 1, "label": "x", "pid": 1, "regions": 3}, "bad-request"),
        ({"mapper": 1, "label": "", "pid": 1, "regions": "ram"}, "bad-request"),
        ({"mapper": 1, "label": "x\n", "pid": 1, "regions": "ram"}, "bad-request"),
        ({"mapper": 1, "label": "x", "regions": "ram"}, "bad-request"),
    ],
)
def test_bad_pin_requests_are_refused(state: ManagerState, args: dict[str, Any], code: str) -> None:
    control(state, "add_region", name="ram", gpa=0, size=64 * MiB)
    attach(state, "qemu-vm1")
    reply = control(state, "pin_regions", **args)
    assert isinstance(reply, m.Error) and reply.code == code, reply
    assert state.pins.of(1) is None


class Processes:
    """Stand-in for /proc in pure-logic tests: pid -> start time of the running processes."""

    def __init__(self, **running: int) -> None:
        self.running = {int(k[1:]): v for k, v in running.items()}

    def __call__(self, pid: int) -> int | None:
        return self.running.get(pid)


def journaled_pin(pid: int = 777, started: int = 5000, regions: str = "ram") -> Pin:
    return Pin(3, "VM 'vm1'", pid, frozenset(regions.split(",")), started)


def test_a_journaled_pin_holds_while_its_process_runs(state: ManagerState) -> None:
    control(state, "add_region", name="ram", gpa=0, size=64 * MiB)
    procs = Processes(p777=5000)
    state.pins = Pins(procs)
    # a process that ended, and a pid now used by another process, are not taken up
    adopted = state.pins.adopt(
        [journaled_pin(), journaled_pin(pid=778), journaled_pin(started=4000)]
    )
    assert adopted == [journaled_pin()]
    reply = control(state, "remove_region", name="ram")
    assert isinstance(reply, m.Error) and reply.code == "pinned", reply
    assert "VM 'vm1' (pid 777, pinned before a restart)" in reply.message
    assert state.pins.kept(state.mappers) == [journaled_pin()]  # journaled again
    del procs.running[777]  # the VM exited
    assert isinstance(control(state, "remove_region", name="ram"), m.ControlReply)
    assert state.pins.kept(state.mappers) == []


def test_the_lender_pinning_again_replaces_the_journaled_pin(state: ManagerState) -> None:
    state.pins = Pins(Processes(p777=5000))
    control(state, "add_region", name="ram", gpa=0, size=64 * MiB)
    control(state, "add_region", name="other", gpa=128 * MiB, size=16 * MiB)
    state.pins.adopt([journaled_pin(regions="ram,other")])
    mid, _, _ = attach(state, "qemu-vm1")  # registered again: pins "ram" only, for pid 777
    control(state, "pin_regions", mapper=mid, label="VM 'vm1'", pid=777, regions="ram")
    assert isinstance(control(state, "remove_region", name="other"), m.ControlReply)
    assert state.pins.kept(state.mappers) == [Pin(mid, "VM 'vm1'", 777, frozenset({"ram"}), 5000)]
    state.mapper_gone(mid, "detached")  # the VM's launcher ended
    assert isinstance(control(state, "remove_region", name="ram"), m.ControlReply)


def test_a_label_alone_neither_replaces_a_journaled_pin_nor_shares_a_pinned_region(
    state: ManagerState,
) -> None:
    """Another process pinning under a VM's label is another lender: the journaled pin of the
    VM's process stays (it dropped it, and the region could be removed under the VM), and
    a region pinned for it is not lent again (two processes on one RAM)."""
    state.pins = Pins(Processes(p777=5000, p778=6000))
    control(state, "add_region", name="ram", gpa=0, size=64 * MiB)
    control(state, "add_region", name="other", gpa=128 * MiB, size=16 * MiB)
    state.pins.adopt([journaled_pin()])
    mid, _, _ = attach(state, "impostor")
    reply = control(state, "pin_regions", mapper=mid, label="VM 'vm1'", pid=778, regions="other")
    assert isinstance(reply, m.ControlReply), reply
    refused = control(state, "remove_region", name="ram")
    assert isinstance(refused, m.Error) and refused.code == "pinned", refused
    again = control(state, "pin_regions", mapper=mid, label="VM 'vm1'", pid=778, regions="ram")
    assert isinstance(again, m.Error) and again.code == "pinned", again


def test_pins_of_unknown_processes_are_not_journaled(state: ManagerState) -> None:
    state.pins = Pins(Processes())  # pid 777 is not a process here
    pinned_vm(state)
    assert state.pins.kept(state.mappers) == []


def test_process_start_names_one_process() -> None:
    assert process_start(os.getpid()) == process_start(os.getpid()) is not None
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    assert process_start(child.pid) is None


def test_pins_round_trip_through_the_journal() -> None:
    snapshot = Snapshot(
        os.urandom(16), 0, "/run/x", 1 << 32, 1, 1, 4, (), (),
        pins=(PinRecord(3, "VM 'vm1'", 777, 5000, ("hi", "ram")),),
    )  # fmt: skip
    assert journal.decode(journal.encode(snapshot)) == snapshot
    bare = dataclasses.replace(snapshot, pins=())
    body = msgpack.unpackb(journal.encode(bare)[struct.calcsize("<8sIII") :])
    del body["pins"]  # a journal written before pins were kept
    data = msgpack.packb(body)
    old = struct.pack("<8sIII", journal.MAGIC, 1, len(data), zlib.crc32(data)) + data
    assert journal.decode(old) == bare
    broken = dataclasses.replace(snapshot, pins=(PinRecord(3, "x", -1, 5000, ()),))
    with pytest.raises(journal.JournalError, match="pin pid"):
        journal.decode(journal.encode(broken))


def test_a_change_refused_anyway_is_refused_at_once_while_mappers_are_awaited(
    state: ManagerState,
) -> None:
    """After a restart, a change that could cut mappings waits until the mappers of the
    manager before are back (up to 30 s); one whose region is pinned, or missing, would be
    refused then as now, so it is refused now."""
    procs = Processes(p777=5000, p4242=77)
    state.pins = Pins(procs)
    state.awaited = AwaitedMappers(started=procs, maps=lambda pid: None)
    control(state, "add_region", name="ram", gpa=0, size=64 * MiB)
    control(state, "add_region", name="spare", gpa=128 * MiB, size=MiB)
    state.pins.adopt([journaled_pin()])
    state.awaited.adopt((MapperRecord(3, 4242, 77),))
    state.awaited.begin(0.0, 30.0)
    for op, args in (
        ("remove_region", {}),
        ("disable_region", {}),
        ("move_region", {"gpa": 256 * MiB}),
        ("unmap_range", {"offset": 0, "size": MiB}),
    ):
        reply = control(state, op, name="ram", **args)
        assert isinstance(reply, m.Error) and reply.code == "pinned", (op, reply)
    reply = control(state, "remove_region", name="nothing")
    assert isinstance(reply, m.Error) and reply.code == "not-found", reply
    # a change that may go through waits as before
    out = state.handle_control(b"client", m.ControlRequest("remove_region", {"name": "spare"}))
    assert out == [] and state.awaited.deferred == 1


def test_the_stop_answer_says_which_vms_a_next_manager_pins_again(state: ManagerState) -> None:
    """`manager stop --keep-state` noted for every VM that the next manager pins it again; a
    pin whose process cannot be told apart from a later one (no start time: another pid
    namespace, or gone) is not journaled, so none would."""
    state.pins = Pins(Processes())  # pid 777 is not a process here
    mid = pinned_vm(state)
    reply = control(state, "stop")
    assert isinstance(reply, m.ControlReply), reply
    assert reply.result["vms"] == [
        {"label": "VM 'vm1'", "pid": 777, "regions": ["ram"], "kept": False}
    ]
    assert state.pins.of(mid) is not None
