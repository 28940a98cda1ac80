"""The region manager and eager mappers in the state machine: nesting rules, enable/disable/move,
partial unmap and atomic replacement, eager replay, push and rollback. No sockets."""

from __future__ import annotations

import time

import pytest
from test_manager_state import MiB, RecordingStore, attach, msgs, rng

from membacking.manager.dropping import EVICT_GRACE
from membacking.manager.errors import Refused
from membacking.manager.state import Disconnect, ManagerState, Send, region_info
from membacking.protocol import messages as m
from membacking.protocol.ranges import MemoryRange


@pytest.fixture
def state() -> ManagerState:
    return ManagerState(RecordingStore(), address_space=1 << 32)


def control(state: ManagerState, op: str, **args: object) -> list[m.Message]:
    return msgs(state.handle_control(b"ctl", m.ControlRequest(op, dict(args))))


def ok(state: ManagerState, op: str, **args: object) -> object:
    out = control(state, op, **args)
    assert len(out) == 1 and isinstance(out[0], m.ControlReply), out
    return out[0].result


def error(state: ManagerState, op: str, **args: object) -> m.Error:
    out = control(state, op, **args)
    assert len(out) == 1 and isinstance(out[0], m.Error), out
    return out[0]


def table(state: ManagerState) -> list[tuple[MemoryRange, str, int, int]]:
    return [(r, mp.region, mp.mappable_id, mp.file_offset) for r, mp in state.table.items()]


def test_nesting_rules() -> None:
    state = ManagerState(RecordingStore(), address_space=1 << 32)
    ok(state, "add_region", name="big", gpa=0, size=64 * MiB, priority=5)
    ok(state, "add_region", name="inner", gpa=MiB, size=MiB, priority=1)
    # lower priority must lie inside the higher one
    e = error(state, "add_region", name="low", gpa=63 * MiB, size=2 * MiB, priority=1)
    assert e.code == "overlap" and "must lie inside" in e.message
    # a higher priority must contain what it overlaps
    e = error(state, "add_region", name="high", gpa=0, size=MiB + 4096, priority=9)
    assert e.code == "overlap" and "must contain" in e.message
    # equal priority only with an identical range
    e = error(state, "add_region", name="twin", gpa=MiB, size=2 * MiB, priority=1)
    assert e.code == "overlap" and "identical ranges" in e.message
    ok(state, "add_region", name="twin", gpa=MiB, size=MiB, priority=1)
    ok(state, "add_region", name="top", gpa=0, size=128 * MiB, priority=9)
    # only the best region is active at each address
    active = {n: r.active for n, r in state.regions.items()}
    assert active == {"big": False, "inner": False, "twin": False, "top": True}


def test_disable_reenables_the_region_beneath(state: ManagerState) -> None:
    # "flash" (priority 1) covers [0, 4M) and hides "ram" (priority 0) at [1M, 2M) inside it
    ok(state, "add_region", name="flash", gpa=0, size=4 * MiB, priority=1)
    ok(state, "add_region", name="ram", gpa=MiB, size=MiB, priority=0)
    assert [(r, name) for r, name, _, _ in table(state)] == [(rng(0, 4), "flash")]
    states = {n: region_info(state, r)["state"] for n, r in state.regions.items()}
    assert states == {"flash": "active", "ram": "hidden"}
    mid, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(0, 4)))
    ram_id = state.regions["ram"].submappings[0].mappable_id
    # disabling flash: Unmap of flash to its holder, then ram (now visible) pushed as a Map
    out = state.handle_control(b"ctl", m.ControlRequest("disable_region", {"name": "flash"}))
    sent = msgs(out, stream)
    assert isinstance(sent[0], m.Unmap) and sent[0].range == rng(0, 4)
    assert sent[1] == m.Map(rng(1, 1), ram_id, 0, True)
    assert not msgs(out, b"ctl")  # waits for the ack
    done = state.handle_mapper(stream, m.UnmapAck(sent[0].seq))
    assert msgs(done, b"ctl")[0].result["enabled"] is False
    assert [(r, name) for r, name, _, _ in table(state)] == [(rng(1, 1), "ram")]
    assert state.handle_mapper(requests, m.SendMappings(rng(0, 1))) and msgs(
        state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    ) == [m.NoMapping(rng(0, 1))]
    # re-enabling flash hides ram again
    out = state.handle_control(b"ctl", m.ControlRequest("enable_region", {"name": "flash"}))
    sent = msgs(out, stream)
    assert isinstance(sent[0], m.Unmap) and sent[0].range == rng(1, 1) and sent[0].release == ()
    assert isinstance(sent[1], m.Map) and sent[1].range == rng(0, 4)
    assert mid in state.table.lookup(0)[1].holders  # type: ignore[index]
    # disabling ram while hidden changes nothing in the table
    ok(state, "disable_region", name="ram")
    assert [(r, name) for r, name, _, _ in table(state)] == [(rng(0, 4), "flash")]
    assert region_info(state, state.regions["ram"])["state"] == "disabled"


