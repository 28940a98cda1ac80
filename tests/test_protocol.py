"""Pure protocol logic: MemoryRange, RangeMap (against a brute-force model), every message's
round trip and rejections, SCM_RIGHTS helpers on a real socketpair, and the operator's units."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membacking import units
from membacking.protocol import ProtocolError, decode, encode
from membacking.protocol import messages as m
from membacking.protocol.fdpass import PeerClosed, recv_message, recv_raw, send_message
from membacking.protocol.messages import Channel
from membacking.protocol.rangemap import OverlapError, RangeMap
from membacking.protocol.ranges import MAX_ADDRESS, MemoryRange

P = 4096


# ---- MemoryRange ---------------------------------------------------------------------------


def test_memory_range_validation() -> None:
    assert MemoryRange(0, P).len == P
    for start, end, text in (
        (P, 0, "above its end"),
        (1, P, "not aligned"),
        (-P, 0, "outside"),
        (0, MAX_ADDRESS + P, "outside"),
    ):
        with pytest.raises(ValueError, match=text):
            MemoryRange(start, end)
    with pytest.raises(ValueError, match="integers"):
        MemoryRange(True, P)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overflows"):
        MemoryRange.from_size(MAX_ADDRESS - P, 2 * P)
    assert MemoryRange.bounding(P + 1, 2 * P + 1) == MemoryRange(P, 3 * P)
    assert MemoryRange.bounding(P, P).is_empty()


def test_memory_range_relations() -> None:
    a, b = MemoryRange(0, 4 * P), MemoryRange(2 * P, 6 * P)
    assert a.overlaps(b) and not a.overlaps(MemoryRange(4 * P, 5 * P))
    assert a.intersection(b) == MemoryRange(2 * P, 4 * P)
    assert a.intersection(MemoryRange(8 * P, 9 * P)).is_empty()
    assert a.subtract(MemoryRange(P, 2 * P)) == [MemoryRange(0, P), MemoryRange(2 * P, 4 * P)]
    assert a.subtract(b) == [MemoryRange(0, 2 * P)]
    assert a.subtract(MemoryRange(0, 8 * P)) == []
    assert a.contains(MemoryRange(P, 2 * P)) and not a.contains(b)
    assert a.contains_addr(4 * P - 1) and not a.contains_addr(4 * P)
    assert str(MemoryRange(0x1000, 0x2000)) == "0x1000-0x2000"


# ---- RangeMap ------------------------------------------------------------------------------


def test_range_map_basics() -> None:
    rm: RangeMap[str] = RangeMap()
    rm.insert(MemoryRange(2 * P, 4 * P), "a")
    rm.insert(MemoryRange(6 * P, 8 * P), "b")
    with pytest.raises(OverlapError, match="overlaps"):
        rm.insert(MemoryRange(3 * P, 7 * P), "c")
    assert rm.lookup(2 * P) == (MemoryRange(2 * P, 4 * P), "a")
    assert rm.lookup(4 * P) is None and rm.lookup(0) is None
    assert [v for _, v in rm.overlapping(MemoryRange(3 * P, 7 * P))] == ["a", "b"]
    walk = list(rm.walk(MemoryRange(P, 10 * P)))
    assert walk == [
        (MemoryRange(P, 2 * P), None),
        (MemoryRange(2 * P, 4 * P), "a"),
        (MemoryRange(4 * P, 6 * P), None),
        (MemoryRange(6 * P, 8 * P), "b"),
        (MemoryRange(8 * P, 10 * P), None),
    ]
    # an entry that starts before the walked range is yielded whole, with no gap before it
    assert list(rm.walk(MemoryRange(3 * P, 5 * P))) == [
        (MemoryRange(2 * P, 4 * P), "a"),
        (MemoryRange(4 * P, 5 * P), None),
    ]
    assert rm.remove(MemoryRange(2 * P, 4 * P)) == "a"
    with pytest.raises(KeyError):
        rm.remove(MemoryRange(2 * P, 4 * P))
    with pytest.raises(ValueError):
        rm.insert(MemoryRange(0, 0), "empty")


def test_range_map_inserts_a_sorted_run_at_once_or_one_by_one() -> None:
    """`insert_sorted` puts a run in one gap with one slice; a run across an entry goes one
    by one, and one overlapping an entry is refused as `insert` refuses it."""
    rm: RangeMap[str] = RangeMap()
    rm.insert(MemoryRange(10 * P, 11 * P), "x")
    rm.insert_sorted([(MemoryRange(2 * P, 3 * P), "a"), (MemoryRange(4 * P, 6 * P), "b")])
    rm.insert_sorted([(MemoryRange(8 * P, 9 * P), "c"), (MemoryRange(12 * P, 13 * P), "d")])
    assert [(r.start // P, v) for r, v in rm.items()] == [
        (2, "a"),
        (4, "b"),
        (8, "c"),
        (10, "x"),
        (12, "d"),
    ]
    assert rm.lookup(12 * P) == (MemoryRange(12 * P, 13 * P), "d")
    with pytest.raises(OverlapError):
        rm.insert_sorted([(MemoryRange(0, P), "e"), (MemoryRange(5 * P, 7 * P), "f")])
    with pytest.raises(OverlapError):
        rm.insert_sorted([(MemoryRange(9 * P, 10 * P), "g"), (MemoryRange(10 * P, 11 * P), "h")])
    rm.insert_sorted([])
    assert len(rm) == 7  # (each refused run's ranges before its overlap went in)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.integers(1, 6)), max_size=40),
    st.lists(st.integers(0, 40), max_size=20),
)
def test_range_map_matches_a_brute_force_model(
    ops: list[tuple[bool, int, int]], probes: list[int]
) -> None:
    rm: RangeMap[int] = RangeMap()
    model: dict[int, int] = {}  # page -> value
    entries: dict[MemoryRange, int] = {}
    for i, (insert, start, size) in enumerate(ops):
        rng = MemoryRange(start * P, (start + size) * P)
        pages = range(start, start + size)
        if insert:
            if any(p in model for p in pages):
                with pytest.raises(OverlapError):
                    rm.insert(rng, i)
            else:
                rm.insert(rng, i)
                entries[rng] = i
                model.update((p, i) for p in pages)
        elif rng in entries:
            assert rm.remove(rng) == entries.pop(rng)
            for p in pages:
                del model[p]
    for page in probes:
        hit = rm.lookup(page * P + 5)
        assert (hit[1] if hit else None) == model.get(page)
    assert [v for _, v in rm.items()] == [entries[r] for r in sorted(entries)]


# ---- codec ---------------------------------------------------------------------------------

TOKEN = bytes(range(16))
R = MemoryRange(P, 3 * P)
EXAMPLES: list[m.Message] = [
    m.Hello("mapper-1"),
    m.Hello("mapper-1", m.SUPPORTED_FEATURES),
    m.Welcome(1, TOKEN, 1 << 40, P),
    m.Welcome(1, TOKEN, 1 << 40, P, 0),
    m.Welcome(1, TOKEN, 1 << 40, P, m.SUPPORTED_FEATURES, TOKEN),
    m.Holdings((7, 64769, 12), (0, P, 7, 0, 1)),
    m.PackedHoldings(bytes(24), bytes(40)),
    m.FdGrant(7, 2 * P, False),
    m.FdDenied(7, "gone"),
    m.Error("bad-request", "why"),
    m.Error("not-attached", "why", 9),
    m.Attach(1, TOKEN, m.ROLE_REQUESTS),
    m.Attached(0),
    m.SendMappings(R),
    m.SendMappings(R, 9),
    m.ResendFd(7),
    m.ResendFd(7, 9),
    m.Map(R, 7, P, True),
    m.NoMapping(R),
    m.Unmap(3, R, (7, 8)),
    m.UnmapAck(3),
    m.Detach(),
    m.DetachAck(),
    m.Shutdown("bye"),
    m.Shutdown("bye", m.SHUTDOWN_RESTARTING),
    m.Release(4, (7,)),
    m.SetEager(),
    m.EagerResult(False, "no"),
    m.MapEager(5, R, 7, 0, True),
    m.MapAck(5, True, ""),
    m.ControlRequest("add_region", {"name": "a", "size": P, "readonly": None}),
    m.ControlReply({"nested": [1, {"x": b"y"}]}),
]


def test_every_message_type_has_an_example() -> None:
    assert {type(x) for x in EXAMPLES} == set(m.ALL_MESSAGES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    channel = next(iter(msg.CHANNELS))
    assert decode(encode(msg), channel) == msg


def test_the_layouts_of_the_earlier_release_decode_with_optional_fields_absent() -> None:
    """Peers of the earlier release send Hello, Welcome and Shutdown without the trailing
    fields added since; they decode with those fields None."""
    assert decode(raw(1, 1, "old"), Channel.FD) == m.Hello("old", None)
    assert decode(raw(1, 2, 7, TOKEN, 1 << 40, P), Channel.FD) == m.Welcome(7, TOKEN, 1 << 40, P)
    assert decode(raw(1, 18, "bye"), Channel.MAPPER) == m.Shutdown("bye", None)
    # and a message without optional fields is sent in exactly that layout
    assert msgpack.unpackb(encode(m.Hello("old"))) == [1, 1, "old"]
    assert msgpack.unpackb(encode(m.Shutdown("bye"))) == [1, 18, "bye"]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_unknown_trailing_fields_are_accepted_and_ignored(msg: m.Message) -> None:
    """A later revision may append fields to any message: this decoder ignores them (it no
    longer answers bad-arity), whatever their msgpack type."""
    channel = next(iter(msg.CHANNELS))
    items = msgpack.unpackb(encode(msg), raw=False)
    wire_len = 2 + sum(2 if k is m.Kind.RANGE else 1 for _, k in type(msg).FIELDS)
    valid = {m.Kind.U64: 0, m.Kind.NAME: m.SHUTDOWN_STOPPING, m.Kind.TOKEN: TOKEN}
    for _, kind in type(msg).FIELDS[len(items) - wire_len :] if len(items) < wire_len else ():
        items.append(valid[kind])  # the absent optional fields, sent: the extras come after
    extended = raw(*items, "later", [1, 2], {"k": 3}, None)
    got = decode(extended, channel)
    assert type(got) is type(msg)
    assert decode(raw(*items), channel) == got


def test_an_optional_field_cannot_follow_an_absent_one() -> None:
    @dataclass(frozen=True, slots=True)
    class Two(m.Message):
        TYPE = 18  # borrowed: only the plan is exercised
        FIELDS = (("a", m.Kind.TEXT), ("b", m.Kind.U64), ("c", m.Kind.U64))
        REQUIRED = 1
        CHANNELS = frozenset({Channel.MAPPER})
        a: str
        b: int | None = None
        c: int | None = None

    from membacking.protocol.codec import _Plan

    plan = _Plan(Two)
    assert plan.flatten(Two("x", 1)) == [1, 18, "x", 1]
    assert plan.flatten(Two("x")) == [1, 18, "x"]
    with pytest.raises(ValueError, match="set after an absent one"):
        plan.flatten(Two("x", None, 2))
    assert plan.build([1, 18, "x"]) == plan.build_checked([1, 18, "x"]) == Two("x")
    assert plan.build([1, 18, "x", 5]) == plan.build_checked([1, 18, "x", 5]) == Two("x", 5)


def test_encoding_an_unregistered_message_says_so() -> None:
    @dataclass(frozen=True, slots=True)
    class Stray(m.Message):
        TYPE = 99

    with pytest.raises(TypeError, match="Stray is not a registered protocol message"):
        encode(Stray())


def raw(*items: object) -> bytes:
    data: bytes = msgpack.packb(list(items), use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("data", "channel", "reason"),
    [
        (raw(2, 1, "x"), Channel.FD, "version"),
        (raw(1, 99), Channel.FD, "unknown-type"),
        (raw(1, 13, P, P, 1, 0, True), Channel.FD, "wrong-channel"),
        (raw(1, 1), Channel.FD, "bad-arity"),
        (raw(1, 2, 1, TOKEN, P), Channel.FD, "bad-arity"),
        (raw(1, 1, "a", -1), Channel.FD, "bad-field"),
        (raw(1, 1, "a", None), Channel.FD, "bad-field"),  # absent is not nil
        (raw(1, 18, "x", "has space"), Channel.MAPPER, "bad-field"),
        (raw(1, 16, True), Channel.MAPPER, "bad-field"),
        (raw(1, 16, -1), Channel.MAPPER, "bad-field"),
        (raw(1, 16, 1.0), Channel.MAPPER, "bad-field"),
        (raw(1, 12, 1, P), Channel.MAPPER, "bad-range"),
        (raw(1, 12, 0, 0), Channel.MAPPER, "bad-range"),
        (raw(1, 12, MAX_ADDRESS - P, 2 * P), Channel.MAPPER, "bad-range"),
        (raw(1, 1, "has space"), Channel.FD, "bad-field"),
        (raw(1, 1, "x" * 65), Channel.FD, "bad-field"),
        (raw(1, 1, ""), Channel.FD, "bad-field"),
        (raw(1, 10, 1, b"short", 0), Channel.MAPPER, "bad-field"),
        (raw(1, 15, 1, 0, P, list(range(1025))), Channel.MAPPER, "bad-field"),
        (raw(1, 30, "op", {"k": [1]}), Channel.CONTROL, "bad-field"),
        (raw(1, 30, "op", {"k": 1.5}), Channel.CONTROL, "bad-field"),
        (b"\x92\x01", Channel.FD, "malformed"),
        (b"\xc1", Channel.FD, "malformed"),
        (raw(1, 1, "a") + b"\x00", Channel.FD, "malformed"),
        (msgpack.packb({"v": 1}), Channel.FD, "malformed"),
        (msgpack.packb([1, 1, msgpack.ExtType(1, b"x")]), Channel.FD, "malformed"),
        (b"", Channel.FD, "malformed"),
        (b"\x91" + b"\xa1x" * 1, Channel.FD, "malformed"),
    ],
)
def test_rejections(data: bytes, channel: Channel, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(data, channel)
    assert err.value.reason == reason, str(err.value)


def test_size_limit_and_sender() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(b"\x00" * 70000, Channel.FD)
    assert err.value.reason == "too-large"
    with pytest.raises(ProtocolError, match="may not be sent by a mapper") as sent:
        decode(encode(m.FdGrant(1, P, True)), Channel.FD, sender="mapper")
    assert sent.value.reason == "wrong-sender"
    assert decode(encode(m.FdGrant(1, P, True)), Channel.FD, sender="manager")


def test_documented_example_decodes() -> None:
    assert decode(raw(1, 13, 1048576, 4194304, 7, 0, True), Channel.MAPPER) == m.Map(
        MemoryRange(0x100000, 0x500000), 7, 0, True
    )


# ---- SCM_RIGHTS ----------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fd_grant_carries_a_working_fd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    memfd = os.memfd_create("grant")
    try:
        os.ftruncate(memfd, P)
        send_message(a, m.FdGrant(1, P, True), [memfd])
        msg, fds = recv_message(b)
        assert msg == m.FdGrant(1, P, True) and len(fds) == 1
        os.pwrite(memfd, b"shared", 0)
        assert os.pread(fds[0], 6, 0) == b"shared"
        os.close(fds[0])
        with pytest.raises(ValueError, match="travels with 1 fds"):
            send_message(a, m.FdGrant(1, P, True))
    finally:
        os.close(memfd)
        a.close()
        b.close()


def test_unexpected_fds_are_closed_on_receipt() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    memfds = [os.memfd_create(f"x{i}") for i in range(3)]
    try:
        before = open_fds()
        socket.send_fds(a, [encode(m.Hello("x"))], memfds)  # Hello takes none
        with pytest.raises(ProtocolError) as err:
            recv_message(b)
        assert err.value.reason == "fd-count" and open_fds() == before
        socket.send_fds(a, [b"\xc1"], memfds[:1])  # garbage with an fd
        with pytest.raises(ProtocolError):
            recv_message(b)
        assert open_fds() == before
        send_message(a, m.FdGrant(1, P, True), memfds[:1])
        socket.send_fds(a, [encode(m.FdGrant(1, P, True))], memfds[:2])  # two instead of one
        msg, fds = recv_message(b)
        assert isinstance(msg, m.FdGrant)
        os.close(fds[0])
        with pytest.raises(ProtocolError, match="must carry 1 fds, got 2"):
            recv_message(b)
        assert open_fds() == before
    finally:
        for fd in memfds:
            os.close(fd)
        a.close()
        b.close()


def test_oversize_and_end_of_stream() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.send(b"\x00" * 70000)
    with pytest.raises(ProtocolError) as err:
        recv_raw(b)
    assert err.value.reason == "too-large"
    a.close()
    with pytest.raises(PeerClosed):
        recv_raw(b)
    b.close()


# ---- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("4k", 4096),
        ("16MiB", 16 << 20),
        ("1_000", 1000),
        ("0x10M", 16 << 20),
        (" 8K ", 8192),
        ("64Mi", 64 << 20),  # as QEMU and Kubernetes spell it
        ("2MB", 2 << 20),  # powers of 1024 all the same
        ("4096B", 4096),
        ("0x1000B", 0x1000B),  # a hex digit, not bytes
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert units.parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "lots", "1.5G", "0x", "64Q", "1 G B", "0x_", "1__0", "-x", "2i", "B", "4Mx"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        units.parse_size(text)


@pytest.mark.parametrize("text", ["-1", "-0x10", "-4K"])
def test_parse_size_says_a_negative_number_is_negative(text: str) -> None:
    with pytest.raises(ValueError, match=f"^address '{text}' must not be negative$"):
        units.parse_size(text, "address")


def test_specs_and_names() -> None:
    assert units.parse_region_spec("ram0=0:64M") == ("ram0", 0, 64 << 20, False)
    assert units.parse_region_spec("rom=0xfff00000:1M:ro") == ("rom", 0xFFF00000, 1 << 20, True)
    for bad, text in (
        ("ram0", "expected NAME=GPA:SIZE"),
        ("r=0:1M:rw", "must be 'ro'"),
        ("a b=0:1M", "invalid name"),
        ("r=0", "expected GPA:SIZE"),
    ):
        with pytest.raises(ValueError, match=text):
            units.parse_region_spec(bad)
    assert units.parse_range_spec("0x1000:4K") == (4096, 4096)
    assert units.format_size(4096) == "4 KiB" and units.format_size(1536) == "1.5 KiB"
    assert units.format_size(100) == "100 B" and units.format_size(3 << 40) == "3 TiB"


@pytest.mark.parametrize(
    ("version", "said"),
    [
        (2, "unsupported protocol version 2 (this side speaks 1)"),
        (True, "the protocol version is a msgpack boolean, not an integer"),
        ("1", "the protocol version is a msgpack string, not an integer"),
        (None, "the protocol version is a msgpack nil, not an integer"),
    ],
)
def test_a_bad_version_is_told_in_msgpacks_words(version: object, said: str) -> None:
    """The reply goes to a peer in any language: no Python repr (`True`, `'1'`) in it."""
    with pytest.raises(ProtocolError) as refused:
        decode(raw(version, 1, "probe"), Channel.FD)
    assert refused.value.reason == "version" and said in str(refused.value), refused.value
