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


def peak_rss(pid: int) -> int:
    """The process's VmHWM, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


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