def test_move_like_a_bar(state: ManagerState) -> None:
    ok(state, "add_region", name="bar", gpa=None, size=MiB, disabled=True)
    assert state.regions["bar"].range is None and len(state.table) == 0
    e = error(state, "enable_region", name="bar")
    assert e.code == "bad-request" and "no GPA" in e.message
    ok(state, "enable_region", name="bar", gpa=16 * MiB)
    assert [r for r, *_ in table(state)] == [rng(16, 1)]
    _, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(16, 1)))
    out = state.handle_control(
        b"ctl", m.ControlRequest("move_region", {"name": "bar", "gpa": 32 * MiB})
    )
    unmap = msgs(out, stream)[0]
    assert isinstance(unmap, m.Unmap) and unmap.range == rng(16, 1)
    assert [r for r, *_ in table(state)] == [rng(32, 1)]
    result = msgs(state.handle_mapper(stream, m.UnmapAck(unmap.seq)), b"ctl")[0]
    assert isinstance(result, m.ControlReply) and result.result["gpa"] == 32 * MiB
    # the mappable (and its content) is the same one: moving keeps memory
    assert unmap.release == ()


def test_partial_unmap_splits_the_mapping(state: ManagerState) -> None:
    ok(state, "add_region", name="ram", gpa=0, size=16 * MiB)
    mid, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    out = state.handle_control(
        b"ctl", m.ControlRequest("unmap_range", {"name": "ram", "offset": 4 * MiB, "size": 4 * MiB})
    )
    unmap = msgs(out, stream)
    assert len(unmap) == 1 and isinstance(unmap[0], m.Unmap) and unmap[0].range == rng(4, 4)
    assert unmap[0].release == ()  # the memfd still backs the rest
    assert [(r, off) for r, _, _, off in table(state)] == [(rng(0, 4), 0), (rng(8, 8), 8 * MiB)]
    # the mapper keeps holding both remaining pieces
    assert all(mid in mp.holders for _, mp in state.table.items())
    state.handle_mapper(stream, m.UnmapAck(unmap[0].seq))
    fault = msgs(state.handle_mapper(requests, m.SendMappings(rng(5, 1))))
    assert fault == [m.NoMapping(rng(5, 1))]


def test_replace_is_atomic_for_lazy_holders(state: ManagerState) -> None:
    ok(state, "add_region", name="ram", gpa=0, size=16 * MiB)
    _, stream, requests = attach(state, "m1")
    _, stream2, _ = attach(state, "m2")  # holds nothing: gets nothing
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    out = state.handle_control(
        b"ctl", m.ControlRequest("map_range", {"name": "ram", "offset": 2 * MiB, "size": MiB})
    )
    sent = msgs(out, stream)
    assert [type(x) for x in sent] == [m.Unmap, m.Map]
    assert sent[0].range == sent[1].range == rng(2, 1)  # type: ignore[union-attr]
    assert not msgs(out, stream2)
    new_id = sent[1].mappable_id  # type: ignore[union-attr]
    assert new_id not in (1,) and [(r, i) for r, _, i, _ in table(state)] == [
        (rng(0, 2), 1),
        (rng(2, 1), new_id),
        (rng(3, 13), 1),
    ]


