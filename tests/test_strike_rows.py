"""Rows of strikes (docs/PROTOCOL.md §11.2) against real sockets: only a message the manager
acts on ends a row of invalid messages; one it refuses without a strike (an ack of an unknown
seq) does not, so alternating the two gets a mapper evicted all the same."""

from __future__ import annotations

import contextlib
import os

import membacking
from membacking.manager.fdserver import MAX_STRIKES
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.fdpass import recv_message, send_message
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange

from conftest import HandMapper, RunningManager


def _next_on_stream(hand: HandMapper) -> m.Message:
    assert hand.stream.poll(5000)
    return decode(hand.stream.recv(), Channel.MAPPER)


def still_serving(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir, name="probe") as memory:
        memory.write_at(0x10, b"alive")
        assert memory.read_at(0x10, 5) == b"alive"


#: an acknowledgement of a seq the manager never sent: refused unanswered, no strike
UNKNOWN_ACK = m.UnmapAck(10**9)


def test_acks_of_unknown_seqs_do_not_end_a_row_of_strikes_on_fd_sock(
    manager: RunningManager,
) -> None:
    """Only a message the manager acts on ends a row of invalid messages: a mapper alternating
    an invalid message with an ack of an unknown seq (refused, unanswered) is evicted at the
    8th invalid one. A request it serves ends the row."""
    hand = HandMapper(manager.runtime_dir, "alternator")

    def invalid_then_unknown_ack() -> None:
        hand.fd_sock.send(b"\xc1")
        reply, _ = recv_message(hand.fd_sock)
        assert isinstance(reply, m.Error) and reply.code == "malformed", reply
        send_message(hand.fd_sock, UNKNOWN_ACK)

    try:
        for _ in range(MAX_STRIKES - 1):
            invalid_then_unknown_ack()
        send_message(hand.fd_sock, m.SendMappings(MemoryRange(0, 4096)))  # served: the row ends
        assert isinstance(_next_on_stream(hand), m.Map)
        grant, fds = recv_message(hand.fd_sock)
        assert isinstance(grant, m.FdGrant) and len(fds) == 1
        os.close(fds[0])
        for _ in range(MAX_STRIKES - 1):
            invalid_then_unknown_ack()
        hand.fd_sock.send(b"\xc1")  # the 8th in a row, unknown acks in between
        got = []
        while data := hand.fd_sock.recv(65536):
            got.append(decode(data, Channel.FD))
        assert [type(x) for x in got] == [m.Error, m.Shutdown], got
        assert isinstance(got[-1], m.Shutdown) and got[-1].reason.startswith("evicted"), got
        stats = manager.client().stats()
        assert stats["evictions_invalid"] == 1 and stats["mappers"] == 0, stats
        assert stats["rejected"]["unknown-seq"] == 2 * (MAX_STRIKES - 1), stats
    finally:
        hand.close()
    still_serving(manager)


def test_acks_of_unknown_seqs_do_not_end_a_row_of_strikes_on_a_stream(
    manager: RunningManager,
) -> None:
    """The same on a mapper's stream (where acks are still accepted): undecodable messages
    alternated with acks of unknown seqs evict the mapper at the 8th undecodable one."""
    hand = HandMapper(manager.runtime_dir, "streamer")
    try:
        for _ in range(MAX_STRIKES):
            hand.stream.send(b"\xc1")
            reply = _next_on_stream(hand)
            assert isinstance(reply, m.Error) and reply.code == "malformed", reply
            hand.stream.send(encode(UNKNOWN_ACK))
        shutdown = _next_on_stream(hand)
        assert isinstance(shutdown, m.Shutdown) and shutdown.reason.startswith("evicted"), shutdown
        stats = manager.client().stats()
        assert stats["evictions_invalid"] == 1 and stats["mappers"] == 0, stats
        assert stats["rejected"]["unknown-seq"] == MAX_STRIKES - 1, stats  # the 8th: too late
    finally:
        hand.close()
    still_serving(manager)


def test_a_mapper_evicted_with_messages_still_unread_reads_its_shutdown(
    manager: RunningManager,
) -> None:
    """A mapper evicted for strikes while more of its messages waited unread in the manager's
    end: it reads every answer and the Shutdown, then the end of the connection. The manager
    closed with them unread, and the kernel reset the connection instead: the mapper's next
    read failed with ECONNRESET and the Errors and the Shutdown were lost."""
    hand = HandMapper(manager.runtime_dir, "burst")
    try:
        with contextlib.suppress(BrokenPipeError):  # (the manager may have closed already)
            for _ in range(MAX_STRIKES + 6):  # a burst, none of the answers read yet
                hand.fd_sock.send(b"\xc1")
        got = []
        hand.fd_sock.settimeout(10)
        while data := hand.fd_sock.recv(65536):
            got.append(decode(data, Channel.FD))
        assert isinstance(got[-1], m.Shutdown) and got[-1].reason.startswith("evicted"), got
        assert [type(x) for x in got[:-1]] == [m.Error] * MAX_STRIKES, got
    finally:
        hand.close()
    still_serving(manager)
