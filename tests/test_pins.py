"""Pins at the state-machine level: regions lent to a VM cannot be removed, disabled, moved,
re-mapped or covered while the lending mapper is attached; everything is allowed once it is gone."""

from __future__ import annotations

from typing import Any

import pytest
from test_manager_state import MiB, RecordingStore, attach

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
