"""A state directory removed under a running daemon (`manager state remove --force`): the
daemon serves on, says so once, and a --keep-state stop is then a stop for good (nothing can
be kept): its mappers are told to drop their mappings, and no traceback is logged."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import membacking

from conftest import RunningManager, run_cli


def test_a_keep_state_stop_after_the_state_was_removed_is_a_stop(
    start_manager: Callable[..., RunningManager],
) -> None:
    state_dir = Path("/dev/shm") / f"mb-test-state-{uuid.uuid4().hex[:12]}"
    try:
        manager = start_manager(
            "--region", "ram=0:1M", "--keep-state", "--state-dir", str(state_dir)
        )
        memory = membacking.attach(manager.runtime_dir, name="holder")
        memory.write_at(0, b"kept?")
        forced = run_cli("manager", "state", "remove", "--force", str(state_dir))
        assert forced.returncode == 0, forced.stderr
        client = manager.client()
        deadline = time.monotonic() + 10  # noticed within a second
        while client.status()["keep_state"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.status()["keep_state"]  # `status` no longer says it is kept
        # nor does it hand over a state it no longer has (it would stop, keeping nothing)
        with pytest.raises(membacking.ControlError) as refused:
            client.call("handover", version=2, journal=9, pid=1, features=0)
        assert refused.value.code == "state-dir" and "was removed" in str(refused.value)
        taken = run_cli("manager", "run", "--takeover", runtime_dir=manager.runtime_dir)
        assert taken.returncode == 1 and "was removed under it" in taken.stderr, taken.stderr
        # a stop asked to keep the state is refused, not said to have kept it
        kept = manager.cli("manager", "stop", "--keep-state")
        assert kept.returncode == 1 and "was removed under this manager" in kept.stderr, kept
        assert manager.proc.poll() is None and client.status()["state_dir_removed"] is True
        # changes cannot be journaled now: each fails, the failure is logged once
        for i in range(3):
            client.add_region(f"late{i}", 0x100000 * (i + 2), 4096, private=True)
        # a stop that ends the state has no journal to be behind: no warning of one
        stopped = manager.cli("manager", "stop")
        assert stopped.returncode == 0 and stopped.stderr == "", stopped
        assert manager.proc.wait(10) == 0
        log = manager.log()
        assert "Traceback" not in log, log
        assert log.count("cannot journal the region table") == 1, log
        assert "nothing was kept" in log, log
        with pytest.raises(membacking.ManagerGoneError):  # told to drop: the stop is for good
            memory.read_at(0, 5)
        memory.detach()
        assert not state_dir.exists()  # (not made again at the stop)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
