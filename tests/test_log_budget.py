"""The log lines one peer's rejected messages and refused requests may write: the first 10 of
one kind from one peer in 10 s, then one line summing up the rest once the window ends, while
`stats` counts every one. A peer flooding invalid messages wrote a line each (14,000 a second,
81 MB in an hour of a trial)."""

from __future__ import annotations

import logging

import pytest
from test_manager_state import Clock, RecordingStore

from membacking.manager.logbudget import (
    EVERY_PEER,
    LINES_EVERY_PEER,
    LINES_PER_WINDOW,
    WINDOW,
    LogBudget,
)
from membacking.manager.state import ManagerState


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_flood_of_rejections_writes_a_few_lines_and_one_sum(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    state = ManagerState(RecordingStore(), address_space=1 << 32, clock=clock, monotonic=clock)
    caplog.set_level(logging.WARNING, logger="membacking.manager")
    for _ in range(1000):
        state.reject("not-attached", "SendMappings from an unattached socket", pid=7)
    for _ in range(3):
        state.reject("not-attached", "SendMappings from an unattached socket", pid=8)
        state.refuse("limit", "too many regions", pid=7)
    assert len(_lines(caplog, "rejected message (not-attached) from pid 7")) == LINES_PER_WINDOW
    assert len(_lines(caplog, "from pid 8")) == 3  # another peer: a budget of its own
    assert len(_lines(caplog, "refused (limit)")) == 3  # refusals: of their own too
    assert state.rejected["not-attached"] == 1003  # each still counted
    state.tick()
    assert not _lines(caplog, "were not logged")  # the window is not over yet
    clock.now += WINDOW
    state.tick()
    assert _lines(caplog, "were not logged") == [
        f"{1000 - LINES_PER_WINDOW} more rejected messages (not-attached) from pid 7 in 10s "
        "were not logged (stats counts each)"
    ]
    state.tick()  # summed up once
    assert len(_lines(caplog, "were not logged")) == 1
    state.reject("not-attached", "again", pid=7)  # a new window: logged again
    assert _lines(caplog, "from pid 7: again")


def test_a_window_over_before_the_next_line_is_summed_up_at_the_next_tick() -> None:
    budget = LogBudget(lines=2, window=5.0)
    key = ("rejected", "malformed", None)
    allowed = [budget.allow(*key, t) for t in (0.0, 1.0, 2.0, 3.0)]
    assert allowed == [True, True, False, False]
    assert budget.allow(*key, 6.0)  # a new window begins with this line; the old one had 2 out
    assert budget.ended(6.5) == [(key, 2, 6.0)]
    assert budget.ended(20.0) == []  # the new window left nothing out: forgotten
    assert budget.allow(*key, 20.0) and budget.allow(*key, 20.0) and not budget.allow(*key, 21.0)


def test_many_peers_of_one_line_each_are_capped_together(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop of new processes, each refused once (a new pid each time), wrote a line each:
    all peers together get LINES_EVERY_PEER lines of one reason a window, the rest summed up
    once, with the reason in the record's fields."""
    clock = Clock()
    state = ManagerState(RecordingStore(), address_space=1 << 32, clock=clock, monotonic=clock)
    caplog.set_level(logging.WARNING, logger="membacking.manager")
    for pid in range(1000, 1500):
        state.reject("uid", "uid 1234 may not connect", pid=pid)
    assert len(_lines(caplog, "rejected message (uid)")) == LINES_EVERY_PEER
    clock.now += WINDOW
    state.tick()
    (summary,) = [r for r in caplog.records if "were not logged" in r.getMessage()]
    assert summary.getMessage().startswith(
        f"{500 - LINES_EVERY_PEER} more rejected messages (uid) from several peers"
    )
    assert (summary.reason, summary.peer_pid, summary.not_logged) == ("uid", None, 400)  # type: ignore[attr-defined]
    assert EVERY_PEER < 0  # never a pid
