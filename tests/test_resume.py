"""A mapper resuming after a planned handover by the digest of what it holds (no Holdings): the
decision as a state machine (messages in, messages out), the digest, the table handed over,
and a real handover whose mapper resumes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import membacking
from membacking.manager import resume
from membacking.manager.backing import MemfdStore
from membacking.manager.model import Effect, MapperEntry, Send, SendFd
from membacking.manager.state import ManagerState, region_info
from membacking.manager.statedir import StateDir
from membacking.protocol import messages as m
from membacking.protocol.resume import holdings_digest

from conftest import RunningManager

MiB = 1 << 20
Start = Callable[..., RunningManager]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ManagerState]:
    sdir = StateDir(tmp_path / "state")
    sdir.acquire()
    store = MemfdStore(sdir)
    state = ManagerState(store, address_space=1 << 32)
    state.state_id = b"s" * 16
    state.add_region("a", 0, MiB, True)
    state.add_region("b", 2 * MiB, MiB, True)
    yield state
    store.close_all()
    sdir.release(remove=True)


def _ids(state: ManagerState) -> tuple[int, int]:
    return (
        state.regions["a"].submappings[0].mappable_id,
        state.regions["b"].submappings[0].mappable_id,
    )


def _attached(state: ManagerState, features: int = m.SUPPORTED_FEATURES) -> MapperEntry:
    entry = state.register_mapper("back", 1)
    state.welcome(entry, features)
    state.handle_mapper(b"st%d" % entry.id, m.Attach(entry.id, entry.token, m.ROLE_STREAM_FD))
    return entry


def _holdings(state: ManagerState) -> tuple[list[int], list[int]]:
    """What a mapper holding both regions lists (fds, mappings) as Holdings does."""
    a_id, b_id = _ids(state)
    fds: list[int] = []
    store = state.store
    assert isinstance(store, MemfdStore)
    for mid in (a_id, b_id):
        identity = store.identity(mid)
        assert identity is not None
        fds += (mid, *identity)
    return fds, [0, MiB, a_id, 0, 1, 2 * MiB, MiB, b_id, 0, 1]


def _handed_over(state: ManagerState) -> tuple[int, bytes]:
    """A mapper holding both regions, then the handover: the table exported (and through its
    encoding), the old mapper gone as after the old daemon's exit. Its old id and token."""
    old = _attached(state)
    fds, maps = _holdings(state)
    assert state.handle_fd_message(old.id, m.Holdings(tuple(fds), tuple(maps))) == []
    table = resume.decode(resume.encode(resume.export(state)))
    state.mapper_gone(old.id)
    state.handed_mappers = table
    return old.id, old.token


def _answers(out: list[Effect] | None) -> list[object]:
    return [e.msg for e in out or [] if isinstance(e, SendFd | Send)]


def test_the_digest_is_of_the_holdings_in_any_order() -> None:
    fds = [3, 1, 2, 1, 1, 1]
    maps = [8192, 4096, 3, 0, 1, 0, 4096, 1, 0, 0]
    digest = holdings_digest(fds, maps)
    assert holdings_digest(fds[3:] + fds[:3], maps[5:] + maps[:5]) == digest
    assert len(digest) == m.TOKEN_BYTES
    for i in range(len(maps)):  # every field of a mapping counts
        changed = list(maps)
        changed[i] += 1
        assert holdings_digest(fds, changed) != digest
    assert holdings_digest(fds[:3], maps) != digest  # so does every fd
    assert holdings_digest([], []) != holdings_digest([0, 0, 0], [])


def test_a_mapper_holding_what_the_table_handed_over_says_resumes(
    state: ManagerState,
) -> None:
    old_id, token = _handed_over(state)
    new = _attached(state)
    digest = holdings_digest(*_holdings(state))
    assert _answers(state.handle_fd_message(new.id, m.Resume(old_id, token, digest))) == [
        m.Resumed(True)
    ]
    assert state.counters["resumed_mappers"] == 1
    for name in ("a", "b"):
        assert region_info(state, state.regions[name])["holders"] == [new.id]
    assert new.fds_sent == set(_ids(state)) and len(new.held) == 2
    # what it holds is unmapped from it like from any holder
    sent = _answers(state.remove_region("a"))
    assert [type(x) for x in sent] == [m.Unmap]
    # once only: the same old id cannot resume a second mapper
    again = _attached(state)
    out = state.handle_fd_message(again.id, m.Resume(old_id, token, digest))
    assert _answers(out) == [m.Resumed(False)]


