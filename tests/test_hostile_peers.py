"""Malformed and hostile input on every socket: the daemon rejects it (counted by reason), closes
every fd it did not expect, and keeps serving."""

from __future__ import annotations

import os
import socket
import time

import msgpack
import pytest
import zmq
from reliability.test_faults import record

import membacking
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.fdpass import recv_message, send_message
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange

from conftest import HandMapper, RunningManager


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def baseline_fds(manager: RunningManager) -> int:
    manager.client().stats()  # the test's control connection is part of the baseline
    return fd_count(manager.pid)


def settle(manager: RunningManager, baseline: int, timeout: float = 5.0) -> int:
    """The manager's fd count, once it is back to `baseline` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    count = fd_count(manager.pid)
    while count != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        count = fd_count(manager.pid)
    return count


def fd_socket(manager: RunningManager) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(str(manager.runtime_dir / "fd.sock"))
    return sock


def still_serving(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir, name="probe") as memory:
        memory.write_at(0x10, b"alive")
        assert memory.read_at(0x10, 5) == b"alive"


def test_garbage_on_the_fd_socket(manager: RunningManager) -> None:
    baseline = baseline_fds(manager)
    garbage = [
        b"\x00",
        b"\xff" * 100,
        msgpack.packb([1]),
        msgpack.packb([2, 1, "x"]),
        msgpack.packb([1, 99]),
        msgpack.packb([1, 1, 7]),
        msgpack.packb([1, 1]),
        encode(m.Detach()),
        msgpack.packb([1, 3, -1]),
        b"\x91" * 70000,
    ]
    # fewer than MAX_STRIKES (8) invalid messages per connection, so each one is answered
    for batch in (garbage[:5], garbage[5:]):
        with fd_socket(manager) as sock:
            for data in batch:
                sock.send(data)
                reply, fds = recv_message(sock)
                assert isinstance(reply, m.Error) and not fds, reply
            if data is garbage[-1]:
                assert reply.code == "too-large"
    still_serving(manager)
    assert settle(manager, baseline) == baseline
    record(
        "malformed datagrams on the fd socket (one of each kind)",
        len(garbage),
        "each answered with Error, counted by reason; daemon kept serving",
        "nothing",
        (baseline, 0),
        (settle(manager, baseline), 0),
    )
    rejected = manager.client().stats()["rejected"]
    for reason in (
        "malformed",
        "version",
        "unknown-type",
        "bad-arity",
        "bad-field",
        "wrong-channel",
        "too-large",
    ):
        assert rejected.get(reason, 0) >= 1, (reason, rejected)


def test_unexpected_fds_are_closed(manager: RunningManager) -> None:
    baseline = baseline_fds(manager)
    memfds = [os.memfd_create(f"smuggled{i}") for i in range(5)]
    try:
        with fd_socket(manager) as sock:
            socket.send_fds(sock, [encode(m.Hello("sneaky"))], memfds)  # Hello takes no fds
            reply, _ = recv_message(sock)
            assert isinstance(reply, m.Error) and reply.code == "fd-count"
            socket.send_fds(sock, [b"\xc1"], memfds[:2])  # garbage with fds
            reply, _ = recv_message(sock)
            assert isinstance(reply, m.Error)
            assert settle(manager, baseline + 1) == baseline + 1  # just our connection
            targets = [
                os.readlink(f"/proc/{manager.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{manager.pid}/fd")
            ]
            assert not [t for t in targets if "smuggled" in t]
    finally:
        for fd in memfds:
            os.close(fd)
    assert settle(manager, baseline) == baseline
    still_serving(manager)
    record(
        "fds smuggled with messages that take none (5 + 2 memfds)",
        2,
        "rejected (fd-count); every smuggled fd closed by the manager at once",
        "nothing",
        (baseline, 0),
        (settle(manager, baseline), 0),
    )


def test_persistent_garbage_is_disconnected(manager: RunningManager) -> None:
    with fd_socket(manager) as sock:
        closed = False
        for _ in range(20):
            try:
                sock.send(b"\xc1")
                data = sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if not data:
                closed = True
                break
        assert closed
    still_serving(manager)


@pytest.mark.parametrize("via", ["fd socket", "requests socket"])
def test_fds_come_only_behind_a_map(manager: RunningManager, via: str) -> None:
    """A hand-written mapper: nothing arrives on its fd socket until it is sent a Map, then
    exactly that mappable's fd, once; asking for fds is not part of the protocol. Its requests
    go on its fd socket, or on the requests socket of earlier releases (still served)."""
    peer = HandMapper(manager.runtime_dir, "by-hand", requests_socket=via == "requests socket")
    sock, stream = peer.fd_sock, peer.stream
    requests = sock if peer.requests is None else peer.requests
    try:
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recvmsg(64, 64)  # nothing pushed before a Map
        sock.settimeout(5)
        sock.send(msgpack.packb([1, 3, 1]))  # what once asked for an fd is unknown now
        reply, fds = recv_message(sock)
        assert isinstance(reply, m.Error) and fds == []
        for attempt in range(2):
            requests.send(encode(m.SendMappings(MemoryRange(0, 4096))))
            assert stream.poll(5000)
            mapped = decode(stream.recv(), Channel.MAPPER)
            assert isinstance(mapped, m.Map) and mapped.range.contains_addr(0)
            if attempt == 0:
                grant, fds = recv_message(sock)
                assert isinstance(grant, m.FdGrant) and len(fds) == 1
                assert grant.mappable_id == mapped.mappable_id
                os.close(fds[0])
            else:
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    sock.recvmsg(64, 64)  # the same mappable's fd is never sent twice
    finally:
        peer.close()
    still_serving(manager)


def test_requests_on_the_fd_socket_only_after_hello(manager: RunningManager) -> None:
    """Before Hello the fd socket takes no request; after it, requests and acks only (another
    stream message there is refused), and no fds with them (closed at once)."""
    with fd_socket(manager) as sock:
        send_message(sock, m.SendMappings(MemoryRange(0, 4096)))
        reply, fds = recv_message(sock)
        assert isinstance(reply, m.Error) and reply.code == "not-registered" and fds == []
        send_message(sock, m.Hello("late"))
        welcome, _ = recv_message(sock)
        assert isinstance(welcome, m.Welcome)
        sock.send(encode(m.Detach()))
        reply, _ = recv_message(sock)
        assert isinstance(reply, m.Error) and reply.code == "wrong-channel"
        send_message(sock, m.Error("x", "valid here, but neither a request nor an ack"))
        reply, _ = recv_message(sock)
        assert isinstance(reply, m.Error) and reply.code == "unexpected"
        smuggled = os.memfd_create("smuggled-with-a-request")
        try:
            socket.send_fds(sock, [encode(m.SendMappings(MemoryRange(0, 4096)))], [smuggled])
            reply, fds = recv_message(sock)
            assert isinstance(reply, m.Error) and reply.code == "fd-count" and fds == []
        finally:
            os.close(smuggled)
        targets = [
            os.readlink(f"/proc/{manager.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{manager.pid}/fd")
        ]
        assert not [t for t in targets if "smuggled-with-a-request" in t]
    still_serving(manager)


def mapper_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], manager: RunningManager
) -> zmq.Socket[bytes]:
    """A bare DEALER on the manager's mapper socket: no Attach, 5 s receive timeout."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"ipc://{manager.runtime_dir / 'mapper.ipc'}")
    return sock


