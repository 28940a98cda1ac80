"""How a Shutdown says what a mapper must do with its mappings, with and without the code:
every code against every feature set, through drops_mappings and mapper_drops as a mapper
reads it."""

from __future__ import annotations

import pytest

from membacking.protocol import messages as m
from membacking.protocol.shutdowns import (
    DROPPING_TEXTS,
    drops_mappings,
    drops_on_hangup,
    mapper_drops,
    shutdown_for,
)

FEATURE_SETS = [None, 0, m.FEATURE_REATTACH, m.FEATURE_SHUTDOWN_CODE, m.SUPPORTED_FEATURES]
CODES = [m.SHUTDOWN_EVICTED, m.SHUTDOWN_STOPPING, m.SHUTDOWN_RESTARTING, "unknown-later"]
REASONS = ["received SIGTERM", "handing over to pid 7", "evicted: by an operator", "x" * 1024]


@pytest.mark.parametrize("features", FEATURE_SETS)
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("reason", REASONS)
def test_every_shutdown_reads_as_its_code_means(
    features: int | None, code: str, reason: str
) -> None:
    msg = shutdown_for(reason, code, features)
    reattach = bool((features or 0) & m.FEATURE_REATTACH)
    # a mapper drops unless the manager restarts and it can come back with what it holds
    must_drop = not (code == m.SHUTDOWN_RESTARTING and reattach)
    # (with the code, a mapper without REATTACH drops on `restarting` by its own rule)
    assert mapper_drops(msg, features or 0) == must_drop, msg
    assert len(msg.reason) <= m.MAX_REASON_LEN
    if (features or 0) & m.FEATURE_SHUTDOWN_CODE:
        assert msg == m.Shutdown(reason, code)
    else:
        assert msg.code is None
        assert reason[:100] in msg.reason  # the human text is kept


def test_uncoded_texts_say_which_drop_it_is() -> None:
    assert shutdown_for("late", m.SHUTDOWN_EVICTED, None).reason == "evicted: late"
    assert shutdown_for("evicted: late", m.SHUTDOWN_EVICTED, 0).reason == "evicted: late"
    assert shutdown_for("bye", m.SHUTDOWN_STOPPING, None).reason == "manager shutting down: bye"
    kept = shutdown_for("evicted nothing", m.SHUTDOWN_RESTARTING, m.FEATURE_REATTACH).reason
    assert not kept.startswith(DROPPING_TEXTS) and kept.endswith("evicted nothing")


@pytest.mark.parametrize("features", [f or 0 for f in FEATURE_SETS])
def test_a_mapper_without_reattach_drops_whatever_an_earlier_manager_wrote(features: int) -> None:
    """A manager of an earlier release may send `restarting` (or a reason beginning with
    neither text) to a mapper without REATTACH, and it dies without a Shutdown at all: the
    mapper cannot prove what it holds to the next manager, so it drops every mapping either way
    (§9); a REATTACH mapper keeps them."""
    reattach = bool(features & m.FEATURE_REATTACH)
    for msg in (m.Shutdown("upgrade", m.SHUTDOWN_RESTARTING), m.Shutdown("restarting: upgrade")):
        assert not drops_mappings(msg)  # the wire alone says keep
        assert mapper_drops(msg, features) == (not reattach), msg
    assert drops_on_hangup(features) == (not reattach)