def test_a_digest_that_differs_falls_back_to_holdings(state: ManagerState) -> None:
    old_id, token = _handed_over(state)
    new = _attached(state)
    fds, maps = _holdings(state)
    digest = holdings_digest(fds, maps[:5])  # it lost a mapping the old daemon counted
    out = state.handle_fd_message(new.id, m.Resume(old_id, token, digest))
    assert _answers(out) == [m.Resumed(False)]
    assert state.counters["resumes_refused"] == 1 and not len(new.held) and not new.fds_sent
    assert region_info(state, state.regions["a"])["holders"] == []
    # Holdings then, as without the feature
    state.handle_fd_message(new.id, m.Holdings(tuple(fds), ()))
    assert state.handle_fd_message(new.id, m.Holdings((), tuple(maps[:5]))) == []
    assert region_info(state, state.regions["a"])["holders"] == [new.id]


def test_a_region_removed_since_the_handover_is_never_kept(state: ManagerState) -> None:
    old_id, token = _handed_over(state)
    digest = holdings_digest(*_holdings(state))  # what the mapper still maps
    state.remove_region("b")  # nobody holds it in this table: done at once
    new = _attached(state)
    out = state.handle_fd_message(new.id, m.Resume(old_id, token, digest))
    assert _answers(out) == [m.Resumed(False)]
    assert not len(new.held)


def test_a_wrong_token_resumes_nothing_and_spoils_nothing(state: ManagerState) -> None:
    old_id, token = _handed_over(state)
    digest = holdings_digest(*_holdings(state))
    stranger = _attached(state)
    out = state.handle_fd_message(stranger.id, m.Resume(old_id, b"x" * 16, digest))
    assert _answers(out) == [m.Resumed(False)]
    assert state.rejected["bad-token"] == 1
    new = _attached(state)  # the mapper itself still resumes
    assert _answers(state.handle_fd_message(new.id, m.Resume(old_id, token, digest))) == [
        m.Resumed(True)
    ]


def test_without_the_feature_resume_is_refused(state: ManagerState) -> None:
    old_id, token = _handed_over(state)
    older = _attached(state, m.SUPPORTED_FEATURES & ~m.FEATURE_RESUME)
    out = state.handle_fd_message(older.id, m.Resume(old_id, token, b"d" * 16))
    answers = _answers(out)
    assert len(answers) == 1 and isinstance(answers[0], m.Error)
    assert not len(older.held)


def test_an_evicted_or_busy_mapper_is_not_handed_over(state: ManagerState) -> None:
    a_id, _ = _ids(state)
    kept, evicted = _attached(state), _attached(state)
    fds, maps = _holdings(state)
    for entry in (kept, evicted):
        state.handle_fd_message(entry.id, m.Holdings(tuple(fds), tuple(maps)))
    state.unmap_timeout = 0.0
    state.remove_region("a")  # waits for both holders' acks
    assert set(resume.export(state)) == set()  # an Unmap unacknowledged: neither resumes
    seq = next(iter(kept.unacked))
    state.handle_fd_message(kept.id, m.UnmapAck(seq))
    time.sleep(0.01)
    state.tick()  # the other did not answer: evicted
    assert evicted.id not in state.mappers
    assert set(resume.export(state)) == {kept.id}
    table = resume.export(state)[kept.id]
    assert table.token == kept.token and table.held == (2 * MiB, 3 * MiB)  # not a any more
    assert a_id not in table.fds


def test_a_table_of_another_version_or_malformed_is_refused() -> None:
    with pytest.raises(ValueError):
        resume.decode(b"\x92\x02\x90")  # version 2
    with pytest.raises(ValueError):
        resume.decode(b"garbage")
    with pytest.raises(ValueError):
        resume.decode(resume.encode({}).replace(b"\x90", b"\x91\x01"))


def test_mappers_resume_by_digest_across_a_real_handover(start_manager: Start) -> None:
    first = start_manager("--region", "ram0=0:8M", "--region", "dev=0x10000000:1M")
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as memory:
        memory.write_at(0x1000, b"before")
        memory.read_at(0x10000000, 1)
        mapper = memory._mapper
        old_id = mapper.id
        second = start_manager(
            "--region",
            "ram0=0:8M",
            "--region",
            "dev=0x10000000:1M",
            "--takeover",
            runtime_dir=first.runtime_dir,
        )
        assert first.proc.wait(10) == 0
        deadline = time.monotonic() + 20
        while (mapper.id == old_id or not mapper.relinked.is_set()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mapper.id != old_id and mapper.resumed == 1
        stats = second.client().stats()
        assert stats["resumed_mappers"] == 1 and stats["resumes_refused"] == 0
        assert "resumed by digest" in second.log()
        # it holds what it held: a removal unmaps from it, and its bytes are there
        assert memory.read_at(0x1000, 6) == b"before"
        removed = second.client().remove_region("dev")
        assert removed["unmapped_from"] == [mapper.id]
