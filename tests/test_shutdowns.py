"""How a Shutdown says what a mapper must do with its mappings, with and without the code:
every code against every feature set, through drops_mappings as a mapper reads it."""

from __future__ import annotations

import pytest

from membacking.protocol import messages as m
from membacking.protocol.shutdowns import DROPPING_TEXTS, drops_mappings, shutdown_for

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
    reads_drop = drops_mappings(msg) or (msg.code == m.SHUTDOWN_RESTARTING and not reattach)
    assert reads_drop == must_drop, msg
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