def test_replacing_everything_destroys_the_old_backing(state: ManagerState) -> None:
    store = state.store
    assert isinstance(store, RecordingStore)
    ok(state, "add_region", name="ram", gpa=0, size=2 * MiB)
    _mid, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    out = state.handle_control(
        b"ctl", m.ControlRequest("map_range", {"name": "ram", "offset": 0, "size": 2 * MiB})
    )
    unmap, refill = msgs(out, stream)
    assert isinstance(unmap, m.Unmap) and unmap.release == (1,)
    assert isinstance(refill, m.Map) and refill.mappable_id == 2
    assert 1 in store.live
    state.handle_mapper(stream, m.UnmapAck(unmap.seq))
    assert store.destroyed == [1]


def test_removing_a_disabled_region_releases_fds(state: ManagerState) -> None:
    ok(state, "add_region", name="dev", gpa=0, size=MiB)
    _mid, stream, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    out = state.handle_control(b"ctl", m.ControlRequest("disable_region", {"name": "dev"}))
    unmap = msgs(out, stream)[0]
    assert isinstance(unmap, m.Unmap) and unmap.release == ()  # still alive while disabled
    state.handle_mapper(stream, m.UnmapAck(unmap.seq))
    out = state.handle_control(b"ctl", m.ControlRequest("remove_region", {"name": "dev"}))
    release = msgs(out, stream)
    assert len(release) == 1 and isinstance(release[0], m.Release)
    assert release[0].release == (1,)
    done = msgs(state.handle_mapper(stream, m.UnmapAck(release[0].seq)), b"ctl")
    assert done == [m.ControlReply({"name": "dev", "unmapped_from": []})]


def test_eager_replay_push_and_fault_free_add(state: ManagerState) -> None:
    ok(state, "add_region", name="a", gpa=0, size=MiB)
    ok(state, "add_region", name="b", gpa=4 * MiB, size=MiB)
    mid, stream, _ = attach(state, "eager")
    replay = msgs(state.handle_mapper(stream, m.SetEager()), stream)
    assert [(x.range, x.mappable_id) for x in replay] == [  # type: ignore[attr-defined]
        (rng(0, 1), 1),
        (rng(4, 1), 2),
    ]
    assert all(isinstance(x, m.MapEager) for x in replay)
    assert msgs(state.handle_mapper(stream, m.MapAck(replay[0].seq, True, "")), stream) == []  # type: ignore[attr-defined]
    result = msgs(state.handle_mapper(stream, m.MapAck(replay[1].seq, True, "")), stream)  # type: ignore[attr-defined]
    assert result == [m.EagerResult(True, "")]
    assert state.mappers[mid].eager
    # a new region is pushed, and the add completes only after the MapAck
    out = state.handle_control(
        b"ctl", m.ControlRequest("add_region", {"name": "c", "gpa": 8 * MiB, "size": MiB})
    )
    push = msgs(out, stream)
    assert len(push) == 1 and isinstance(push[0], m.MapEager) and push[0].range == rng(8, 1)
    assert not msgs(out, b"ctl")
    done = msgs(state.handle_mapper(stream, m.MapAck(push[0].seq, True, "")), b"ctl")
    assert isinstance(done[0], m.ControlReply) and done[0].result["holders"] == [mid]


