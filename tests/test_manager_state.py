"""The manager's state machine, message by message, no sockets (as OpenVMM's manager tests)."""

from __future__ import annotations

import pytest

from membacking.manager.backing import BackingError
from membacking.manager.dropping import EVICT_GRACE
from membacking.manager.held import Held
from membacking.manager.state import Disconnect, Effect, ManagerState, Send, SendFd, region_info
from membacking.protocol import messages as m
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange

MiB = 1 << 20


class RecordingStore:
    """Backings as bookkeeping only: which mappable ids exist."""

    ram_kind, prealloc = "memfd", False

    def __init__(self) -> None:
        self.live: dict[int, tuple[str, int, bool]] = {}
        self.destroyed: list[int] = []

    def create(
        self,
        mappable_id: int,
        name: str,
        size: int,
        writable: bool,
        *,
        kind: str = "memfd",
        path: str | None = None,
    ) -> None:
        if name == "fail":
            raise BackingError("no-memory", "cannot back it")
        self.live[mappable_id] = (name, size, writable)

    def describe(self, mappable_id: int) -> tuple[int, bool]:
        return self.live[mappable_id][1], self.live[mappable_id][2]

    def ram_room(self, adding: int = 0) -> tuple[int, int] | None:
        return None  # memfds: no file system to fill

    def destroy(self, mappable_id: int) -> None:
        del self.live[mappable_id]
        self.destroyed.append(mappable_id)

    def grant_fd(self, mappable_id: int) -> int:
        return 100 + mappable_id

    def close_all(self) -> None:
        self.live.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attach(state: ManagerState, name: str) -> tuple[int, bytes, bytes]:
    """Register a mapper and bind its two sockets; returns (id, stream id, requests id)."""
    entry = state.register_mapper(name, pid=4000 + len(state.mappers))
    stream, requests = f"{name}-s".encode(), f"{name}-r".encode()
    assert state.handle_mapper(stream, m.Attach(entry.id, entry.token, m.ROLE_STREAM)) == [
        Send(Channel.MAPPER, stream, m.Attached(m.ROLE_STREAM))
    ]
    assert state.handle_mapper(requests, m.Attach(entry.id, entry.token, m.ROLE_REQUESTS)) == [
        Send(Channel.MAPPER, requests, m.Attached(m.ROLE_REQUESTS))
    ]
    return entry.id, stream, requests


def fault_everything(state: ManagerState, asker: bytes | int, rng: MemoryRange) -> list[Effect]:
    """Every mapping in `rng`, across its gaps: a fault is answered up to its first gap
    (PROTOCOL.md §6.1), so one SendMappings per stretch, from the end of each gap on. `asker`:
    the mapper's requests identity, or its id (fd.sock)."""
    effects: list[Effect] = []
    start = rng.start
    while start < rng.end:
        msg = m.SendMappings(MemoryRange(start, rng.end))
        if isinstance(asker, int):
            out = state.handle_fd_message(asker, msg) or []
        else:
            out = state.handle_mapper(asker, msg)
        effects += out
        gaps = [e.msg.range for e in out if isinstance(e, Send) and isinstance(e.msg, m.NoMapping)]
        if not gaps:
            break
        start = gaps[-1].end
    return effects


def msgs(effects: list[Effect], identity: bytes | None = None) -> list[m.Message]:
    return [
        e.msg
        for e in effects
        if isinstance(e, Send) and (identity is None or e.identity == identity)
    ]


def holders(state: ManagerState) -> dict[str, list[int]]:
    return {name: region_info(state, r)["holders"] for name, r in state.regions.items()}


def rng(start_mib: int, size_mib: int) -> MemoryRange:
    return MemoryRange.from_size(start_mib * MiB, size_mib * MiB)


def test_send_mappings_walks_in_address_order_up_to_the_first_gap(state: ManagerState) -> None:
    """A fault is answered in address order up to its first gap: the access fails there, so
    nothing past it is mapped (a read of 1 TiB across a hole mapped every region past it)."""
    state.add_region("a", 0, 64 * MiB, True)
    state.add_region("b", 128 * MiB, 16 * MiB, False)
    mid, stream, requests = attach(state, "m1")
    out = state.handle_mapper(requests, m.SendMappings(rng(0, 256)))
    assert msgs(out) == [m.Map(rng(0, 64), 1, 0, True), m.NoMapping(rng(64, 64))]
    assert all(e.identity == stream for e in out if isinstance(e, Send))
    assert holders(state) == {"a": [mid], "b": []}
    out = state.handle_mapper(requests, m.SendMappings(rng(96, 160)))
    assert msgs(out) == [m.NoMapping(rng(96, 32))]  # a gap first: nothing at all is mapped
    out = state.handle_mapper(requests, m.SendMappings(rng(128, 64)))
    assert msgs(out) == [m.Map(rng(128, 16), 2, 0, False), m.NoMapping(rng(144, 48))]
    assert holders(state) == {"a": [mid], "b": [mid]}


