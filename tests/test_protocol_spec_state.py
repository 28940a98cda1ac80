"""State-machine tests of the protocol rules docs/PROTOCOL.md states for the manager: the page
size in Welcome, hugetlb memory placed and cut only on huge pages, a clean detach that races the
fd socket, the acknowledged Detach and request tags."""

from __future__ import annotations

import pytest
from test_manager_state import RecordingStore, attach, msgs

from membacking.manager import peers
from membacking.manager.errors import Refused
from membacking.manager.state import ManagerState, SendFd
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange

MiB = 1 << 20
HUGE = 2 * MiB


@pytest.fixture
def state() -> ManagerState:
    return ManagerState(RecordingStore(), address_space=1 << 32, huge_page_size=HUGE)


def test_welcome_tells_the_hosts_page_size(
    state: ManagerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers, "HOST_PAGE_SIZE", 16384)
    entry = state.register_mapper("m", pid=1)
    assert state.welcome(entry).page_size == 16384


def test_a_hugetlb_region_is_placed_on_a_huge_page(state: ManagerState) -> None:
    with pytest.raises(Refused, match="multiple of 0x200000"):
        state.add_region("h", MiB, HUGE, True, backing="hugetlb")
    with pytest.raises(Refused, match="multiple of the 2 MiB huge page size"):
        state.add_region("h", 0, 3 * MiB, True, backing="hugetlb")
    state.add_region("h", HUGE, 2 * HUGE, True, backing="hugetlb")
    # a memfd region still goes anywhere page-aligned
    state.add_region("small", 64 * MiB + 4096, MiB, True)


def test_a_hugetlb_region_moves_only_to_a_huge_page(state: ManagerState) -> None:
    state.add_region("h", HUGE, HUGE, True, backing="hugetlb")
    with pytest.raises(Refused, match="huge page size"):
        state.move_region("h", 3 * MiB)
    state.move_region("h", 4 * HUGE)
    assert state.regions["h"].gpa == 4 * HUGE


def test_hugetlb_memory_is_cut_only_in_whole_huge_pages(state: ManagerState) -> None:
    state.add_region("h", 0, 4 * HUGE, True, backing="hugetlb")
    for offset, size in ((MiB, HUGE), (0, MiB), (HUGE, 4096)):
        with pytest.raises(Refused, match="whole huge pages"):
            state.change_mappings("h", offset, size)
    state.change_mappings("h", HUGE, HUGE)
    assert [(s.offset, s.size) for s in state.regions["h"].submappings] == [
        (0, HUGE),
        (2 * HUGE, 2 * HUGE),
    ]
    # ...and hugetlb memory put into a region lands on huge pages too
    state.add_region("r", 64 * MiB, 8 * MiB, True)
    with pytest.raises(Refused, match="whole huge pages"):
        state.change_mappings("r", MiB, HUGE, replace=("hugetlb", None, 0, True))
    state.change_mappings("r", HUGE, HUGE, replace=("hugetlb", None, 0, True))
    # the region now holds hugetlb memory: it moves only to a huge page
    with pytest.raises(Refused, match="huge page size"):
        state.move_region("r", 128 * MiB + MiB)
    # memfd parts of it can still be cut anywhere
    state.change_mappings("r", 6 * MiB, 4096)


def test_partial_unmap_of_plain_memory_is_unchanged(state: ManagerState) -> None:
    state.add_region("a", 0, 8 * MiB, True)
    _, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(MemoryRange(0, 8 * MiB)))
    out = state.change_mappings("a", 4096, 4096)
    assert [type(x).__name__ for x in msgs(out, stream)][:1] == ["Unmap"]