def test_eager_failure_rolls_back_the_add(state: ManagerState) -> None:
    store = state.store
    assert isinstance(store, RecordingStore)
    good, s_good, _ = attach(state, "good")
    bad, s_bad, _ = attach(state, "bad")
    for stream in (s_good, s_bad):
        assert msgs(state.handle_mapper(stream, m.SetEager())) == [m.EagerResult(True, "")]
    out = state.handle_control(
        b"ctl", m.ControlRequest("add_region", {"name": "x", "gpa": 0, "size": MiB})
    )
    push = {e.identity: e.msg for e in out if isinstance(e, Send)}
    state.handle_mapper(s_good, m.MapAck(push[s_good].seq, True, ""))  # type: ignore[attr-defined]
    rollback = state.handle_mapper(s_bad, m.MapAck(push[s_bad].seq, False, "mmap: ENOMEM"))  # type: ignore[attr-defined]
    # the mapper that succeeded gets an Unmap; the failed one is not a holder
    unmaps = msgs(rollback, s_good)
    assert len(unmaps) == 1 and isinstance(unmaps[0], m.Unmap) and unmaps[0].range == rng(0, 1)
    # the failed one is not unmapped; it only gives back the fd pushed with its MapEager
    (release,) = msgs(rollback, s_bad)
    assert isinstance(release, m.Release) and release.release == (1,)
    assert not msgs(rollback, b"ctl")
    assert not msgs(state.handle_mapper(s_bad, m.UnmapAck(release.seq)), b"ctl")
    reply = msgs(state.handle_mapper(s_good, m.UnmapAck(unmaps[0].seq)), b"ctl")
    assert isinstance(reply[0], m.Error) and reply[0].code == "map-failed"
    assert f"mapper {bad} (bad): mmap: ENOMEM" in reply[0].message
    assert state.regions == {} and len(state.table) == 0 and store.live == {}
    assert state.stats()["rollbacks"] == 1
    assert good in state.mappers


def test_failed_upgrade_keeps_what_it_got(state: ManagerState) -> None:
    ok(state, "add_region", name="a", gpa=0, size=MiB)
    ok(state, "add_region", name="b", gpa=4 * MiB, size=MiB)
    mid, stream, _ = attach(state, "m")
    replay = msgs(state.handle_mapper(stream, m.SetEager()))
    state.handle_mapper(stream, m.MapAck(replay[0].seq, True, ""))  # type: ignore[attr-defined]
    result = msgs(state.handle_mapper(stream, m.MapAck(replay[1].seq, False, "no fds")))  # type: ignore[attr-defined]
    assert isinstance(result[0], m.EagerResult) and not result[0].ok
    assert "no fds" in result[0].message
    entry = state.mappers[mid]
    assert not entry.eager and list(entry.held) == [rng(0, 1)]


def test_private_regions_allow_one_mapper(state: ManagerState) -> None:
    _, _, requests = attach(state, "one")
    ok(state, "add_region", name="ram", gpa=0, size=MiB, private=True)
    assert state.regions["ram"].submappings[0].mappable_id == m.PRIVATE_MAPPABLE
    with pytest.raises(Refused, match="only one mapper"):
        state.register_mapper("two", 2)
    out = state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    assert len(out) == 1  # no fd at all
    assert msgs(out) == [m.Map(rng(0, 1), m.PRIVATE_MAPPABLE, 0, True)]
    # its contents live only in the mapper: neither disabling nor moving may drop them
    for op, args in (("disable_region", {}), ("move_region", {"gpa": 8 * MiB})):
        e = error(state, op, name="ram", **args)
        assert e.code == "private" and "would be lost" in e.message
    assert state.regions["ram"].active and state.regions["ram"].gpa == 0


def test_backing_choice_is_validated(state: ManagerState) -> None:
    e = error(state, "add_region", name="x", gpa=0, size=MiB, file="/tmp/x", hugetlb=True)
    assert e.code == "bad-request" and "choose one backing" in e.message
    e = error(state, "add_region", name="x", gpa=0, size=MiB, priority=300)
    assert e.code == "bad-request" and "priority" in e.message
    e = error(state, "unmap_range", name="nope", offset=0, size=4096)
    assert e.code == "not-found"
    ok(state, "add_region", name="x", gpa=0, size=MiB)
    e = error(state, "unmap_range", name="x", offset=MiB, size=4096)
    assert e.code == "bad-request" and "inside region" in e.message


