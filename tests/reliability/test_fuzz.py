"""Fuzzing: the decoder with arbitrary bytes and structures, and the manager's state machine with
random sequences of peer messages and control requests, checking its invariants after each step.
A corpus of hostile messages is replayed against the decoder and a live daemon."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_faults import record
from test_manager_state import RecordingStore

import membacking
from membacking.manager.errors import Refused
from membacking.manager.state import ManagerState, Send, SendFd
from membacking.protocol import ProtocolError, decode
from membacking.protocol import messages as m
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange

from conftest import RunningManager

CORPUS = Path(__file__).with_name("hostile_corpus.json")
P = 4096
#: how many inputs each fuzz test really ran (for the reliability report)
RUNS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_runs() -> Iterator[None]:
    yield
    outcomes = {
        "bytes": "rejected with ProtocolError or decoded to a valid message, nothing else",
        "arrays": "rejected with ProtocolError, or decoded and round-tripped exactly",
        "state": "no unexpected exception; every invariant held after every step",
    }
    for what, count in RUNS.items():
        key = next(k for k in outcomes if k in what)
        record(what, count, outcomes[key], "nothing", (0, 0), (0, 0))


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=80)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(list(Channel)))
def test_decoder_on_arbitrary_bytes(data: bytes, channel: Channel) -> None:
    RUNS["decoder: arbitrary bytes on every channel (hypothesis)"] += 1
    try:
        msg = decode(data, channel)
    except ProtocolError:
        return
    assert isinstance(msg, m.Message)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 40), st.lists(wire_values, max_size=8), st.sampled_from(list(Channel)))
def test_decoder_on_structured_garbage(kind: int, fields: list[Any], channel: Channel) -> None:
    RUNS["decoder: msgpack arrays of arbitrary values (hypothesis)"] += 1
    data = msgpack.packb([1, kind, *fields], use_bin_type=True)
    try:
        msg = decode(data, channel)
    except ProtocolError:
        return
    # anything accepted round-trips exactly (compared as bytes: a NaN in a control reply's
    # free-form result is not equal to itself)
    wire = membacking.protocol.encode(msg)
    assert membacking.protocol.encode(decode(wire, channel)) == wire


ranges = st.builds(
    lambda s, n: MemoryRange.from_size(s * P, n * P), st.integers(0, 64), st.integers(1, 32)
)


class ManagerMachine(RuleBasedStateMachine):
    """Random traffic into the state machine; invariants checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ManagerState(RecordingStore(), address_space=128 * P)
        self.identities: list[bytes] = []
        self.seqs: list[tuple[bytes, int]] = []
        self.names = ["a", "b", "c", "d"]

    def _feed(self, effects: list[Any], resend: tuple[int, int] | None = None) -> None:
        """Check what the state machine sent; `resend`: (mapper, mappable) of the ResendFd
        these effects answer."""
        for i, effect in enumerate(effects):
            if isinstance(effect, Send) and isinstance(
                effect.msg, (m.Unmap, m.Release, m.MapEager)
            ):
                self.seqs.append((effect.identity, effect.msg.seq))
            if isinstance(effect, SendFd) and (effect.mapper_id, effect.msg.mappable_id) == resend:
                assert effects == [effect]  # the answer to a ResendFd, and nothing else
            elif isinstance(effect, SendFd):
                # an fd goes only right behind a Map of that mappable to that mapper
                before = effects[i - 1] if i else None
                assert isinstance(before, Send) and isinstance(before.msg, (m.Map, m.MapEager))
                assert before.msg.mappable_id == effect.msg.mappable_id
                assert before.identity == self.state.mappers[effect.mapper_id].stream

    @rule(
        name=st.sampled_from(["m1", "m2", "m3"]),
        stream_role=st.sampled_from([m.ROLE_STREAM, m.ROLE_STREAM_FD]),
    )
    def register(self, name: str, stream_role: int) -> None:
        try:
            entry = self.state.register_mapper(name, 1000)
        except Refused:
            return
        for role in (stream_role, m.ROLE_REQUESTS):
            identity = f"{entry.id}-{role}".encode()
            self._feed(self.state.handle_mapper(identity, m.Attach(entry.id, entry.token, role)))
            self.identities.append(identity)

    @rule(data=st.data())
    def peer_message(self, data: st.DataObject) -> None:
        identity = data.draw(st.sampled_from([*self.identities, b"stranger"]))
        msg = data.draw(
            st.one_of(
                st.builds(m.SendMappings, ranges),
                st.builds(m.UnmapAck, st.integers(0, 50)),
                st.builds(m.MapAck, st.integers(0, 50), st.booleans(), st.just("x")),
                st.just(m.SetEager()),
                st.just(m.Detach()),
                st.builds(
                    m.Attach,
                    st.integers(0, 5),
                    st.binary(min_size=16, max_size=16),
                    st.integers(0, 3),
                ),
            )
        )
        self._feed(self.state.handle_mapper(identity, msg))

    @rule(data=st.data(), mapper_id=st.integers(0, 6))
    def fd_message(self, data: st.DataObject, mapper_id: int) -> None:
        """What a registered mapper may send on its fd socket (the daemon calls this only for
        a connection that said Hello; the mapper may be gone since, or never have existed)."""
        msg = data.draw(
            st.one_of(
                st.builds(m.SendMappings, ranges),
                st.builds(m.ResendFd, st.integers(0, 8)),
                st.builds(m.UnmapAck, st.integers(0, 50)),
                st.builds(m.MapAck, st.integers(0, 50), st.booleans(), st.just("x")),
                st.just(m.Detach()),
            )
        )
        resend = (mapper_id, msg.mappable_id) if isinstance(msg, m.ResendFd) else None
        self._feed(self.state.handle_fd_message(mapper_id, msg) or [], resend)

    @rule(data=st.data())
    def answer_pending(self, data: st.DataObject) -> None:
        if not self.seqs:
            return
        identity, seq = data.draw(st.sampled_from(self.seqs))
        ok = data.draw(st.booleans())
        reply = m.UnmapAck(seq) if ok else m.MapAck(seq, data.draw(st.booleans()), "no")
        mapper_id = int(identity.split(b"-")[0])
        if data.draw(st.booleans()) and mapper_id in self.state.mappers:  # as sent now
            self._feed(self.state.handle_fd_message(mapper_id, reply) or [])
        else:  # as mappers of earlier releases send it
            self._feed(self.state.handle_mapper(identity, reply))

    @rule(mapper_id=st.integers(0, 6))
    def gone(self, mapper_id: int) -> None:
        self._feed(self.state.mapper_gone(mapper_id))

    @rule(data=st.data())
    def control(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.names))
        page = st.integers(0, 140).map(lambda x: x * P)
        op, args = data.draw(
            st.sampled_from(
                [
                    (
                        "add_region",
                        {
                            "name": name,
                            "gpa": data.draw(page),
                            "size": data.draw(st.integers(1, 40)) * P,
                            "priority": data.draw(st.integers(0, 3)),
                            "disabled": data.draw(st.booleans()),
                        },
                    ),
                    ("remove_region", {"name": name}),
                    ("enable_region", {"name": name}),
                    ("disable_region", {"name": name}),
                    ("move_region", {"name": name, "gpa": data.draw(page)}),
                    ("map_range", {"name": name, "offset": data.draw(page), "size": P}),
                    ("unmap_range", {"name": name, "offset": data.draw(page), "size": 2 * P}),
                    ("regions", {}),
                    ("stats", {}),
                    ("bogus", {"x": 1}),
                ]
            )
        )
        self._feed(self.state.handle_control(b"ctl", m.ControlRequest(op, args)))

    @rule()
    def later_turns(self) -> None:
        """The work and the batches a change left for the daemon's later turns."""
        RUNS["state machine: random peer messages and control requests (steps)"] += 1
        while self.state.has_steps:
            self._feed(self.state.step())
        while self.state.has_work:
            self.state.work()
        assert not self.state.departed

    @rule()
    def tick(self) -> None:
        RUNS["state machine: random peer messages and control requests (steps)"] += 1
        self._feed(self.state.tick())

    @invariant()
    def consistent(self) -> None:
        RUNS["state machine: random peer messages and control requests (steps)"] += 1
        state = self.state
        previous_end = 0
        for rng, mapping in state.table.items():
            assert rng.start >= previous_end  # sorted, no overlap
            previous_end = rng.end
            assert rng.end <= state.address_space
            region = state.regions[mapping.region]
            assert region.active and region.range is not None and region.range.contains(rng)
            for holder in mapping.holders:
                if holder in state.departed:  # its marks go on later turns (later.py)
                    continue
                assert state.mappers[holder].held.get(rng) == mapping.mappable_id
        for entry in state.mappers.values():
            for rng, _mappable_id in entry.held.items():
                hit = state.table.lookup(rng.start)
                assert hit is not None and hit[0] == rng and entry.id in hit[1].holders
            # the per-mappable counts behind held.maps() agree with the ranges themselves
            assert entry.held.mappables() == {mappable_id for _, mappable_id in entry.held.items()}
        for name, region in state.regions.items():
            if region.active:
                assert region.enabled and not region.removing
            assert name == region.name
        # at every address at most one region is active, and it is the best enabled one
        active = [r for r in state.regions.values() if r.active]
        for i, a in enumerate(active):
            for b in active[i + 1 :]:
                assert a.range is not None and b.range is not None
                assert not a.range.overlaps(b.range)


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


