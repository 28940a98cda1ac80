"""PackedHoldings (FEATURE_PACKED_HOLDINGS): the entries of Holdings packed as little-endian
u64s, so a mapper registering again with 1,000 mappings sends one message instead of eight.
Decoded strictly, split by the size limit, checked by the manager exactly as Holdings."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from membacking.manager.backing import MemfdStore
from membacking.manager.errors import Refused
from membacking.manager.model import Send, SendFd
from membacking.manager.state import ManagerState, region_info
from membacking.manager.statedir import StateDir
from membacking.protocol import ProtocolError, decode, encode
from membacking.protocol import messages as m
from membacking.protocol.codec import MAX_MESSAGE_BYTES
from membacking.protocol.holdings import holdings_messages
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange

MiB = 1 << 20
P = 4096


def _entries(n: int) -> tuple[list[int], list[int]]:
    fds = [x for i in range(n) for x in (i + 1, 64769, 1000 + i)]
    maps = [x for i in range(n) for x in (i * MiB, MiB, i + 1, 0, 1)]
    return fds, maps


def _unpacked(msgs: list[Any]) -> tuple[list[int], list[int]]:
    fds: list[int] = []
    maps: list[int] = []
    for msg in msgs:
        fds += [x for t in struct.iter_unpack(m.PACKED_FD_FORMAT, msg.fds) for x in t]
        maps += [x for t in struct.iter_unpack(m.PACKED_MAPPING_FORMAT, msg.mappings) for x in t]
    return fds, maps


@pytest.mark.parametrize("n", [0, 1, 1000, 1500, 5000])
def test_packed_holdings_fit_the_size_limit_and_say_everything_fds_first(n: int) -> None:
    fds, maps = _entries(n)
    msgs = holdings_messages(fds, maps, packed=True)
    assert all(isinstance(x, m.PackedHoldings) for x in msgs)
    assert all(len(encode(x)) <= MAX_MESSAGE_BYTES for x in msgs)
    assert [decode(encode(x), Channel.FD, sender="mapper") for x in msgs] == msgs
    assert _unpacked(msgs) == (fds, maps)
    # every fd is told before the first mapping
    seen_maps = False
    for x in msgs:
        assert not (seen_maps and x.fds)
        seen_maps = seen_maps or bool(x.mappings)
    # as few messages as the limit allows: 1,000 regions in one (arrays took eight)
    per_message = (MAX_MESSAGE_BYTES - 64) // (24 + 40)
    assert len(msgs) <= max(1, -(-n // per_message) + 1)
    if n == 1000:
        assert len(msgs) == 1
        assert len(holdings_messages(fds, maps, packed=False)) == 8


def test_entries_packed_one_by_one_make_the_same_messages() -> None:
    """What a mapper packs entry by entry (its fds and chunks) is what the flat arrays give."""
    from membacking.protocol.holdings import pack_fds, pack_mappings, packed_messages

    fds, maps = _entries(1500)
    fd_entries = [tuple(fds[i : i + 3]) for i in range(0, len(fds), 3)]
    map_entries = [tuple(maps[i : i + 5]) for i in range(0, len(maps), 5)]
    packed = packed_messages(pack_fds(fd_entries), pack_mappings(map_entries))  # type: ignore[arg-type]
    assert packed == holdings_messages(fds, maps, packed=True)
    with pytest.raises(ValueError):
        packed_messages(bytes(23), b"")


def test_arrays_stay_within_1024_elements_for_a_manager_without_the_feature() -> None:
    fds, maps = _entries(1000)
    msgs = holdings_messages(fds, maps, packed=False)
    assert all(isinstance(x, m.Holdings) for x in msgs)
    assert all(len(x.fds) <= 1024 and len(x.mappings) <= 1024 for x in msgs)
    assert [x for msg in msgs for x in msg.fds] == fds
    assert [x for msg in msgs for x in msg.mappings] == maps
    assert holdings_messages([], [], packed=False) == [m.Holdings((), ())]
    with pytest.raises(ValueError):
        holdings_messages([1, 2], [], packed=True)


@pytest.mark.parametrize(
    "fields",
    [
        [b"1234567", b""],  # not whole u64s
        [b"", "text"],
        [[1, 2, 3], b""],
        [b""],  # one field missing
    ],
)
def test_packed_fields_are_refused_unless_whole_u64s(fields: list[Any]) -> None:
    data = msgpack.packb([1, m.PackedHoldings.TYPE, *fields], use_bin_type=True)
    with pytest.raises(ProtocolError) as err:
        decode(data, Channel.FD, sender="mapper")
    assert err.value.reason in ("bad-field", "bad-arity")


def _state(tmp_path: Path) -> tuple[ManagerState, MemfdStore, StateDir]:
    sdir = StateDir(tmp_path / "state")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    state.state_id = b"s" * 16
    state.add_region("a", 0, MiB, True)
    state.add_region("b", 2 * MiB, MiB, True)
    return state, store, sdir


def _registered(state: ManagerState, features: int | None = m.SUPPORTED_FEATURES) -> Any:
    entry = state.register_mapper(f"m{len(state.mappers)}", 1)
    state.welcome(entry, features)
    state.handle_mapper(f"s{entry.id}".encode(), m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    return entry


def test_packed_holdings_are_checked_exactly_as_holdings(tmp_path: Path) -> None:
    """The same claims, once as Holdings and once packed, by two mappers: the same fds kept
    and released, the same mappings kept and unmapped, the same holders recorded."""
    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    b_id = state.regions["b"].submappings[0].mappable_id
    identity = store.identity(a_id)
    assert identity is not None
    fds = [a_id, *identity, b_id, 1, 2]  # b's fd is not the file of b
    maps = [0, MiB, a_id, 0, 1, 2 * MiB, MiB, b_id, 0, 1, 8 * MiB, MiB, a_id, 0, 1]

    def answers(entry: Any, packed: bool) -> list[Any]:
        out: list[Any] = []
        for msg in holdings_messages(fds, maps, packed):
            wire = decode(encode(msg), Channel.FD, sender="mapper")
            out += [e.msg for e in state.handle_fd_message(entry.id, wire) or []]
        return out

    arrays, packed = _registered(state), _registered(state)
    for entry, sent in ((arrays, answers(arrays, False)), (packed, answers(packed, True))):
        # (arrays: the fds' Release answers the first message, before the mappings')
        assert sorted(type(x).__name__ for x in sent) == ["Release", "Unmap", "Unmap"]
        assert [x.range for x in sent if isinstance(x, m.Unmap)] == [
            MemoryRange(2 * MiB, 3 * MiB),
            MemoryRange(8 * MiB, 9 * MiB),
        ]
        assert [x.release for x in sent if isinstance(x, m.Release)] == [(b_id,)]
        assert list(entry.held) == [MemoryRange(0, MiB)]
        assert entry.fds_sent == {a_id}
    assert region_info(state, state.regions["a"])["holders"] == [arrays.id, packed.id]
    assert state.counters["reattached_mappings"] == 2
    out = state.remove_region("a")  # both are told, like any holder
    told = {e.identity for e in out if isinstance(e, Send) and isinstance(e.msg, m.Unmap)}
    assert told == {f"s{arrays.id}".encode(), f"s{packed.id}".encode()}
    store.close_all()
    sdir.release(remove=True)


def test_packed_holdings_need_the_feature_and_whole_entries(tmp_path: Path) -> None:
    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    identity = store.identity(a_id)
    assert identity is not None
    packed_fd = struct.pack(m.PACKED_FD_FORMAT, a_id, *identity)
    packed_map = struct.pack(m.PACKED_MAPPING_FORMAT, 0, MiB, a_id, 0, 1)
    without = _registered(state, m.SUPPORTED_FEATURES & ~m.FEATURE_PACKED_HOLDINGS)
    # refused: the daemon answers Error(code) on fd.sock and counts a strike (fdserver.py)
    with pytest.raises(Refused, match="PACKED_HOLDINGS feature") as refused:
        state.handle_fd_message(without.id, m.PackedHoldings(packed_fd, packed_map))
    assert refused.value.code == "unexpected" and len(without.held) == 0
    entry = _registered(state)
    for msg in (
        m.PackedHoldings(packed_fd[:16], b""),
        m.PackedHoldings(b"", packed_map + bytes(8)),
        m.Holdings((a_id, *identity, 7), ()),
        m.Holdings((), (0, MiB, a_id, 0)),
    ):
        with pytest.raises(Refused, match="whole entries") as refused:
            state.handle_fd_message(entry.id, msg)
        assert refused.value.code == "bad-field"
    assert len(entry.held) == 0
    assert not state.handle_fd_message(entry.id, m.PackedHoldings(packed_fd, packed_map))
    assert list(entry.held) == [MemoryRange(0, MiB)]
    store.close_all()
    sdir.release(remove=True)


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gains an item each time Holdings are checked against the table."""
    from membacking.manager import reattach

    checks: list[int] = []
    check = reattach._check

    def counted(*args: Any) -> Any:
        checks.append(1)
        return check(*args)

    monkeypatch.setattr(reattach, "_check", counted)
    return checks