def test_fault_inside_a_mapping_maps_the_whole_mapping(state: ManagerState) -> None:
    state.add_region("a", 0, 64 * MiB, True)
    _, _, requests = attach(state, "m1")
    assert msgs(state.handle_mapper(requests, m.SendMappings(rng(10, 1)))) == [
        m.Map(rng(0, 64), 1, 0, True)
    ]


def test_answers_stay_inside_the_address_space(state: ManagerState) -> None:
    """A request reaching past the end of the space is answered for the part inside it only; a
    request wholly outside gets one NoMapping of itself (so it is answered)."""
    top = 1 << 32
    state.add_region("top", top - MiB, MiB, True)
    _, _, requests = attach(state, "m1")
    out = msgs(state.handle_mapper(requests, m.SendMappings(MemoryRange(top - MiB, top + MiB))))
    assert out == [m.Map(MemoryRange(top - MiB, top), 1, 0, True)]
    out = msgs(state.handle_mapper(requests, m.SendMappings(MemoryRange(top - 8192, top + 8192))))
    assert out == [m.Map(MemoryRange(top - MiB, top), 1, 0, True)]
    state.remove_region("top")
    out = msgs(state.handle_mapper(requests, m.SendMappings(MemoryRange(top - 4096, top + 4096))))
    assert out == [m.NoMapping(MemoryRange(top - 4096, top))]
    out = msgs(state.handle_mapper(requests, m.SendMappings(MemoryRange(top, top + MiB))))
    assert out == [m.NoMapping(MemoryRange(top, top + MiB))]


def test_removal_unmaps_holders_only_and_completes_after_every_ack(state: ManagerState) -> None:
    store = state.store
    assert isinstance(store, RecordingStore)
    state.add_region("a", 0, 64 * MiB, True)
    m1, s1, r1 = attach(state, "m1")
    m2, s2, r2 = attach(state, "m2")
    _, s3, _ = attach(state, "m3")  # never faulted: must get nothing
    state.handle_mapper(r1, m.SendMappings(rng(0, 1)))
    state.handle_mapper(r2, m.SendMappings(rng(1, 1)))

    out = state.handle_control(b"client", m.ControlRequest("remove_region", {"name": "a"}))
    unmaps = {e.identity: e.msg for e in out if isinstance(e, Send)}
    assert set(unmaps) == {s1, s2}
    u1, u2 = unmaps[s1], unmaps[s2]
    assert isinstance(u1, m.Unmap) and isinstance(u2, m.Unmap)
    assert u1.range == u2.range == rng(0, 64)
    assert u1.release == u2.release == (1,)  # each was pushed the fd with its Map
    assert s3 not in unmaps
    assert 1 in store.live  # still backed until every holder acknowledged

    assert state.handle_mapper(s1, m.UnmapAck(u1.seq)) == []
    assert 1 in store.live
    done = state.handle_mapper(s2, m.UnmapAck(u2.seq))
    assert msgs(done) == [m.ControlReply({"name": "a", "unmapped_from": [m1, m2]})]
    assert done[0].channel is Channel.CONTROL and done[0].identity == b"client"
    assert store.destroyed == [1]
    assert state.regions == {}


def test_removal_without_holders_completes_at_once(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    attach(state, "m1")
    out = state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    assert msgs(out) == [m.ControlReply({"name": "a", "unmapped_from": []})]


def test_removal_racing_a_fill_in(state: ManagerState) -> None:
    """Fault first: the Map leaves before the Unmap on the same stream. Removal first: the
    fault gets NoMapping and nobody is asked to unmap."""
    state.add_region("a", 0, MiB, True)
    _, stream, requests = attach(state, "m1")
    fill = state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    removal = state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    sequence = msgs(fill + removal, stream)
    assert [type(x) for x in sequence] == [m.Map, m.Unmap]
    assert fill[1] == SendFd(1, m.FdGrant(1, MiB, True))  # right behind the Map
    assert sequence[1].release == (1,)  # and given back with the Unmap

    state.add_region("b", 0, MiB, True)
    state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "b"}))
    late = state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    assert msgs(late) == [m.NoMapping(rng(0, 1))]


