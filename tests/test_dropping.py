"""The grace an evicted mapper gets before the changes it concerns answer (manager/dropping.py),
at the state-machine level: a change that waited on several evicted mappers answers once, a
change refused during a grace leaves nothing behind, and a handover waits for the grace."""

from __future__ import annotations

from test_manager_state import Clock, MiB, attach, msgs, rng

from membacking.manager.dropping import EVICT_GRACE
from membacking.manager.handover import what_is_handed_over
from membacking.manager.state import ManagerState
from membacking.protocol import messages as m


def problems(state: ManagerState) -> list[str]:
    """What `status` says is wrong."""
    (reply,) = msgs(state.handle_control(b"s", m.ControlRequest("status", {})), b"s")
    assert isinstance(reply, m.ControlReply)
    found: list[str] = reply.result["problems"]
    return found


def test_a_removal_that_waited_on_two_evicted_mappers_answers_once(
    state: ManagerState, clock: Clock
) -> None:
    state.add_region("keep", 0, 4 * MiB, True)
    state.add_region("dev", 1 << 30, MiB, True)
    for name in ("one", "two"):  # both stuck: evicted in the same tick
        _, _, requests = attach(state, name)
        state.handle_mapper(requests, m.SendMappings(rng(1024, 1)))
    state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "dev"}))
    clock.now += 6.0
    state.tick()
    said = "1 change(s) wait for evicted mapper(s) 1, 2 to stop touching the memory they held"
    assert any(p.startswith(said) for p in problems(state)), problems(state)
    clock.now += EVICT_GRACE
    replies = [x for x in msgs(state.tick(), b"c") if isinstance(x, m.ControlReply)]
    assert len(replies) == 1, replies  # (it was answered once per evicted mapper)
    assert not any("evicted" in p for p in problems(state))
    assert state.stats()["region_bytes"] == 4 * MiB
    assert not state.unfinished()


def test_a_change_refused_during_a_grace_leaves_nothing_behind(
    state: ManagerState, clock: Clock
) -> None:
    state.add_region("a", 0, MiB, True)
    state.add_region("b", 1 << 30, MiB, True)
    mid, _, _ = attach(state, "evicted")
    state.handle_control(b"op", m.ControlRequest("evict_mapper", {"id": mid}))
    refused = msgs(
        state.handle_control(b"c", m.ControlRequest("move_region", {"name": "b", "gpa": MiB // 2}))
    )
    assert isinstance(refused[0], m.Error) and refused[0].code == "overlap", refused
    assert not state.unfinished()  # (the refused move stayed in the grace's list)
    assert what_is_handed_over(state)[0] == ["the grace of an evicted mapper"]
    clock.now += EVICT_GRACE
    state.tick()
    assert what_is_handed_over(state)[0] == []