def test_replaced_backings_are_destroyed_with_their_region(state: ManagerState) -> None:
    store = state.store
    assert isinstance(store, RecordingStore)
    ok(state, "add_region", name="leak", gpa=0, size=MiB)
    ok(state, "map_range", name="leak", offset=0, size=4096)
    assert len(store.live) == 2  # the region's memfd and the new piece's
    ok(state, "remove_region", name="leak")
    assert store.live == {} and sorted(store.destroyed) == [1, 2]


def test_ranges_outside_the_region_are_refused(state: ManagerState) -> None:
    ok(state, "add_region", name="a", gpa=0, size=MiB)
    ok(state, "add_region", name="b", gpa=MiB, size=MiB)
    for op, args in (
        ("unmap_range", {"offset": -4096, "size": 4096}),
        ("map_range", {"offset": -8192, "size": 4096}),
        ("unmap_range", {"offset": MiB, "size": 4096}),
        ("map_range", {"offset": 0, "size": 4096, "file": "/tmp/x", "file_offset": -4096}),
    ):
        e = error(state, op, name="b", **args)
        assert e.code == "bad-request", (op, args, e)
    assert [(r, name) for r, name, _, _ in table(state)] == [(rng(0, 1), "a"), (rng(1, 1), "b")]
    store = state.store
    assert isinstance(store, RecordingStore) and len(store.live) == 2  # nothing new created


def test_removal_while_an_eager_mapper_fails_the_add(state: ManagerState) -> None:
    store = state.store
    assert isinstance(store, RecordingStore)
    _, stream, _ = attach(state, "eager")
    assert msgs(state.handle_mapper(stream, m.SetEager())) == [m.EagerResult(True, "")]
    adding = state.handle_control(
        b"add", m.ControlRequest("add_region", {"name": "e", "gpa": 0, "size": MiB})
    )
    (push,) = msgs(adding, stream)
    assert isinstance(push, m.MapEager)
    removing = state.handle_control(b"rm", m.ControlRequest("remove_region", {"name": "e"}))
    (unmap,) = msgs(removing, stream)
    assert isinstance(unmap, m.Unmap)
    failed = state.handle_mapper(stream, m.MapAck(push.seq, False, "mmap: ENOMEM"))
    (answer,) = msgs(failed, b"add")
    assert isinstance(answer, m.Error) and answer.code == "map-failed"
    assert not msgs(failed, stream)  # the removal under way unmaps it: nothing more to send
    done = msgs(state.handle_mapper(stream, m.UnmapAck(unmap.seq)), b"rm")
    assert isinstance(done[0], m.ControlReply) and done[0].result["name"] == "e"
    stats = state.stats()
    assert stats["removals"] == 1 and stats["rollbacks"] == 0 and stats["region_bytes"] == 0
    assert store.live == {} and store.destroyed == [1]


def test_file_paths_must_be_absolute(state: ManagerState) -> None:
    e = error(state, "add_region", name="f", gpa=0, size=MiB, file="relative.bin")
    assert e.code == "bad-request" and "must be an absolute path" in e.message
    ok(state, "add_region", name="m", gpa=0, size=MiB)
    e = error(state, "map_range", name="m", offset=0, size=4096, file="rel.bin")
    assert e.code == "bad-request" and "absolute" in e.message
    e = error(state, "map_range", name="m", offset=0, size=4096, file_offset=4096)
    assert e.code == "bad-request" and "file_offset needs a file" in e.message


