"""What the daemon does for each mapper registering again in a handover's gap: its Hello asks
whether private RAM is in use without a walk of the regions (a count kept with the table)."""

from __future__ import annotations

import copy

import pytest

from membacking.manager.backing import MemfdStore
from membacking.manager.errors import Refused
from membacking.manager.state import ManagerState

MiB = 1 << 20


def test_the_count_of_private_regions_follows_the_table() -> None:
    """Regions added, removed, replaced under their name and copied: the count of private
    ones is always what a walk of the table finds, and a second mapper is refused exactly
    while there is one."""
    store = MemfdStore()
    state = ManagerState(store, address_space=1 << 32)
    try:
        state.add_region("shared", 0, MiB, True)
        state.add_region("ram", None, MiB, True, enabled=False, backing="private")

        def walked() -> int:
            return sum(r.backing == "private" for r in state.regions.values())

        assert state.regions.private == walked() == 1 and state.has_private_regions()
        state.register_mapper("one", 1)
        with pytest.raises(Refused, match="private RAM"):
            state.register_mapper("two", 2)
        for copied in (copy.copy(state.regions), copy.deepcopy(state.regions)):
            assert copied.private == 1 and list(copied) == ["shared", "ram"]
        ram = state.regions["ram"]
        state.regions["ram"] = state.regions["shared"]  # replaced under its name: counted off
        assert state.regions.private == walked() == 0
        state.regions["ram"] = ram
        assert state.regions.private == walked() == 1
        state.remove_region("ram")
        assert "ram" not in state.regions
        assert state.regions.private == walked() == 0 and not state.has_private_regions()
        state.register_mapper("two", 2)  # no private RAM: more mappers may attach
        assert state.regions.pop("absent", None) is None
        with pytest.raises(TypeError):
            state.regions.update({})  # would bypass the count
    finally:
        store.close_all()
