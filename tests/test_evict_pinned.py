"""Evicting a mapper that lent regions to a running VM (the QEMU launcher) unpins them while
the guest runs on: `mapper evict` says so. It said only "evicted mapper N", and a `region
remove` right after answered "no mapper held it" with the guest still running on that RAM."""

from __future__ import annotations

import json
import os

import membacking

from conftest import RunningManager


def test_evicting_a_vms_lender_warns_that_its_ram_is_unpinned(manager: RunningManager) -> None:
    client = manager.client()
    client.add_region("ram", 1 << 30, 1 << 20)
    with membacking.attach(manager.runtime_dir, name="lender") as lender:
        client.call(
            "pin_regions", mapper=lender.mapper_id, label="VM 'web'", pid=os.getpid(), regions="ram"
        )
        evicted = manager.cli("mapper", "evict", str(lender.mapper_id))
        assert evicted.returncode == 0, evicted.stderr
        assert "warning: it lent ram to VM 'web'" in evicted.stderr, evicted.stderr
        assert "no longer pinned" in evicted.stderr
    with membacking.attach(manager.runtime_dir, name="plain") as plain:
        plain.read_at(0, 1)
        evicted = manager.cli("mapper", "evict", "--json", str(plain.mapper_id))
        assert evicted.returncode == 0 and not evicted.stderr, evicted.stderr
        assert json.loads(evicted.stdout)["pin"] is None
