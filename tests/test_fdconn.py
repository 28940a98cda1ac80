"""The fd-socket connection's outbox, on a real SEQPACKET socket pair: sends never block, what
does not fit waits in order with its own fd duplicates, and nothing leaks."""

from __future__ import annotations

import os
import socket
from collections import deque

import pytest

from membacking.manager.fdconn import FdConn, OutboxFull
from membacking.protocol import messages as m
from membacking.protocol.fdpass import recv_message


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connection() -> tuple[FdConn, socket.socket, int]:
    """A connection on our end of a SEQPACKET pair, the peer's end, and a memfd to send."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return FdConn(ours, pid=0, uid=0), theirs, os.memfd_create("t")


def test_outbox_keeps_order_and_fds_until_the_peer_reads() -> None:
    conn, theirs, memfd = connection()
    before = open_fds()
    sent = 0
    while not conn.send(m.FdGrant(sent + 1, 4096, True), memfd, max_waiting=10_000):
        sent += 1  # straight into the socket buffer
    waiting = 1 + sum(
        conn.send(m.FdGrant(sent + 2 + i, 4096, True), memfd, 10_000) for i in range(9)
    )
    assert waiting == 10 and len(conn.outbox) == 10
    assert open_fds() == before + 10  # each waiting message holds its own duplicate
    with pytest.raises(OutboxFull):  # ten fds wait: no eleventh
        conn.send(m.FdGrant(999, 4096, True), memfd, max_waiting=10)
    assert conn.send(m.FdDenied(998, "limit"), None, max_waiting=10)  # a denial still may
    sent += 1
    received = []
    theirs.settimeout(1)
    while len(received) < sent + 10:
        conn.flush()  # moves what waits as the peer makes room
        msg, fds = recv_message(theirs)
        received.append(msg.mappable_id)  # type: ignore[attr-defined]
        for fd in fds:
            os.close(fd)
    assert conn.flush() and not conn.outbox
    assert received == [*range(1, sent + 10), 998]  # in order, none lost
    assert open_fds() == before
    conn.close()
    theirs.close()
    os.close(memfd)


def test_close_releases_what_waits() -> None:
    conn, theirs, memfd = connection()
    before = open_fds()
    while not conn.send(m.FdGrant(1, 4096, True), memfd, 100):
        pass
    for _ in range(5):
        conn.send(m.FdGrant(1, 4096, True), memfd, 100)
    conn.close()
    theirs.close()  # the datagrams in flight, and their fds, go with it
    assert open_fds() == before - 2  # both ends of the pair, and every waiting duplicate
    os.close(memfd)


def test_a_grant_asked_for_again_while_one_waits_is_not_duplicated() -> None:
    """A peer sending ResendFd of one fd over and over, reading nothing: each answer held a
    duplicate of the fd in the outbox, 4,104 a mapper, so five such peers held the daemon at its
    open-file limit. The grant waiting already answers them; another mappable's still waits."""
    conn, theirs, memfd = connection()
    while not conn.send(m.FdGrant(1, 4096, True), memfd, max_waiting=100):
        pass
    before = open_fds()
    for _ in range(500):
        assert conn.send(m.FdGrant(7, 4096, True), memfd, max_waiting=100)
    assert conn.send(m.FdGrant(8, 4096, True), memfd, max_waiting=100)
    assert conn.outbox_fds == 3 and open_fds() == before + 2  # (1 waited already)
    theirs.settimeout(1)
    got = []
    while not conn.flush() or len(got) < 2:
        msg, fds = recv_message(theirs)
        got += [msg.mappable_id] if msg.mappable_id != 1 else []  # type: ignore[attr-defined]
        for fd in fds:
            os.close(fd)
    assert got == [7, 8] and not conn.outbox_grants
    assert conn.send(m.FdGrant(7, 4096, True), memfd, max_waiting=100) is False  # sent again
    conn.close()
    theirs.close()
    os.close(memfd)


class _Unwalkable(deque):  # type: ignore[type-arg]
    """An outbox that fails any walk over it: what a send may do is append and ask its length."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the outbox was walked")

    def plain(self) -> deque:  # type: ignore[type-arg]
        return deque(super().__iter__())


def test_a_send_behind_a_long_outbox_does_not_walk_it() -> None:
    """A peer that never reads (say, one flooding requests it is answered Error to): each send
    behind its outbox costs the same however long that is. It walked the whole outbox to count
    the fds in it, so the daemon's CPU per message grew with the backlog (156 to 828 us in a
    trial), 65,664 messages deep by default. The count is kept as entries come and go."""
    conn, theirs, memfd = connection()
    while not conn.send(m.FdDenied(1, "x"), None, max_waiting=100):
        pass
    conn.outbox = _Unwalkable(conn.outbox)
    for i in range(1000):
        conn.send(m.FdDenied(i, "x"), None, max_waiting=100)
    for i in range(100):
        conn.send(m.FdGrant(i + 1, 4096, True), memfd, max_waiting=100)
    assert conn.outbox_fds == 100
    with pytest.raises(OutboxFull):  # a hundred and first fd: no room
        conn.send(m.FdGrant(101, 4096, True), memfd, max_waiting=100)
    while len(conn.outbox) < 1600:  # small messages may wait 16 x as many
        assert conn.send(m.FdDenied(2, "x"), None, max_waiting=100)
    with pytest.raises(OutboxFull):
        conn.send(m.FdDenied(2, "x"), None, max_waiting=100)
    conn.outbox = conn.outbox.plain()  # the peer reads again: all goes, the count with it
    theirs.settimeout(1)
    while not conn.flush():
        for fd in recv_message(theirs)[1]:
            os.close(fd)
    assert conn.outbox_fds == 0
    conn.close()
    theirs.close()
    os.close(memfd)
