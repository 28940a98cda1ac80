"""The manager's state machine and mappers' fds, with no sockets: an fd is pushed once, right
behind the first Map that needs it, pushed again when the kernel dropped it on arrival, denied
when the mapper no longer holds it; requests and acks come on the fd socket too."""

from __future__ import annotations

from test_manager_state import Clock, MiB, attach, msgs, rng

from membacking.manager.state import ManagerState, Send, SendFd
from membacking.protocol import messages as m
from membacking.protocol.messages import Channel


def test_fd_pushed_once_right_behind_the_first_map(state: ManagerState) -> None:
    state.add_region("a", 0, MiB, False)
    state.add_region("b", MiB, MiB, False)
    mid, stream, requests = attach(state, "m1")
    first = state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    assert first == [
        Send(Channel.MAPPER, stream, m.Map(rng(0, 1), 1, 0, False)),
        SendFd(mid, m.FdGrant(1, MiB, False)),
    ]
    again = state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    assert again == [Send(Channel.MAPPER, stream, m.Map(rng(0, 1), 1, 0, False))]
    # a fault spanning both regions: one fd, for the mappable not sent yet, behind its own Map
    both = state.handle_mapper(requests, m.SendMappings(rng(0, 2)))
    assert [type(e) for e in both] == [Send, Send, SendFd]
    assert both[2] == SendFd(mid, m.FdGrant(2, MiB, False))
    assert state.counters["fds_sent"] == 2


def test_requests_and_acks_from_the_fd_socket(state: ManagerState, clock: Clock) -> None:
    """A mapper's requests and acks arrive on its fd socket (`handle_fd_message`, by mapper
    id): with only its stream socket attached they are answered as on the ZeroMQ sockets, they
    count as a sign of life, and anything else is left to the caller to refuse."""
    state.add_region("a", 0, MiB, False)
    entry = state.register_mapper("m1", pid=4000)
    state.handle_mapper(b"m1-s", m.Attach(entry.id, entry.token, m.ROLE_STREAM))
    clock.now += 7
    assert state.handle_fd_message(entry.id, m.SendMappings(rng(0, 1))) == [
        Send(Channel.MAPPER, b"m1-s", m.Map(rng(0, 1), 1, 0, False)),
        SendFd(entry.id, m.FdGrant(1, MiB, False)),
    ]
    assert entry.last_seen == clock.now
    assert state.handle_fd_message(entry.id, m.ResendFd(1)) == [
        SendFd(entry.id, m.FdGrant(1, MiB, False))
    ]
    removal = state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    (unmap,) = msgs(removal)
    assert isinstance(unmap, m.Unmap)
    done = state.handle_fd_message(entry.id, m.UnmapAck(unmap.seq))
    assert msgs(done) == [m.ControlReply({"name": "a", "unmapped_from": [entry.id]})]
    assert state.handle_fd_message(entry.id, m.Detach()) is None
    state.mapper_gone(entry.id)
    assert state.handle_fd_message(entry.id, m.SendMappings(rng(0, 1))) == []  # gone meanwhile


def test_fd_dropped_on_arrival_is_pushed_again_when_asked(state: ManagerState) -> None:
    """A mapper whose FdGrant arrived without its fd (its open-file limit) asks with ResendFd;
    the fd comes again, counted, while the next Map alone would not bring it."""
    state.add_region("a", 0, MiB, False)
    mid, _, requests = attach(state, "m1")
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    assert state.handle_mapper(requests, m.ResendFd(1)) == [SendFd(mid, m.FdGrant(1, MiB, False))]
    assert state.counters["fds_sent"] == 2
    assert msgs(state.handle_mapper(requests, m.SendMappings(rng(0, 1)))) == [
        m.Map(rng(0, 1), 1, 0, False)
    ]


def test_resend_of_an_fd_not_held_is_denied(state: ManagerState) -> None:
    """Never sent, or released since (the region was removed): the stale Map that asked fails;
    no fd of another mapper's or of a destroyed mappable leaves the manager."""
    state.add_region("a", 0, MiB, False)
    state.add_region("b", MiB, MiB, False)
    _, _, requests = attach(state, "m1")
    out = state.handle_mapper(requests, m.ResendFd(2))
    assert len(out) == 1 and isinstance(out[0], SendFd) and isinstance(out[0].msg, m.FdDenied)
    state.handle_mapper(requests, m.SendMappings(rng(0, 1)))
    state.handle_control(b"c", m.ControlRequest("remove_region", {"name": "a"}))
    out = state.handle_mapper(requests, m.ResendFd(1))
    assert [type(e.msg) for e in out if isinstance(e, SendFd)] == [m.FdDenied]
    assert state.counters["fds_sent"] == 1