def register_fd(state: ManagerState, features: int | None) -> tuple[int, bytes]:
    """A mapper of this release: Hello (with `features`), stream attached as role 2."""
    entry = state.register_mapper("m", pid=77)
    state.welcome(entry, features)
    stream = b"stream-%d" % entry.id
    state.handle_mapper(stream, m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    return entry.id, stream


def test_detach_is_acknowledged_when_negotiated(state: ManagerState) -> None:
    mid, stream = register_fd(state, m.FEATURE_DETACH_ACK)
    out = state.handle_mapper(stream, m.Detach())
    assert msgs(out, stream) == [m.DetachAck()]
    assert mid not in state.mappers
    # a mapper that did not negotiate it gets no answer (as before)
    _, old = register_fd(state, None)
    assert msgs(state.handle_mapper(old, m.Detach())) == []


def test_a_detach_that_loses_the_race_with_the_fd_socket_is_not_a_rejection(
    state: ManagerState,
) -> None:
    mid, stream = register_fd(state, None)
    state.mapper_gone(mid, "fd socket closed")  # the fd socket's close was read first
    assert state.handle_mapper(stream, m.Detach()) == []
    assert sum(state.rejected.values()) == 0
    # anything else from that socket is still refused
    assert msgs(state.handle_mapper(stream, m.SetEager()))[0].code == "not-attached"


def test_a_tagged_request_before_attach_is_refused_by_tag(state: ManagerState) -> None:
    entry = state.register_mapper("m", pid=5)
    state.welcome(entry, m.FEATURE_TAGS)
    request = m.SendMappings(MemoryRange(0, 4096), 41)
    out = state.handle_fd_message(entry.id, request)
    assert out == [SendFd(entry.id, m.Error("not-attached", out[0].msg.message, 41))]  # type: ignore[union-attr]
    # untagged, it is dropped as before (counted)
    assert state.handle_fd_message(entry.id, m.SendMappings(MemoryRange(0, 4096))) == []
    assert state.rejected["not-attached"] == 2


def test_a_role_2_socket_is_named_so_in_rejections(
    state: ManagerState, caplog: pytest.LogCaptureFixture
) -> None:
    _, stream = register_fd(state, None)
    state.handle_mapper(stream, m.SendMappings(MemoryRange(0, 4096)))
    assert "on a role-2 socket" in caplog.text


# ---- codec: the fields the features add --------------------------------------------------------


def test_tags_travel_and_are_optional() -> None:
    from membacking.protocol.codec import decode, encode
    from membacking.protocol.errors import ProtocolError
    from membacking.protocol.messages import Channel

    r = MemoryRange(0, 4096)
    assert decode(encode(m.SendMappings(r, 2**64 - 1)), Channel.FD) == m.SendMappings(r, 2**64 - 1)
    assert decode(encode(m.SendMappings(r)), Channel.FD) == m.SendMappings(r)  # earlier layout
    assert encode(m.SendMappings(r)) == bytes.fromhex("94010c00cd1000")
    assert decode(encode(m.Error("x", "y", 5)), Channel.MAPPER).tag == 5  # type: ignore[attr-defined]
    for bad in ([1, 12, 0, 4096, -1], [1, 12, 0, 4096, "t"], [1, 12, 0, 4096, None]):
        import msgpack

        with pytest.raises(ProtocolError) as err:
            decode(msgpack.packb(bad), Channel.FD)
        assert err.value.reason == "bad-field"
    # a DetachAck is the manager's alone, and only on the stream
    assert decode(encode(m.DetachAck()), Channel.MAPPER, sender="manager") == m.DetachAck()
    with pytest.raises(ProtocolError, match="may not be sent by a mapper"):
        decode(encode(m.DetachAck()), Channel.MAPPER, sender="mapper")
    with pytest.raises(ProtocolError, match="not allowed on the fd channel"):
        decode(encode(m.DetachAck()), Channel.FD)


def test_fd_denied_behind_every_map_until_a_release_frees_a_slot() -> None:
    """docs/PROTOCOL.md §6.1: at --max-fds-per-mapper, each Map of a mappable whose fd the
    mapper lacks is followed by FdDenied (counted in `refused`, never in `rejected`); once a
    release frees a slot, the next Map brings the FdGrant. No fd is sent without a Map."""
    from membacking.manager.model import Limits

    state = ManagerState(RecordingStore(), limits=Limits(max_fds_per_mapper=1))
    state.add_region("a", 0, MiB, True)
    state.add_region("b", MiB, MiB, True)
    _, _, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(MemoryRange(0, 4096)))  # takes the one slot
    for _ in range(2):
        out = state.handle_mapper(requests, m.SendMappings(MemoryRange(MiB, MiB + 4096)))
        assert [type(e.msg) for e in out if isinstance(e, SendFd)] == [m.FdDenied]
    assert state.refused["limit"] == 2 and "limit" not in state.rejected
    out = state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    (unmap,) = [msg for msg in msgs(out) if isinstance(msg, m.Unmap)]
    assert unmap.release == (1,)
    out = state.handle_mapper(requests, m.UnmapAck(unmap.seq))
    assert not [e for e in out if isinstance(e, SendFd)]  # the freed slot pushes nothing
    out = state.handle_mapper(requests, m.SendMappings(MemoryRange(MiB, MiB + 4096)))
    assert [e.msg for e in out if isinstance(e, SendFd)] == [m.FdGrant(2, MiB, True)]


def test_a_change_outside_its_region_says_so_without_speaking_of_alignment(
    state: ManagerState,
) -> None:
    state.add_region("a", 0, 64 << 20, True)
    with pytest.raises(Refused) as outside:
        state.change_mappings("a", 63 << 20, 2 << 20)
    assert "must lie inside region 'a' (64 MiB)" in str(outside.value), outside.value
    with pytest.raises(Refused) as unaligned:
        state.change_mappings("a", 4097, 4096)
    assert "must be page-aligned and lie inside region 'a'" in str(unaligned.value)


def test_a_control_clients_refusal_is_logged_as_such(caplog: pytest.LogCaptureFixture) -> None:
    from membacking.manager.model import Limits

    state = ManagerState(RecordingStore(), limits=Limits(max_regions=1))
    state.add_region("a", 0, MiB, True)
    asked = m.ControlRequest("add_region", {"name": "b", "gpa": MiB, "size": MiB})
    out = state.handle_control(b"client", asked)
    assert [e.code for e in msgs(out) if isinstance(e, m.Error)] == ["limit"]
    assert "refused (limit) for a control client: add_region" in caplog.text  # not "pid None"
