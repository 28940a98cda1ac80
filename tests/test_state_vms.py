"""A state directory whose journal pinned regions for a VM that still runs: `manager state
remove` says so in its refusal (and `state list --json` names it), since removing it takes
memory a running guest uses. It spoke of regions and bytes alone."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import membacking
from membacking.manager.statedir import default_state_dir
from membacking.runtime import RuntimePaths

from conftest import RunningManager, run_cli


def test_removing_a_state_a_running_vm_uses_names_the_vm(
    start_manager: Callable[..., RunningManager],
) -> None:
    manager = start_manager("--region", "ram0=0:8M")
    state = default_state_dir(RuntimePaths.resolve(manager.runtime_dir))
    with membacking.attach(manager.runtime_dir, name="lender", reconnect_timeout=0) as lender:
        manager.client().call(
            "pin_regions",
            mapper=lender.mapper_id,
            label="VM 'web'",
            pid=os.getpid(),
            regions="ram0",
        )
        time.sleep(1.5)  # journaled by the next tick at the latest
        manager.stop(signal.SIGKILL)
    refused = run_cli("manager", "state", "remove", str(state))
    assert refused.returncode == 1, refused
    assert f"VM 'web' (pid {os.getpid()}) still runs on some of it" in refused.stderr, refused
    listed = run_cli("manager", "state", "list", "--json", "--state-dir", str(state))
    (entry,) = [e for e in json.loads(listed.stdout) if e["path"] == str(state)]
    assert entry["running_vms"] == [{"label": "VM 'web'", "pid": os.getpid()}]
    # a start with --fresh discards it all the same, but says which VM runs on it
    fresh = start_manager("--region", "ram0=0:8M", "--fresh", runtime_dir=manager.runtime_dir)
    said = f"--fresh discards the state VM 'web' (pid {os.getpid()}) still runs on (regions ram0)"
    assert said in fresh.log(), fresh.log()


def test_memory_files_without_a_journal_are_never_stale(
    start_manager: Callable[..., RunningManager],
) -> None:
    """A state directory with memory files and no journal (the journal removed, or a manager
    killed between creating a region's file and its first journal): a manager refuses to start
    on it, its guest memory "never discarded unasked", yet a minute later `state remove
    --stale` would have removed it as stale."""
    manager = start_manager("--region", "ram0=0:8M")
    state = default_state_dir(RuntimePaths.resolve(manager.runtime_dir))
    manager.stop(signal.SIGKILL)
    (state / "journal").unlink()
    old = time.time() - 3600
    os.utime(state, (old, old))  # long past the minute a new one is given
    listed = run_cli("manager", "state", "list", "--json", "--state-dir", str(state))
    (entry,) = [e for e in json.loads(listed.stdout) if e["path"] == str(state)]
    assert entry["status"] == "unreadable" and "no journal beside 1 memory file" in entry["problem"]
    stale = run_cli("manager", "state", "remove", "--stale", "--state-dir", str(state))
    assert state.exists(), stale
    refused = run_cli("manager", "state", "remove", str(state))
    assert refused.returncode == 1 and "no journal beside" in refused.stderr, refused
    assert run_cli("manager", "state", "remove", "--force", str(state)).returncode == 0