def test_mapper_gone_unblocks_pending_removal(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    m1, _, r1 = attach(state, "m1")
    state.handle_mapper(r1, m.SendMappings(rng(0, 1)))
    assert (
        msgs(state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"})))
        and "a" in state.regions
    )
    out = state.mapper_gone(m1, "killed")
    assert msgs(out) == [m.ControlReply({"name": "a", "unmapped_from": [m1]})]
    assert state.mappers == {}


def test_unresponsive_mapper_is_evicted_after_timeout(state: ManagerState, clock: Clock) -> None:
    state.add_region("a", 0, MiB, True)
    m1, _, r1 = attach(state, "m1")
    state.handle_mapper(r1, m.SendMappings(rng(0, 1)))
    state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    clock.now += 4.0
    assert state.tick() == []
    clock.now += 2.0
    out = state.tick()
    reason = "evicted: it did not answer within 5s"
    assert Disconnect(m1, reason, unresponsive=True) in out
    assert msgs(out) == [m.Shutdown(reason)]  # the answer waits for its lease to run out
    clock.now += EVICT_GRACE
    # the removal reports the mapper as evicted, not as one that unmapped the region
    why = {str(m1): "after not answering for 6.0 s"}
    done = {"name": "a", "unmapped_from": [], "evicted": [m1], "evicted_why": why}
    assert msgs(state.tick()) == [m.ControlReply(done)]
    assert state.stats()["evictions"] == 1
    assert state.stats()["evictions_by_operator"] == 0


def test_removal_names_acked_and_evicted_holders_apart(state: ManagerState, clock: Clock) -> None:
    state.add_region("a", 0, MiB, True)
    m1, s1, r1 = attach(state, "quick")
    m2, _, r2 = attach(state, "stuck")
    state.handle_mapper(r1, m.SendMappings(rng(0, 1)))
    state.handle_mapper(r2, m.SendMappings(rng(0, 1)))
    out = state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    seq1 = next(msg.seq for msg in msgs(out, b"quick-s") if isinstance(msg, m.Unmap))
    assert state.handle_mapper(s1, m.UnmapAck(seq1)) == []
    out = state.handle_control(b"op", m.ControlRequest("evict_mapper", {"id": m2}))
    assert msgs(out, b"c") == []  # not before the evicted mapper's lease ran out
    clock.now += EVICT_GRACE
    out = state.tick()
    assert m.ControlReply(
        {
            "name": "a",
            "unmapped_from": [m1],
            "evicted": [m2],
            "evicted_why": {str(m2): "by an operator"},
        }
    ) in msgs(out, b"c")
    stats = state.stats()
    assert stats["evictions_by_operator"] == 1 and stats["evictions"] == 0


def test_mappers_lists_what_a_holder_still_has_to_unmap(state: ManagerState) -> None:
    """A holder a removal waits on holds nothing in the table any more, but `mappers` says
    what it still has to unmap (the reason the removal waits on it)."""
    state.add_region("a", 0, 2 * MiB, True)
    _, s1, r1 = attach(state, "stuck")
    state.handle_mapper(r1, m.SendMappings(rng(0, 1)))

    def listed() -> dict[str, object]:
        out = msgs(state.handle_control(b"q", m.ControlRequest("mappers", {})))
        assert isinstance(out[0], m.ControlReply)
        info: dict[str, object] = out[0].result[0]
        return info

    assert (listed()["ranges"], listed()["unmapping_ranges"]) == (1, 0)
    out = state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    info = listed()
    assert (info["ranges"], info["bytes"]) == (0, 0)
    assert (info["unmapping_ranges"], info["unmapping_bytes"]) == (1, 2 * MiB)
    seq = next(msg.seq for msg in msgs(out, b"stuck-s") if isinstance(msg, m.Unmap))
    state.handle_mapper(s1, m.UnmapAck(seq))
    assert (listed()["unmapping_ranges"], listed()["unmapping_bytes"]) == (0, 0)


def test_mapper_ids_are_never_reused(state: ManagerState) -> None:
    first = state.register_mapper("a", 1).id
    state.mapper_gone(first)
    second = state.register_mapper("b", 2).id
    assert second > first


def test_role_2_is_the_stream_of_a_mapper_that_uses_the_fd_socket(state: ManagerState) -> None:
    """Role 2 binds the stream like role 0 (it only tells the manager's release apart, which
    refuses it when older): Maps go to it, it may not be bound twice, in either role."""
    state.add_region("a", 0, MiB, False)
    entry = state.register_mapper("m", 1)
    assert state.handle_mapper(b"s", m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD)) == [
        Send(Channel.MAPPER, b"s", m.Attached(m.ROLE_STREAM_FD))
    ]
    assert entry.stream == b"s"
    out = state.handle_fd_message(entry.id, m.SendMappings(rng(0, 1)))
    assert out is not None and msgs(out, b"s") == [m.Map(rng(0, 1), 1, 0, False)]
    for role in (m.ROLE_STREAM, m.ROLE_STREAM_FD):
        again = msgs(state.handle_mapper(b"s2", m.Attach(entry.id, entry.token, role)))
        assert again[0].code == "already-attached"
    eager = msgs(state.handle_mapper(b"s", m.SetEager()))  # a stream message, taken
    assert eager == [m.EagerResult(True, "")]


def test_attach_checks_token_role_and_binding(state: ManagerState) -> None:
    entry = state.register_mapper("m", 1)
    bad = state.handle_mapper(b"x", m.Attach(entry.id, b"\0" * 16, 0))
    assert msgs(bad) == [m.Error("bad-token", "unknown mapper id or wrong token")]
    assert msgs(state.handle_mapper(b"y", m.Attach(entry.id, entry.token, 7)))[0].code == "bad-role"
    state.handle_mapper(b"s", m.Attach(entry.id, entry.token, 0))
    twice = msgs(state.handle_mapper(b"s2", m.Attach(entry.id, entry.token, 0)))
    assert twice[0].code == "already-attached"
    unknown = msgs(state.handle_mapper(b"z", m.SendMappings(rng(0, 1))))
    assert unknown[0].code == "not-attached"
    # A stream socket may not send SendMappings, a requests socket may not ack.
    assert msgs(state.handle_mapper(b"s", m.SendMappings(rng(0, 1))))[0].code == "unexpected"
    assert state.rejected["bad-token"] == 1 and state.rejected["unexpected"] == 1


def test_unknown_ack_is_rejected_and_counted(state: ManagerState) -> None:
    _, stream, _ = attach(state, "m1")
    assert state.handle_mapper(stream, m.UnmapAck(12345)) == []
    assert state.rejected["unknown-seq"] == 1


def test_detach_forgets_the_mapper_and_its_holdings(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    _, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    state.handle_mapper(stream, m.Detach())
    assert holders(state) == {"a": []}
    assert msgs(state.handle_mapper(stream, m.UnmapAck(1)))[0].code == "not-attached"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"name": "a", "gpa": 0, "size": 4096}, "exists"),
        ({"name": "b", "gpa": 4096, "size": 4096}, "overlap"),
        ({"name": "b", "gpa": 1 << 32, "size": 4096}, "out-of-range"),
        ({"name": "b", "gpa": 100, "size": 4096}, "bad-request"),
        ({"name": "b", "gpa": 8 * MiB, "size": 0}, "bad-request"),
        ({"name": "b", "gpa": 8 * MiB}, "bad-request"),
        ({"name": "b", "gpa": 8 * MiB, "size": 4096, "color": "red"}, "bad-request"),
        ({"name": "b", "gpa": "0", "size": 4096}, "bad-request"),
        ({"name": "fail", "gpa": 8 * MiB, "size": 4096}, "no-memory"),
    ],
)
def test_add_region_errors(state: ManagerState, args: dict[str, object], code: str) -> None:
    state.add_region("a", 0, MiB, True)
    out = msgs(state.handle_control(b"c", m.ControlRequest("add_region", dict(args))))
    assert len(out) == 1 and isinstance(out[0], m.Error)
    assert out[0].code == code, out[0].message
    assert list(state.regions) == ["a"]