def test_garbage_on_the_mapper_socket(manager: RunningManager) -> None:
    ctx = zmq.Context()
    try:
        sock = mapper_dealer(ctx, manager)
        cases = [
            ([b"\xc1"], "malformed"),
            ([encode(m.SendMappings(membacking.MemoryRange(0, 4096)))], "not-attached"),
            ([encode(m.Attach(1, b"\0" * 16, 0))], "bad-token"),
            ([encode(m.Hello("x"))], "wrong-channel"),
            ([b"a", b"b"], "malformed"),
            ([msgpack.packb([1, 12, 1, 4096])], "bad-range"),
        ]
        for frames, code in cases:
            sock.send_multipart(frames)
            reply = membacking.protocol.decode(sock.recv(), m.Channel.MAPPER)
            assert isinstance(reply, m.Error) and reply.code == code, (frames, reply)
        sock.close()
    finally:
        ctx.term()
    still_serving(manager)


def test_oversized_messages_on_the_mapper_socket(manager: RunningManager) -> None:
    """Many frames are refused as malformed without being kept; a frame over the protocol's
    limit gets "too-large"; one over the socket's limit disconnects its sender. The manager
    serves on."""
    ctx = zmq.Context()
    try:
        sock = mapper_dealer(ctx, manager)
        sock.send_multipart([b"x"] * 20_000)
        reply = membacking.protocol.decode(sock.recv(), m.Channel.MAPPER)
        assert isinstance(reply, m.Error) and reply.code == "malformed"
        sock.send(b"\x90" * (100 * 1024))
        reply = membacking.protocol.decode(sock.recv(), m.Channel.MAPPER)
        assert isinstance(reply, m.Error) and reply.code == "too-large"
        sock.send(b"\x90" * (2 << 20))  # over MAXMSGSIZE: libzmq drops the connection
        sock.setsockopt(zmq.RCVTIMEO, 500)
        with pytest.raises(zmq.Again):
            sock.recv()
    finally:
        ctx.destroy(linger=0)
    still_serving(manager)


