"""Feature negotiation (Hello offers bits, Welcome answers the subset used) and Shutdown's
reason code: in the state machine and against a real daemon, for peers with and without a mask."""

from __future__ import annotations

import socket
from collections.abc import Callable

import msgpack
import zmq
from test_manager_state import Clock, RecordingStore

from membacking.manager.model import Send
from membacking.manager.state import ManagerState
from membacking.protocol import messages as m
from membacking.protocol.fdpass import recv_message, send_message
from membacking.protocol.shutdowns import drops_mappings

from conftest import RunningManager


def new_state() -> ManagerState:
    clock = Clock()
    return ManagerState(
        RecordingStore(), address_space=1 << 32, unmap_timeout=5.0, clock=clock, monotonic=clock
    )


def test_welcome_answers_the_offered_bits_it_knows() -> None:
    state = new_state()
    entry = state.register_mapper("new", 1)
    assert state.welcome(entry, 0xFFFF_0000 | m.FEATURE_SHUTDOWN_CODE).features == (
        m.FEATURE_SHUTDOWN_CODE
    )
    assert state.welcome(entry, 0xFFFF_0000).features == 0
    old = state.register_mapper("old", 2)
    assert state.welcome(old, None).features is None  # no mask offered: none answered


def bind_stream(state: ManagerState, entry_id: int, token: bytes, identity: bytes) -> None:
    assert state.handle_mapper(identity, m.Attach(entry_id, token, m.ROLE_STREAM_FD))


def test_shutdown_carries_its_code_only_to_mappers_that_negotiated_it() -> None:
    state = new_state()
    new, old = state.register_mapper("new", 1), state.register_mapper("old", 2)
    state.welcome(new, m.SUPPORTED_FEATURES)
    state.welcome(old, None)
    bind_stream(state, new.id, new.token, b"new")
    bind_stream(state, old.id, old.token, b"old")
    sent = {e.identity: e.msg for e in state.shutdown("bye") if isinstance(e, Send)}
    # without the code, the reason says it by how it begins (shutdowns.py)
    assert sent == {
        b"new": m.Shutdown("bye", m.SHUTDOWN_STOPPING),
        b"old": m.Shutdown("manager shutting down: bye"),
    }
    sent = {
        e.identity: e.msg
        for e in state.shutdown("back soon", m.SHUTDOWN_RESTARTING)
        if isinstance(e, Send)
    }
    assert sent[b"new"] == m.Shutdown("back soon", m.SHUTDOWN_RESTARTING)
    assert [e.msg for e in state.farewell(new.id, "late") if isinstance(e, Send)] == [
        m.Shutdown("late", m.SHUTDOWN_EVICTED)
    ]
    assert [e.msg for e in state.farewell(old.id, "late") if isinstance(e, Send)] == [
        m.Shutdown("evicted: late")
    ]


def hello(manager: RunningManager, msg: m.Hello) -> tuple[m.Message, list[object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(manager.runtime_dir / "fd.sock"))
        send_message(sock, msg)
        sock.setblocking(True)
        raw = sock.recv(65536, socket.MSG_PEEK)
        reply, _ = recv_message(sock)
        return reply, msgpack.unpackb(raw)


def test_the_daemon_negotiates_and_keeps_the_old_layout_for_old_mappers(
    manager: RunningManager,
) -> None:
    reply, wire = hello(manager, m.Hello("offers-all", (1 << 64) - 1))
    assert isinstance(reply, m.Welcome) and reply.features == m.SUPPORTED_FEATURES
    assert reply.state_id is not None and len(wire) == 2 + 6  # FEATURE_REATTACH: state_id
    reply, wire = hello(manager, m.Hello("no-reattach", m.FEATURE_SHUTDOWN_CODE))
    assert isinstance(reply, m.Welcome) and reply.features == m.FEATURE_SHUTDOWN_CODE
    assert reply.state_id is None and len(wire) == 2 + 5
    reply, wire = hello(manager, m.Hello("older"))
    assert isinstance(reply, m.Welcome) and reply.features is None
    assert len(wire) == 2 + 4  # exactly what a decoder of the earlier release accepts


def test_an_evicted_mappers_fd_socket_shutdown_carries_its_code(manager: RunningManager) -> None:
    """The copy of the Shutdown written on fd.sock of a mapper evicted by the operator carries
    the code it negotiated, as the stream's does (it was written once the mapper was out of
    the table, without its code)."""
    from membacking.protocol.codec import decode, encode
    from membacking.protocol.messages import Channel

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(manager.runtime_dir / "fd.sock"))
        send_message(sock, m.Hello("coded", m.FEATURE_SHUTDOWN_CODE))
        welcome, _ = recv_message(sock)
        assert isinstance(welcome, m.Welcome), welcome
        ctx = zmq.Context()
        stream = ctx.socket(zmq.DEALER)
        try:
            stream.connect(f"ipc://{manager.runtime_dir / 'mapper.ipc'}")
            stream.send(encode(m.Attach(welcome.mapper_id, welcome.token, m.ROLE_STREAM_FD)))
            assert stream.poll(5000)
            assert isinstance(decode(stream.recv(), Channel.MAPPER), m.Attached)
            manager.client().evict_mapper(welcome.mapper_id)
            assert stream.poll(5000)
            on_stream = decode(stream.recv(), Channel.MAPPER)
            got = []
            while data := sock.recv(65536):
                got.append(decode(data, Channel.FD))
        finally:
            stream.close(0)
            ctx.term()
    assert isinstance(on_stream, m.Shutdown) and on_stream.code == m.SHUTDOWN_EVICTED
    assert isinstance(got[-1], m.Shutdown) and got[-1].code == m.SHUTDOWN_EVICTED, got