def test_control_listing_and_unknown_op(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, False)
    regions = msgs(state.handle_control(b"c", m.ControlRequest("regions", {})))[0]
    assert isinstance(regions, m.ControlReply)
    assert regions.result == [
        {
            "name": "a",
            "gpa": 0,
            "size": MiB,
            "writable": False,
            "priority": 0,
            "backing": "memfd",
            "memory": "memfd",
            "path": None,
            "enabled": True,
            "active": True,
            "mappable_id": 1,
            "pieces": 1,
            "mappings": [
                {"offset": 0, "size": MiB, "mappable_id": 1, "file_offset": 0, "writable": False}
            ],
            "holders": [],
            "state": "active",
        }
    ]
    err = msgs(state.handle_control(b"c", m.ControlRequest("explode", {})))[0]
    assert isinstance(err, m.Error) and err.code == "bad-request"
    stats = state.stats()
    assert stats["regions"] == 1 and stats["region_bytes"] == MiB


def test_shutdown_tells_mappers_and_waiting_clients(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, True)
    _, s1, r1 = attach(state, "m1")
    _, s2, _ = attach(state, "m2")
    state.handle_mapper(r1, m.SendMappings(rng(0, 1)))
    state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    out = state.shutdown("test")
    by_identity = {e.identity: e.msg for e in out if isinstance(e, Send)}
    assert isinstance(by_identity[s1], m.Shutdown) and isinstance(by_identity[s2], m.Shutdown)
    reply = by_identity[b"c"]
    assert isinstance(reply, m.Error) and reply.code == "shutting-down"