def test_the_same_holdings_of_fresh_mappers_are_checked_once_per_state_of_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mappers that map the same memory tell the same bytes: the second fresh one reuses the
    first's check (each is still recorded as a holder), and any change of the table (or of the
    backings) checks again: a mapping removed meanwhile is unmapped from the next one."""

    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    b_id = state.regions["b"].submappings[0].mappable_id
    fds = [x for i in (a_id, b_id) for x in (i, *(store.identity(i) or (0, 0)))]
    maps = [0, MiB, a_id, 0, 1, 2 * MiB, MiB, b_id, 0, 1]
    (msg,) = holdings_messages(fds, maps, packed=True)
    checks = _count_checks(monkeypatch)
    first, second = _registered(state), _registered(state)
    assert state.handle_fd_message(first.id, msg) == []
    assert state.handle_fd_message(second.id, msg) == []
    assert len(checks) == 1
    for entry in (first, second):
        assert list(entry.held) == [MemoryRange(0, MiB), MemoryRange(2 * MiB, 3 * MiB)]
        assert entry.fds_sent == {a_id, b_id}
    assert region_info(state, state.regions["b"])["holders"] == [first.id, second.id]
    # the same claim again from one that holds them already: checked, nothing new recorded
    assert state.handle_fd_message(second.id, msg) == [] and len(checks) == 2
    assert len(second.held) == 2
    state.remove_region("b")  # the table changed: b's mapping is stale now
    third = _registered(state)
    out = state.handle_fd_message(third.id, msg) or []
    assert len(checks) == 3
    assert [x.range for x in (e.msg for e in out) if isinstance(x, m.Unmap)] == [
        MemoryRange(2 * MiB, 3 * MiB)
    ]
    assert list(third.held) == [MemoryRange(0, MiB)]
    store.close_all()
    sdir.release(remove=True)


def test_packed_holdings_before_the_attach_are_checked_once_it_is_bound(tmp_path: Path) -> None:
    """PackedHoldings sent right behind the Attach (which travels through ZeroMQ's I/O
    threads) may arrive first: they are kept and checked once the stream is bound, the stale
    ones unmapped after the Attached. Holdings arrays (a mapper of an earlier release sends
    them only once attached) still need the stream."""
    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    identity = store.identity(a_id)
    assert identity is not None
    fds = [a_id, *identity]
    maps = [0, MiB, a_id, 0, 1, 8 * MiB, MiB, a_id, 0, 1]  # the second: nothing there
    entry = state.register_mapper("early", 1)
    state.welcome(entry, m.SUPPORTED_FEATURES)
    for msg in [*holdings_messages(fds, maps, packed=True), m.PackedHoldings(b"", b"")]:
        assert state.handle_fd_message(entry.id, msg) == []
    assert len(entry.held) == 0 and state.rejected["not-attached"] == 0
    out = state.handle_mapper(b"st", m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    sent = [e.msg for e in out if isinstance(e, Send)]
    assert sent[0] == m.Attached(m.ROLE_STREAM_FD)
    assert [x.range for x in sent[1:] if isinstance(x, m.Unmap)] == [MemoryRange(8 * MiB, 9 * MiB)]
    assert list(entry.held) == [MemoryRange(0, MiB)] and not entry.early_holdings
    # arrays before the Attach: refused as before, and said
    other = state.register_mapper("arrays", 2)
    state.welcome(other, m.SUPPORTED_FEATURES)
    [refused] = state.handle_fd_message(other.id, m.Holdings(tuple(fds), ()))
    assert isinstance(refused, SendFd) and isinstance(refused.msg, m.Error)
    assert refused.msg.code == "not-attached"
    assert state.rejected["not-attached"] == 1
    # and a mapper without the feature gets no such credit either: refused
    old = state.register_mapper("old", 3)
    state.welcome(old, m.SUPPORTED_FEATURES & ~m.FEATURE_PACKED_HOLDINGS)
    with pytest.raises(Refused, match="PACKED_HOLDINGS"):
        state.handle_fd_message(old.id, holdings_messages(fds, maps, True)[0])
    assert not old.early_holdings
    store.close_all()
    sdir.release(remove=True)


def test_the_empty_message_that_ends_holdings_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The empty message a mapper ends its Holdings with (and all that one holding nothing
    sends) is not checked against the table: nothing is unmapped or recorded, and the check
    kept for the next fresh mapper with the same bytes is not replaced by it."""

    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    fds = [a_id, *(store.identity(a_id) or (0, 0))]
    (msg,) = holdings_messages(fds, [0, MiB, a_id, 0, 1], packed=True)
    checks = _count_checks(monkeypatch)
    first, empty, arrays, second = (_registered(state) for _ in range(4))
    assert state.handle_fd_message(first.id, msg) == [] and len(checks) == 1
    for entry in (first, empty):
        assert state.handle_fd_message(entry.id, m.PackedHoldings(b"", b"")) == []
    assert state.handle_fd_message(arrays.id, m.Holdings((), ())) == []
    assert len(checks) == 1
    assert len(empty.held) == 0 and not empty.fds_sent and not arrays.fds_sent
    assert state.handle_fd_message(second.id, msg) == [] and len(checks) == 1  # reused
    assert list(first.held) == list(second.held) == [MemoryRange(0, MiB)]
    assert region_info(state, state.regions["a"])["holders"] == [first.id, second.id]
    store.close_all()
    sdir.release(remove=True)


