"""A mapper that said Hello and never attached its stream: it holds a slot of --max-mappers, so
it is removed once `unmap_timeout` has passed since its Hello, and `mappers` says it is not
attached yet. Hello-only registrations held their slots for good and were listed as lazy
mappers: four of them locked every new mapper out of a daemon run with --max-mappers 4."""

from __future__ import annotations

import socket

import pytest
from test_manager_state import Clock, RecordingStore, attach

from membacking.manager.errors import Refused
from membacking.manager.model import Disconnect, Limits
from membacking.manager.state import ManagerState
from membacking.protocol import messages as m
from membacking.protocol.fdpass import recv_message, send_message
from membacking.runtime import RuntimePaths

from conftest import RunningManager


def test_a_registration_that_never_attaches_is_removed_after_unmap_timeout() -> None:
    clock = Clock()
    state = ManagerState(
        RecordingStore(),
        address_space=1 << 32,
        unmap_timeout=5.0,
        clock=clock,
        monotonic=clock,
        limits=Limits(max_mappers=2),
    )
    idle = state.register_mapper("idle", pid=11)
    attached, _, _ = attach(state, "busy")
    with pytest.raises(Refused, match="limit"):
        state.register_mapper("new", pid=13)
    clock.now += 5.0
    assert state.tick() == []  # not past the timeout yet
    clock.now += 0.5
    effects = state.tick()
    assert [e for e in effects if isinstance(e, Disconnect)] == [
        Disconnect(idle.id, "evicted: it did not attach its stream in 5s")
    ]
    assert list(state.mappers) == [attached]  # the attached one stays, however long
    assert state.rejected["timeout"] == 1
    state.register_mapper("new", pid=13)  # its slot is free again


def test_mappers_lists_an_unattached_registration_as_registering(manager: RunningManager) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as fd_sock:
        fd_sock.settimeout(5)
        fd_sock.connect(str(RuntimePaths.resolve(manager.runtime_dir).fd_socket))
        send_message(fd_sock, m.Hello("half"))
        assert isinstance(recv_message(fd_sock)[0], m.Welcome)
        listed = manager.client().mappers()
        assert [(p["name"], p["attached"]) for p in listed] == [("half", False)]
        text = manager.cli("mappers").stdout
        assert "registering" in text and "lazy" not in text, text
