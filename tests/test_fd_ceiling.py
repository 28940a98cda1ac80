"""A manager near its open-file limit turns new mappers away at once, saying why (it left their
connections unanswered until their timeout, and `status` said ok)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

import membacking

from conftest import RunningManager

Start = Callable[..., RunningManager]


def test_mappers_turned_away_near_the_open_file_limit_are_told_why(start_manager: Start) -> None:
    full = start_manager("--no-state", prefix=("prlimit", "--nofile=100:100", "--"))
    client = full.client()
    for i in range(200):  # each region's memfd takes a descriptor, until the daemon refuses
        try:
            client.add_region(f"r{i}", i << 20, 1 << 20)
        except membacking.ControlError as exc:
            assert "open-file limit" in str(exc), exc
            break
    else:
        pytest.fail("no region was refused at an open-file limit of 100")
    started = time.monotonic()
    with pytest.raises(membacking.MembackingError, match="at its open-file limit") as refused:
        membacking.attach(full.runtime_dir, name="late", timeout=20)
    assert time.monotonic() - started < 10, refused.value  # told at once, not timed out
    status = json.loads(full.cli("status", "--json").stdout)
    assert status["health"] == "degraded"
    assert any("new mappers are turned away" in p for p in status["problems"]), status
