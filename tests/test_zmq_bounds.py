"""What unattached ZeroMQ peers can make the daemon hold: frames over the ROUTERs' MAXMSGSIZE
disconnect their sender before libzmq buffers them (docs/RELIABILITY.md, "Bad input")."""

from __future__ import annotations

import time

import zmq
from test_hostile_peers import still_serving

from membacking.manager import routers
from membacking.protocol import messages as m
from membacking.protocol.codec import MAX_MESSAGE_BYTES, encode

from conftest import RunningManager

MiB = 1 << 20


def peak_rss(pid: int, key: str = "VmHWM") -> int:
    """The process's VmHWM (or another `key` of /proc/PID/status in kB), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no {key}")


def flood(manager: RunningManager, endpoint: str, peers: int, frames: int, size: int) -> None:
    """`peers` DEALERs each send two messages of `frames` frames of `size` bytes (the same
    buffer, so the senders hold one copy), then close."""
    ctx = zmq.Context()
    try:
        payload = zmq.Frame(b"\x91\x00" + bytes(size - 2))
        head = [zmq.Frame(b"")] if endpoint == "control.ipc" else []
        socks = []
        for _ in range(peers):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{manager.runtime_dir / endpoint}")
            socks.append(sock)
        for _ in range(2):
            for sock in socks:
                sock.send_multipart(head + [payload] * frames, copy=False)
        time.sleep(1.5)  # what was sent has reached the daemon (or its sender was cut off)
        for sock in socks:
            sock.close()
    finally:
        ctx.destroy(linger=0)


def test_the_routers_take_no_frame_a_peer_may_not_send() -> None:
    """Nothing the daemon receives may exceed MAX_MESSAGE_BYTES (control replies are sent,
    not received); a frame just over it still gets its "too-large" reply."""
    assert MAX_MESSAGE_BYTES < routers.MAX_FRAME_BYTES <= 2 * MAX_MESSAGE_BYTES
    assert routers.RCVHWM <= 16
    ctx = zmq.Context()
    try:
        sock = routers.new_router(ctx)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == routers.MAX_FRAME_BYTES
        assert sock.getsockopt(zmq.RCVHWM) == routers.RCVHWM
        sock.close()
    finally:
        ctx.term()


def test_floods_of_large_frames_leave_the_daemon_memory_bounded(manager: RunningManager) -> None:
    """16 peers on each ROUTER sending messages of 24 frames of 900 KiB (about 21 MiB each) made
    the daemon's peak grow by hundreds of MiB while MAXMSGSIZE was 1 MiB; now the first frame
    cuts each sender off."""
    manager.client().stats()
    before = peak_rss(manager.pid)
    for endpoint in ("mapper.ipc", "control.ipc"):
        flood(manager, endpoint, peers=16, frames=24, size=900 << 10)
    grown = peak_rss(manager.pid) - before
    assert grown < 48 * MiB, f"the daemon's peak grew by {grown / MiB:.0f} MiB"
    still_serving(manager)


def test_a_control_client_that_reads_no_reply_holds_little_of_the_daemon(
    manager: RunningManager,
) -> None:
    """A DEALER sending `regions` requests without reading the replies (27 KB each with 300
    regions) grew the daemon by a gigabyte in 15 s: control.ipc queued 100,000 replies per
    peer. It queues 64 now; the rest are dropped, as for any peer that does not read."""
    client = manager.client()
    for i in range(150):
        client.add_region(f"r{i}", (1 << 32) + i * 0x10000, 0x10000)
    before = peak_rss(manager.pid)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(f"ipc://{manager.runtime_dir / 'control.ipc'}")
        request = [b"", encode(m.ControlRequest("regions", {}))]
        for _ in range(4000):
            sock.send_multipart(request)
        deadline, peak = time.monotonic() + 30, 0
        while time.monotonic() < deadline:  # until the daemon's peak stops growing
            time.sleep(1.0)
            if peak_rss(manager.pid) == peak:
                break
            peak = peak_rss(manager.pid)
        grown = peak_rss(manager.pid) - before
        assert grown < 24 * MiB, f"the daemon's peak grew by {grown / MiB:.0f} MiB"
        sock.close()
    finally:
        ctx.destroy(linger=0)
    still_serving(manager)


def rss(pid: int) -> int:
    return peak_rss(pid, "VmRSS")


def test_holdings_sent_before_attach_wait_in_the_peers_socket_not_in_the_daemon(
    manager: RunningManager,
) -> None:
    """PackedHoldings sent right behind an Attach are kept until it arrives: 64 of 64 KiB a
    peer, so 100 peers that registered and never attached held 400 MiB of the daemon for their
    unmap timeout. It keeps the first now, and reads that peer's fd.sock again once its stream
    is attached: the rest wait in the peer's socket. All of them are taken then."""
    import socket
    import struct

    from membacking.protocol.codec import decode
    from membacking.protocol.fdpass import recv_message, send_message
    from membacking.protocol.messages import Channel
    from membacking.runtime import RuntimePaths

    paths = RuntimePaths.resolve(manager.runtime_dir)
    features = m.FEATURE_REATTACH | m.FEATURE_PACKED_HOLDINGS
    mapping = struct.Struct(m.PACKED_MAPPING_FORMAT)
    per_message = 1500  # 60,000 bytes of made-up mappings a message

    def holdings(k: int) -> m.PackedHoldings:
        base = (1 << 36) + k * per_message * 4096
        return m.PackedHoldings(
            b"",
            b"".join(mapping.pack(base + i * 4096, 4096, 999, 0, 1) for i in range(per_message)),
        )

    before = rss(manager.pid)
    peers = []
    sent = []
    try:
        for p in range(30):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(5)
            sock.connect(str(paths.fd_socket))
            send_message(sock, m.Hello(f"early{p}", features))
            welcome, _ = recv_message(sock)
            assert isinstance(welcome, m.Welcome), welcome
            sock.setblocking(False)
            n = 0
            while n < 16:  # what the socket takes without the daemon reading it
                try:
                    send_message(sock, holdings(n))
                except BlockingIOError:
                    break
                n += 1
                time.sleep(0.01)  # (the daemon reads what it will meanwhile)
            peers.append((sock, welcome))
            sent.append(n)
        time.sleep(1.0)
        grown = rss(manager.pid) - before
        assert grown < 12 * MiB, f"the daemon grew by {grown / MiB:.0f} MiB for {sum(sent)} sent"
        assert max(sent) < 16  # (before: every one was read, and kept)
        # attached: the daemon reads the rest, and takes every message (an Unmap per entry)
        sock, welcome = peers[0]
        ctx = zmq.Context()
        try:
            stream = ctx.socket(zmq.DEALER)
            stream.connect(paths.mapper_endpoint)
            stream.send(encode(m.Attach(welcome.mapper_id, welcome.token, m.ROLE_STREAM_FD)))
            unmaps, deadline = 0, time.monotonic() + 20
            while unmaps < sent[0] * per_message and time.monotonic() < deadline:
                if stream.poll(200) and isinstance(decode(stream.recv(), Channel.MAPPER), m.Unmap):
                    unmaps += 1
            assert unmaps == sent[0] * per_message
            stream.close(0)
        finally:
            ctx.term()
    finally:
        for sock, _ in peers:
            sock.close()
    # their ends are seen while they wait, not at their unmap timeout (30 s): each held a slot
    # of --max-mappers (and with private RAM, every registration)
    deadline = time.monotonic() + 5
    while manager.client().mappers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert manager.client().mappers() == []
    still_serving(manager)