@pytest.mark.parametrize("packed", [False, True], ids=["Holdings", "PackedHoldings"])
@pytest.mark.parametrize("offered", [None, 0, m.SUPPORTED_FEATURES & ~m.FEATURE_REATTACH])
def test_holdings_without_reattach_are_refused(
    tmp_path: Path, packed: bool, offered: int | None
) -> None:
    """A mapper that did not negotiate REATTACH (no feature mask at all, or one without it)
    may send neither Holdings nor PackedHoldings: refused as `unexpected` (answered with an
    Error and a strike on fd.sock), before or after its Attach, with nothing recorded or
    unmapped; empty ones too."""
    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    fds = [a_id, *(store.identity(a_id) or (0, 0))]
    maps = [0, MiB, a_id, 0, 1]
    early = state.register_mapper("early", 1)
    state.welcome(early, offered)
    attached = _registered(state, offered)
    for entry in (early, attached):
        for msg in (
            *holdings_messages(fds, maps, packed=packed),
            m.PackedHoldings(b"", b"") if packed else m.Holdings((), ()),
        ):
            with pytest.raises(Refused, match="REATTACH feature") as refused:
                state.handle_fd_message(entry.id, msg)
            assert refused.value.code == "unexpected"
        assert len(entry.held) == 0 and not entry.fds_sent and not entry.early_holdings
    assert state.handle_fd_message(attached.id, m.SendMappings(MemoryRange(0, P)))  # served
    store.close_all()
    sdir.release(remove=True)