def test_limits_refuse_mappers_regions_and_fds(clock: Clock) -> None:
    from membacking.manager.errors import Refused
    from membacking.manager.state import Limits

    state = ManagerState(
        RecordingStore(),
        limits=Limits(max_mappers=1, max_regions=2, max_fds_per_mapper=1),
        clock=clock,
        monotonic=clock,
    )
    state.add_region("a", 0, MiB, True)
    state.add_region("b", MiB, MiB, True)
    with pytest.raises(Refused) as refused:
        state.add_region("c", 2 * MiB, MiB, True)
    assert refused.value.code == "limit"
    assert "holds 2 regions, its limit (--max-regions) is 2" in str(refused.value)
    # asked by a control client: the same answer, counted and logged as a limit's refusal
    asked = m.ControlRequest("add_region", {"name": "c", "gpa": 2 * MiB, "size": MiB})
    out = state.handle_control(b"client", asked)
    assert [e.msg.code for e in out if isinstance(e, Send) and isinstance(e.msg, m.Error)] == [
        "limit"
    ]
    assert state.refused["limit"] == 1
    bad = m.ControlRequest("add_region", {"name": "c", "gpa": 3, "size": MiB})
    state.handle_control(b"client", bad)  # the request's own fault: not a limit's refusal
    assert state.refused["limit"] == 1 and sum(state.refused.values()) == 1
    _mid, _, requests = attach(state, "m1")
    with pytest.raises(Refused, match="limit of 1 mappers"):
        state.register_mapper("m2", 2)
    out = state.handle_mapper(requests, m.SendMappings(rng(0, 2)))
    pushed = [e.msg for e in out if isinstance(e, SendFd)]
    assert pushed[0] == m.FdGrant(1, MiB, True)
    denied = pushed[1]
    assert isinstance(denied, m.FdDenied) and "limit of 1 fds" in denied.reason
    assert state.refused["limit"] == 3 and not state.rejected


def test_held_counts_the_ranges_of_each_mappable() -> None:
    """A mapper's held ranges answer "does it still map this mappable" from counts, which must
    follow overwrites and removals of single ranges."""
    held = Held()
    a, b = MemoryRange(0, 4096), MemoryRange(4096, 8192)
    held[a] = 1
    held[b] = 1
    assert held.maps(1) and len(held) == 2
    assert held.pop(a) == 1 and held.maps(1)
    held[b] = 2  # the same range, now backed by another mappable
    assert not held.maps(1) and held.maps(2) and held.get(b) == 2
    assert held.pop(a) is None and held.pop(b) == 2
    assert not held.maps(2) and list(held) == []
    # compared (as inside MapperEntry) and shown by the ranges it holds
    held[a] = 3
    other = Held()
    assert held != other
    other[a] = 3
    assert held == other and repr(held) == f"Held({{{a!r}: 3}})"


def test_refusals_show_sizes_and_addresses_as_typed(state: ManagerState) -> None:
    """`0x1388 (5000)`: hex with the decimal beside, as the command line shows numbers."""

    def refusal(op: str, **args: object) -> str:
        (reply,) = msgs(state.handle_control(b"c", m.ControlRequest(op, args)))
        assert isinstance(reply, m.Error)
        return reply.message

    assert refusal("add_region", name="a", gpa=0, size=5000) == (
        "size 0x1388 (5000) must be a non-zero multiple of 4096 (a page)"
    )
    assert refusal("add_region", name="a", gpa=0x30001, size=4096) == (
        "gpa 0x30001 (196609) must be a multiple of 4096 (a page)"
    )
    assert refusal("add_region", name="a", gpa=-4096, size=4096).endswith("must not be negative")