def test_a_stranger_that_keeps_sending_garbage_is_ignored(manager: RunningManager) -> None:
    from membacking.manager.fdserver import MAX_STRIKES

    ctx = zmq.Context()
    try:
        endpoint = f"ipc://{manager.runtime_dir / 'mapper.ipc'}"
        pest, other = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock in (pest, other):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        for _ in range(MAX_STRIKES):
            pest.send(b"\xc1")
            assert pest.poll(5000)
            reply = decode(pest.recv(), Channel.MAPPER)
            assert isinstance(reply, m.Error) and reply.code == "malformed"
            assert not reply.message.endswith(": "), reply.message  # says what was wrong
        for _ in range(2):  # from now on it is not worth an answer
            pest.send(encode(m.SendMappings(MemoryRange(0, 4096))))
        assert not pest.poll(500)
        assert manager.client().stats()["rejected"]["ignored"] == 2
        other.send(b"\xc1")  # another peer is still answered
        assert other.poll(5000)
        assert isinstance(decode(other.recv(), Channel.MAPPER), m.Error)
        pest.close()
        other.close()
    finally:
        ctx.term()
    still_serving(manager)


def test_garbage_on_the_control_socket(manager: RunningManager) -> None:
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(f"ipc://{manager.runtime_dir / 'control.ipc'}")
        # each answered with the code of its refusal, as on the mapper channels (§2, §11)
        for data, code in (
            (b"\x00\x01", "malformed"),
            (msgpack.packb([1, 30, "explode", {}]), "bad-request"),  # decodes: an unknown op
            (msgpack.packb([1, 30, "add_region", {"name": "x"}]), "bad-request"),
            (msgpack.packb([1, 30, "regions", {"x": [1, 2]}]), "bad-field"),
            (msgpack.packb([1, 30, "add region", {}]), "bad-field"),  # op breaks the name rule
            (msgpack.packb([1, 30]), "bad-arity"),
            (encode(m.Detach()), "wrong-channel"),
        ):
            req.send(data)
            reply = membacking.protocol.decode(req.recv(), m.Channel.CONTROL, max_bytes=1 << 20)
            assert isinstance(reply, m.Error) and reply.code == code, (data, reply)
        req.close()
        raw = ctx.socket(zmq.DEALER)  # no REQ envelope at all: dropped and counted
        raw.setsockopt(zmq.LINGER, 2000)
        raw.connect(f"ipc://{manager.runtime_dir / 'control.ipc'}")
        raw.send(b"junk")
        raw.close()
    finally:
        ctx.term()
    time.sleep(0.2)
    stats = manager.client().stats()
    assert stats["rejected"].get("malformed", 0) >= 2
    still_serving(manager)


def _next_on_stream(hand: HandMapper) -> m.Message:
    assert hand.stream.poll(5000)
    return decode(hand.stream.recv(), Channel.MAPPER)