def test_holdings_come_once_a_registration_and_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any attached mapper with REATTACH could send Holdings of mappings the table does not
    have, again and again: each answered with an Unmap whose record waited for its ack (a
    peer grew the daemon from 32 MB to 1.2 GB in 30 s, and logged a line a message). They end
    with the empty one, and a registration that lists more than a bound is evicted (what it
    holds cannot all be taken, so it must drop it all). A request sent before them (a fault's,
    racing the registration) does not end them."""
    from membacking.manager import reattach

    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    bogus = m.Holdings((), (8 * MiB, MiB, a_id, 0, 1))
    ended = _registered(state)
    state.handle_fd_message(ended.id, m.SendMappings(MemoryRange(0, 4096)))  # a request first
    [unmap] = [e.msg for e in state.handle_fd_message(ended.id, bogus) or []]
    assert isinstance(unmap, m.Unmap)  # (taken all the same)
    assert state.handle_fd_message(ended.id, m.Holdings((), ())) == []  # the empty one
    with pytest.raises(Refused, match="Holdings ended") as refused:
        state.handle_fd_message(ended.id, bogus)
    assert refused.value.code == "unexpected"
    monkeypatch.setattr(reattach, "MAX_LISTED", 3)
    many = _registered(state)
    state.handle_fd_message(many.id, m.Holdings((), (8 * MiB, MiB, a_id, 0, 1) * 2))
    out = state.handle_fd_message(many.id, m.Holdings((), (9 * MiB, MiB, a_id, 0, 1) * 2)) or []
    said = [e.msg for e in out if isinstance(e, Send) and isinstance(e.msg, m.Shutdown)]
    assert [s.code for s in said] == [m.SHUTDOWN_EVICTED], out
    assert many.id not in state.mappers and state.counters["evictions"] == 1
    store.close_all()
    sdir.release(remove=True)


def test_stale_holdings_are_logged_within_the_log_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line for each Holdings message that lists something the table no longer has: a peer
    listing made-up mappings, and registering again after each eviction, wrote 17,800 lines a
    second. The first 10 of a peer in a window are written, the rest summed up."""
    import logging

    state, store, sdir = _state(tmp_path)
    a_id = state.regions["a"].submappings[0].mappable_id
    entry = _registered(state)
    with caplog.at_level(logging.INFO, logger="membacking.manager"):
        for i in range(50):
            state.handle_fd_message(
                entry.id, m.Holdings((), (8 * MiB + i * 4096, 4096, a_id, 0, 1))
            )
    said = [r for r in caplog.records if "the table no longer has" in r.getMessage()]
    assert len(said) == 10, len(said)
    store.close_all()
    sdir.release(remove=True)
