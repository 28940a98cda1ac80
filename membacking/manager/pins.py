"""Pins: regions a mapper has lent to a third party (a running VM) that must stay as they are.

A pin lives as long as the mapper that registered it; while it does, removing, disabling,
moving, re-mapping or covering a pinned region is refused with the error code "pinned". Pins
are journaled: a restarted manager keeps them while their process (pid and start time) runs,
until the lending mapper registers again and pins anew.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.ranges import MemoryRange
from .errors import Refused

if TYPE_CHECKING:
    from .state import ManagerState

#: the longest label a pin may carry (it ends up in error messages)
MAX_LABEL = 200


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22), None if
    there is no such process here: with the pid it names one process, never a later one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (the state); a zombie has ended
    return int(fields[19]) if len(fields) > 19 and fields[0] != b"Z" else None


def maps_guest_memory(pid: int) -> bool | None:
    """Whether process `pid` maps a memory file of membacking's (a memfd or a state-directory
    file: their names hold `membacking:`), None if this process may not look."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return b"membacking:" in maps.read()
    except OSError:
        return None


@dataclass(frozen=True)
class Pin:
    """Regions `regions` are lent by mapper `mapper_id` to `label` (e.g. a VM), process `pid`
    that started at `started` (None: unknown; such a pin is not kept across a restart)."""

    mapper_id: int
    label: str
    pid: int
    regions: frozenset[str]
    started: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "pid": self.pid, "regions": sorted(self.regions)}


class Pins:
    """The pins of attached mappers; pins of mappers that are gone are dropped when next seen.
    Pins adopted from a journal (their mapper belonged to the previous manager) live while their
    process does, or until a mapper pins for the same process (pid and start time)."""

    def __init__(self, started: Callable[[int], int | None] = process_start) -> None:
        self._by_mapper: dict[int, Pin] = {}
        self._adopted: list[Pin] = []
        self._started = started

    def set(
        self, mapper_id: int, label: str, pid: int, regions: Iterable[str], live: Container[int]
    ) -> Pin:
        """Pin `regions` for `mapper_id` (replacing its earlier pin; no regions unpins).
        Refused ("pinned") for a region another lender's live pin holds: two VMs on one
        region would each overwrite the other's RAM."""
        if not label or len(label) > MAX_LABEL or not label.isprintable():
            raise Refused("bad-request", f"a pin label must be 1 to {MAX_LABEL} printable chars")
        pin = Pin(mapper_id, label, pid, frozenset(regions), self._started(pid))
        for other in self._live(live):
            # (the same lender pinning again: itself, or its pin from before a restart, for
            # the same process: a label alone proves nothing)
            same = other.mapper_id == mapper_id or (
                other.pid == pid and other.started == pin.started
            )
            taken = sorted(other.regions & pin.regions)
            if taken and not same:
                raise Refused(
                    "pinned",
                    f"region {taken[0]!r} is lent to {other.label} (pid {other.pid}) already: "
                    "two VMs on one region would overwrite each other's RAM; run this one on "
                    "regions of its own (a second pc VM: on a manager of its own, another "
                    "--runtime-dir, since both boot from GPA 0)",
                )
        if pin.regions:
            self._by_mapper[mapper_id] = pin
        else:
            self._by_mapper.pop(mapper_id, None)
        # the lender registered again after a restart: its own pin, for the same process,
        # replaces the adopted one
        self._adopted = [p for p in self._adopted if (p.pid, p.started) != (pid, pin.started)]
        return pin

    def of(self, mapper_id: int) -> Pin | None:
        return self._by_mapper.get(mapper_id)

    def adopted_of(self, mapper_id: int) -> Pin | None:
        """The pin taken up from a journal that mapper `mapper_id` of the previous manager
        made, if its process still runs."""
        self._adopted = [p for p in self._adopted if self._runs(p)]
        return next((p for p in self._adopted if p.mapper_id == mapper_id), None)

    def adopt(self, pins: Iterable[Pin]) -> list[Pin]:
        """Take up the journaled pins whose process still runs; returns them."""
        self._adopted += [p for p in pins if self._runs(p)]
        return list(self._adopted)

    def kept(self, live: Container[int]) -> list[Pin]:
        """What a journal keeps: the pins whose process is known, of live mappers or adopted."""
        pins = [p for i, p in self._by_mapper.items() if i in live] + self._adopted
        return [p for p in pins if p.started is not None]

    def _runs(self, pin: Pin) -> bool:
        return pin.started is not None and self._started(pin.pid) == pin.started

    def _live(self, live: Container[int]) -> list[Pin]:
        """The live pins (pins of mappers not in `live`, and adopted pins whose process has
        ended, are forgotten)."""
        for gone in [i for i in self._by_mapper if i not in live]:
            del self._by_mapper[gone]
        self._adopted = [p for p in self._adopted if self._runs(p)]
        return [*self._by_mapper.values(), *self._adopted]

    def running(self, live: Container[int]) -> list[Pin]:
        """The pins of lenders that still run (their VMs run on the regions they lent)."""
        return self._live(live)

    def describe(self, live: Container[int]) -> list[dict[str, Any]]:
        """For `status`: each live pin, and whether it was taken up from the journal (its
        lender has not pinned again since a restart: no mapper of it is attached)."""
        return [p.describe() | {"journaled": p in self._adopted} for p in self._live(live)]

    def holders(self, region: str, live: Container[int]) -> list[Pin]:
        """The live pins on `region`."""
        return [p for p in self._live(live) if region in p.regions]

    def pinned(self, live: Container[int]) -> frozenset[str]:
        """The regions live pins hold."""
        return frozenset(r for p in self._live(live) for r in p.regions)

    def check(self, region: str, action: str, live: Container[int]) -> None:
        """Refuse `action` ("removed", "disabled", ...) on `region` while it is pinned."""
        pins = self.holders(region, live)
        if pins:
            who = ", ".join(
                f"{p.label} (pid {p.pid}, "
                + ("pinned before a restart)" if p in self._adopted else f"mapper {p.mapper_id})")
                for p in pins
            )
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
    pinned = state.pins.pinned(state.mappers) if cover is not None else frozenset()
    if not pinned:
        return  # (no walk of the 2,000 regions a region enabled over them would hide)
    priority, order = rank
    for other in state.placed.overlapping(cover) if cover is not None else ():
        hides = (priority, -order) > (other.priority, -other.order)
        if other.name in pinned and other.name != name and other.active and hides:
            state.pins.check(other.name, f"covered by region {name!r}", state.mappers)