def load_corpus() -> list[dict[str, str]]:
    entries: list[dict[str, str]] = json.loads(CORPUS.read_text())
    return entries


def test_corpus_is_rejected_by_the_decoder() -> None:
    senders = {"fd": "mapper", "mapper": "mapper", "control": "client"}
    for entry in load_corpus():
        try:
            decode(
                bytes.fromhex(entry["hex"]),
                Channel(entry["channel"]),
                sender=senders[entry["channel"]],
            )
        except ProtocolError:
            continue
        raise AssertionError(f"corpus entry {entry['why']!r} was accepted")


def test_corpus_against_a_live_daemon(manager: RunningManager) -> None:
    ctx = zmq.Context()
    try:
        for entry in load_corpus():
            data = bytes.fromhex(entry["hex"])
            if entry["channel"] == "fd":
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    sock.settimeout(5)
                    sock.connect(str(manager.runtime_dir / "fd.sock"))
                    sock.send(data)
                    assert sock.recv(65536)  # an Error reply, and the daemon lives on
            elif entry["channel"] == "mapper":
                # a new peer each time: one that kept sending garbage would be ignored
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(f"ipc://{manager.runtime_dir / 'mapper.ipc'}")
                dealer.send(data)
                assert dealer.poll(5000), entry["why"]
                dealer.recv()
                dealer.close()
            else:
                req = ctx.socket(zmq.REQ)
                req.setsockopt(zmq.LINGER, 0)
                req.connect(f"ipc://{manager.runtime_dir / 'control.ipc'}")
                req.send(data)
                assert req.poll(5000), entry["why"]
                req.recv()
                req.close()
    finally:
        ctx.term()
    assert manager.proc.poll() is None
    with membacking.attach(manager.runtime_dir) as memory:
        memory.write_at(0, b"ok")
        assert memory.read_at(0, 2) == b"ok"
    rejected = sum(manager.client().stats()["rejected"].values())
    assert rejected >= len(load_corpus())
    record(
        "hostile corpus replayed on the fd, mapper and control sockets",
        len(load_corpus()),
        f"each rejected with a reply ({rejected} rejections counted); daemon kept serving",
        "nothing",
        (0, 0),
        (0, 0),
    )
