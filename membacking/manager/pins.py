"""Pins: regions a mapper has lent to a third party (a running VM) that must stay as they are.

A pin lives as long as the mapper that registered it; while it does, removing, disabling,
moving, re-mapping or covering a pinned region is refused with the error code "pinned".
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.ranges import MemoryRange
from .errors import Refused

if TYPE_CHECKING:
    from .state import ManagerState

#: the longest label a pin may carry (it ends up in error messages)
MAX_LABEL = 200


@dataclass(frozen=True)
class Pin:
    """Regions `regions` are lent by mapper `mapper_id` to `label` (e.g. a VM), process `pid`."""

    mapper_id: int
    label: str
    pid: int
    regions: frozenset[str]

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "pid": self.pid, "regions": sorted(self.regions)}


class Pins:
    """The pins of attached mappers; pins of mappers that are gone are dropped when next seen."""

    def __init__(self) -> None:
        self._by_mapper: dict[int, Pin] = {}

    def set(self, mapper_id: int, label: str, pid: int, regions: Iterable[str]) -> Pin:
        """Pin `regions` for `mapper_id` (replacing its earlier pin; no regions unpins)."""
        if not label or len(label) > MAX_LABEL or not label.isprintable():
            raise Refused("bad-request", f"a pin label must be 1 to {MAX_LABEL} printable chars")
        pin = Pin(mapper_id, label, pid, frozenset(regions))
        if pin.regions:
            self._by_mapper[mapper_id] = pin
        else:
            self._by_mapper.pop(mapper_id, None)
        return pin

    def of(self, mapper_id: int) -> Pin | None:
        return self._by_mapper.get(mapper_id)

    def holders(self, region: str, live: Container[int]) -> list[Pin]:
        """The live pins on `region` (pins of mappers not in `live` are forgotten)."""
        for gone in [i for i in self._by_mapper if i not in live]:
            del self._by_mapper[gone]
        return [p for p in self._by_mapper.values() if region in p.regions]

    def check(self, region: str, action: str, live: Container[int]) -> None:
        """Refuse `action` ("removed", "disabled", ...) on `region` while it is pinned."""
        pins = self.holders(region, live)
        if pins:
            who = ", ".join(f"{p.label} (pid {p.pid}, mapper {p.mapper_id})" for p in pins)
            raise Refused(
                "pinned",
                f"region {region!r} is lent to {who} and cannot be {action} while it runs; "
                "stop it first",
            )


def guard(
    state: ManagerState,
    name: str,
    action: str,
    cover: MemoryRange | None = None,
    rank: tuple[int, int] = (0, 0),
) -> None:
    """Refuse `action` on region `name` if it is pinned, or if placing it over `cover` with
    `rank` (priority, creation order) would hide an active pinned region."""
    state.pins.check(name, action, state.mappers)
    priority, order = rank
    for other in state.placed.overlapping(cover) if cover is not None else ():
        hides = (priority, -order) > (other.priority, -other.order)
        if other.name != name and other.active and hides:
            state.pins.check(other.name, f"covered by region {name!r}", state.mappers)