def test_an_eager_mapper_that_cannot_map_a_change_becomes_lazy(state: ManagerState) -> None:
    ok(state, "add_region", name="r", gpa=0, size=MiB)
    mid, stream, _ = attach(state, "eager")
    replay = msgs(state.handle_mapper(stream, m.SetEager()))
    state.handle_mapper(stream, m.MapAck(replay[0].seq, True, ""))  # type: ignore[attr-defined]
    assert state.mappers[mid].eager
    out = state.handle_control(
        b"ctl", m.ControlRequest("map_range", {"name": "r", "offset": 0, "size": 4096})
    )
    sent = msgs(out, stream)
    unmap = next(x for x in sent if isinstance(x, m.Unmap))
    push = next(x for x in sent if isinstance(x, m.MapEager))
    state.handle_mapper(stream, m.UnmapAck(unmap.seq))
    done = state.handle_mapper(stream, m.MapAck(push.seq, False, "fd limit"))
    told = msgs(done, stream)
    assert told == [m.EagerResult(False, "mapper 1 (eager): fd limit")]
    assert isinstance(msgs(done, b"ctl")[0], m.ControlReply)  # the change itself stands
    assert not state.mappers[mid].eager and state.stats()["demotions"] == 1


def test_a_refused_placement_names_the_oldest_region_it_breaks(state: ManagerState) -> None:
    """With several regions in the way, the refusal names the one created first, as it did
    before the placement index (which files regions by size, not by age)."""
    state.add_region("a", 0x300000, 0x4000, True, priority=1)
    state.add_region("big", 0x0, 0x100000, True, priority=1)
    state.add_region("c", 0x100000, 0x4000, True, priority=1)
    with pytest.raises(Refused, match="region 'big'"):
        state.add_region("new", 0x0, 0x200000, True, priority=1)


def test_private_region_is_refused_while_several_mappers_are_attached(
    state: ManagerState,
) -> None:
    """Adding private RAM with two mappers attached would leave both without it and refuse
    every mapper after them: the add is refused, saying who is attached, and counts as nothing
    a peer did wrong."""
    attach(state, "one")
    attach(state, "two")
    e = error(state, "add_region", name="ram", gpa=0, size=MiB, private=True)
    assert e.code == "private" and "2 are attached: 1 (one), 2 (two)" in e.message
    assert "ram" not in state.regions and not state.rejected


def test_status_names_the_mappers_a_change_waits_on(state: ManagerState) -> None:
    """`status` is healthy until a change waits on a mapper; then it says which, and since when;
    `evict_mapper` cuts that mapper off and the change completes."""
    state.add_region("a", 0, 4 * MiB, True)
    mid, _, requests = attach(state, "slow")
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    before = ok(state, "status")
    assert isinstance(before, dict) and before["health"] == "ok" and before["waiting_on"] == []
    assert before["regions"] == 1 and before["mappers"] == 1 and before["problems"] == []
    state.handle_control(b"remover", m.ControlRequest("remove_region", {"name": "a"}))
    during = ok(state, "status")
    assert isinstance(during, dict) and during["health"] == "degraded"
    (waiting,) = during["waiting_on"]
    assert waiting["id"] == mid and waiting["name"] == "slow" and waiting["seconds"] >= 0
    assert during["problems"] == [f"waiting on mapper(s) {mid}"]
    out = state.handle_control(b"ctl", m.ControlRequest("evict_mapper", {"id": mid}))
    sent = [(e.identity, e.msg) for e in out if isinstance(e, Send)]
    done = {
        "name": "a",
        "unmapped_from": [],
        "evicted": [mid],
        "evicted_why": {str(mid): "by an operator"},
    }
    reply = {"id": mid, "name": "slow", "pid": 4000, "pin": None}  # it lent nothing to a VM
    assert sent[-1] == (b"ctl", m.ControlReply(reply))
    assert sent[0][1] == m.Shutdown("evicted: an operator ran `membacking mapper evict`")
    assert Disconnect(mid, "evicted: an operator ran `membacking mapper evict`") in out
    assert (b"remover", m.ControlReply(done)) not in sent  # its lease has not run out yet
    time.sleep(EVICT_GRACE)
    ended = [(e.identity, e.msg) for e in state.tick() if isinstance(e, Send)]
    assert (b"remover", m.ControlReply(done)) in ended
    assert mid not in state.mappers and "a" not in state.regions
    assert error(state, "evict_mapper", id=mid).code == "unknown-mapper"
    assert error(state, "evict_mapper", id="1").code == "bad-request"