@pytest.mark.parametrize("junk", [[b"a", b"b"], [b"\xc1"]], ids=["two frames", "not msgpack"])
def test_undecodable_messages_on_a_stream_evict_its_mapper(
    manager: RunningManager, junk: list[bytes]
) -> None:
    """Every undecodable message on an attached mapper's stream, a message of two frames as much
    as bytes that are not msgpack, is a strike of that mapper, logged with its id and pid; the
    8th evicts it, counted in `evictions` and `evictions_invalid`. Its DEALER is then an
    unattached peer."""
    from membacking.manager.fdserver import MAX_STRIKES

    hand = HandMapper(manager.runtime_dir, "striker")
    mapper_id = hand.welcome.mapper_id
    try:
        for _ in range(MAX_STRIKES):
            hand.stream.send_multipart(junk)
            reply = _next_on_stream(hand)
            assert isinstance(reply, m.Error) and reply.code == "malformed", reply
        shutdown = _next_on_stream(hand)
        assert isinstance(shutdown, m.Shutdown) and shutdown.reason.startswith("evicted"), shutdown
        hand.fd_sock.settimeout(5)
        while hand.fd_sock.recv(65536):  # its Shutdown, then the end of the fd socket
            pass
        stats = manager.client().stats()
        assert stats["evictions"] == 1 and stats["evictions_invalid"] == 1, stats
        assert stats["mappers"] == 0
        log = manager.log()
        assert f"mapper {mapper_id} (striker, pid {os.getpid()}) evicted" in log
        assert "unknown pid" not in log
        hand.stream.send(encode(m.SetEager()))  # no longer attached
        reply = _next_on_stream(hand)
        assert isinstance(reply, m.Error) and reply.code == "not-attached", reply
    finally:
        hand.close()
    still_serving(manager)


def test_invalid_messages_on_fd_sock_evict_a_registered_mapper(manager: RunningManager) -> None:
    from membacking.manager.fdserver import MAX_STRIKES

    hand = HandMapper(manager.runtime_dir, "fdstriker")
    try:
        for _ in range(MAX_STRIKES):
            hand.fd_sock.send(b"\xc1")
        got = []
        while data := hand.fd_sock.recv(65536):
            got.append(decode(data, Channel.FD))
        assert isinstance(got[-1], m.Shutdown) and got[-1].reason.startswith("evicted"), got
        stats = manager.client().stats()
        assert stats["evictions"] == 1 and stats["evictions_invalid"] == 1, stats
        assert f"mapper {hand.welcome.mapper_id} (fdstriker, pid {os.getpid()}) evicted" in (
            manager.log()
        )
    finally:
        hand.close()


def test_a_request_on_fd_sock_after_detach_ends_the_socket(manager: RunningManager) -> None:
    """After Detach nothing is answered on the fd socket: a request sent there anyway (which
    would wait for an answer that never comes) ends the connection, and the daemon serves on."""
    hand = HandMapper(manager.runtime_dir, "detacher")
    try:
        hand.stream.send(encode(m.Detach()))
        deadline = time.monotonic() + 5
        while manager.client().stats()["mappers"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert manager.client().stats()["mappers"] == 0
        send_message(hand.fd_sock, m.SendMappings(MemoryRange(0, 4096), 5))
        hand.fd_sock.settimeout(5)
        assert hand.fd_sock.recv(65536) == b""  # the end of the socket, not a wait
    finally:
        hand.close()
    assert not manager.client().stats()["rejected"]
    still_serving(manager)


def test_holdings_without_reattach_are_answered_with_an_error(manager: RunningManager) -> None:
    """A mapper that did not negotiate REATTACH (this one offered no features) sending
    Holdings or PackedHoldings gets Error(unexpected) saying so, each a strike: the 8th such
    message evicts it."""
    from membacking.manager.fdserver import MAX_STRIKES

    hand = HandMapper(manager.runtime_dir, "holder")
    try:
        for i in range(MAX_STRIKES):
            holdings = m.Holdings((), ()) if i % 2 else m.PackedHoldings(b"", b"")
            send_message(hand.fd_sock, holdings)
            reply, fds = recv_message(hand.fd_sock)
            assert isinstance(reply, m.Error) and reply.code == "unexpected", reply
            assert "REATTACH" in reply.message and not fds, reply
        shutdown, _ = recv_message(hand.fd_sock)
        assert isinstance(shutdown, m.Shutdown) and shutdown.reason.startswith("evicted")
        assert hand.fd_sock.recv(65536) == b""
        stats = manager.client().stats()
        assert stats["rejected"]["unexpected"] == MAX_STRIKES, stats
        assert stats["evictions_invalid"] == 1 and stats["mappers"] == 0, stats
        assert "needs the REATTACH feature" in manager.log()
    finally:
        hand.close()
    still_serving(manager)