def _raw_mapper(
    manager: RunningManager, hello_msg: m.Hello
) -> tuple[socket.socket, zmq.Socket[bytes]]:
    """A mapper of its own (fd.sock and an attached stream), as a foreign one would be."""
    from membacking.protocol.codec import decode, encode
    from membacking.protocol.messages import Channel

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(str(manager.runtime_dir / "fd.sock"))
    send_message(sock, hello_msg)
    welcome, _ = recv_message(sock)
    assert isinstance(welcome, m.Welcome), welcome
    stream = zmq.Context.instance().socket(zmq.DEALER)
    stream.connect(f"ipc://{manager.runtime_dir / 'mapper.ipc'}")
    stream.send(encode(m.Attach(welcome.mapper_id, welcome.token, m.ROLE_STREAM_FD)))
    assert stream.poll(10000)
    assert isinstance(decode(stream.recv(), Channel.MAPPER), m.Attached)
    return sock, stream


def _shutdowns(sock: socket.socket, stream: zmq.Socket[bytes]) -> list[m.Shutdown]:
    """The Shutdown of the stream, then the one written on fd.sock before its end."""
    from membacking.protocol.codec import decode
    from membacking.protocol.messages import Channel

    try:
        assert stream.poll(15000)
        got = [decode(stream.recv(), Channel.MAPPER)]
        while data := sock.recv(65536):
            got.append(decode(data, Channel.FD))
    finally:
        stream.close(0)
        sock.close()
    shutdowns = [msg for msg in got if isinstance(msg, m.Shutdown)]
    assert len(shutdowns) == 2, got
    return shutdowns


def test_a_stop_tells_a_mapper_without_codes_to_drop_its_mappings(
    manager: RunningManager,
) -> None:
    """PROTOCOL.md §9: without SHUTDOWN_CODE, a reason beginning `manager shutting down` means
    `stopping`. The stop's own reason ("received SIGTERM") does not begin so, and such a
    mapper kept memory the stop ended."""
    sock, stream = _raw_mapper(manager, m.Hello("older"))
    assert manager.stop() == 0
    for shutdown in _shutdowns(sock, stream):
        assert shutdown.code is None and drops_mappings(shutdown), shutdown
        assert "SIGTERM" in shutdown.reason


def test_a_restart_keeps_the_mappings_of_a_reattach_mapper_without_codes(
    start_manager: Callable[..., RunningManager],
) -> None:
    """A stop that keeps the state (`restarting`) says so to a mapper that can come back
    (REATTACH) but reads no codes: its reason does not begin with a dropping text. One without
    REATTACH cannot prove what it holds to the next manager: it is told to drop everything."""
    manager = start_manager("--keep-state")
    sock, stream = _raw_mapper(manager, m.Hello("reattach", m.FEATURE_REATTACH))
    other = _raw_mapper(manager, m.Hello("plain", 0))
    assert manager.stop() == 0
    kept = _shutdowns(sock, stream)
    assert not any(drops_mappings(s) for s in kept), kept
    dropped = _shutdowns(*other)
    assert all(drops_mappings(s) for s in dropped), dropped
