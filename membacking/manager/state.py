"""The manager's decisions as a sans-I/O state machine: messages in, effects out.

`ManagerState` adds the region manager (add, remove, enable, disable, move, sub-mappings) and the
control channel to the mapper and table layers. The daemon feeds it decoded messages and carries
out the effects it returns; tests do the same without any socket.
"""

from __future__ import annotations

import bisect
import functools
import logging
from typing import Any

from .. import units
from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE, Channel, Message
from ..protocol.ranges import PAGE_SIZE, MemoryRange
from .backing import hugepage_size
from .errors import POLICY_CODES, Refused
from .model import (
    BACKINGS,
    DEFAULT_ADDRESS_SPACE,
    Disconnect,
    Effect,
    Limits,
    MapperEntry,
    Mapping,
    Operation,
    Send,
    SendFd,
    removal_result,
    removal_summary,
)
from .peers import PeerState
from .pins import Pins, guard
from .regioninfo import MAX_LISTED_PIECES, piece_info, region_info
from .regions import MAX_PRIORITY, Pieces, Region, SubMapping, check_nesting, split_submappings
from .table import Lost

log = logging.getLogger("membacking.manager")


__all__ = [
    "DEFAULT_ADDRESS_SPACE",
    "MAX_LISTED_PIECES",
    "Disconnect",
    "Effect",
    "Limits",
    "ManagerState",
    "MapperEntry",
    "Mapping",
    "Operation",
    "Send",
    "SendFd",
    "piece_info",
    "region_info",
]


class ManagerState(PeerState):
    """All of the manager's bookkeeping; every input returns the effects to carry out."""

    def __init__(self, *args: Any, huge_page_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: a hugetlb mapping's GPA, size and file offset are multiples of this: MAP_FIXED of a
        #: hugetlb fd fails at any other address in every mapper
        self.huge_page_size = huge_page_size or hugepage_size()
        self._hugetlb: set[int] = set()  # mappables backed by hugetlb memfds
        #: where the state outlives the daemon, for `status` (persist.describe, set at start)
        self.persistence: dict[str, Any] = {"state_dir": None, "keep_state": False}
        #: while a start may still be undone: the "region added" lines, logged once it is not
        #: (startup.log_held); a refused start made nothing, so it claims no addition
        self.held_lines: list[tuple[Any, ...]] | None = None
        #: the URL metrics are served on, for `status` (None: not served; startup.py)
        self.metrics_url: str | None = None

    def _alignment(self, region: Region) -> int:
        """What a region's GPA must be a multiple of: the huge page size if any of it is
        backed by hugetlb memory (its mappables, counted as pieces change: a move of a region
        of 10,010 pieces looked at each, 3 ms)."""
        if region.backing == "hugetlb" or not self._hugetlb.isdisjoint(region.submappings.uses):
            return self.huge_page_size
        return PAGE_SIZE

    @functools.cached_property
    def pins(self) -> Pins:
        """Regions lent to running VMs: changing them is refused (pins.py)."""
        return Pins()

    def _region(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None or region.removing:
            what = "does not exist" if region is None else "is being removed"
            raise Refused("not-found", f"region {name!r} {what}")
        return region

    def _check_placement(
        self, name: str, gpa: int, size: int, priority: int, align: int = PAGE_SIZE
    ) -> MemoryRange:
        if gpa < 0:
            raise Refused("bad-request", f"gpa {units.format_address(gpa)} must not be negative")
        if gpa % align:
            what = f"{align} (a page)" if align == PAGE_SIZE else f"{align:#x} (the huge page size)"
            raise Refused(
                "bad-request", f"gpa {units.format_address(gpa)} must be a multiple of {what}"
            )
        if gpa + size > self.address_space:
            raise Refused(
                "out-of-range",
                f"{gpa:#x} + {size:#x} ends beyond the {self.address_space:#x}-byte address space",
            )
        rng = MemoryRange(gpa, gpa + size)
        near = sorted(self.placed.overlapping(rng), key=lambda r: r.order)  # oldest named first
        check_nesting(name, rng, priority, (r for r in near if not r.removing))
        return rng

    def _new_mappable(
        self, name: str, size: int, writable: bool, backing: str, path: str | None
    ) -> int:
        if backing == "private":
            return PRIVATE_MAPPABLE
        mappable_id = self._next_mappable_id
        self.store.create(mappable_id, name, size, writable, kind=backing, path=path)
        self._next_mappable_id += 1
        if backing == "hugetlb":
            self._hugetlb.add(mappable_id)
        return mappable_id

    def add_region(
        self,
        name: str,
        gpa: int | None,
        size: int,
        writable: bool,
        *,
        priority: int = 0,
        enabled: bool = True,
        backing: str = "memfd",
        path: str | None = None,
        reply_to: bytes | None = None,
    ) -> list[Effect]:
        """Create a region (and its backing); enabled regions become visible at once."""
        try:
            units.check_name(name, "region name")
        except ValueError as exc:
            raise Refused("bad-name", str(exc)) from None
        if name in self.regions:
            extra = " (it is being removed)" if self.regions[name].removing else ""
            raise Refused("exists", f"a region named {name!r} already exists{extra}")
        if size <= 0 or size % PAGE_SIZE:
            raise Refused("bad-request", units.page_error(size, "size", nonzero=True))
        if not 0 <= priority <= MAX_PRIORITY:
            raise Refused("bad-request", f"priority must be 0 to {MAX_PRIORITY}")
        if backing not in BACKINGS:
            raise Refused("bad-request", f"backing must be one of {', '.join(BACKINGS)}")
        if enabled and gpa is None:
            raise Refused("bad-request", "an enabled region needs a GPA")
        align = self.huge_page_size if backing == "hugetlb" else PAGE_SIZE
        if size % align:
            raise Refused(
                "bad-request",
                f"a hugetlb region's size must be a multiple of the {align >> 20} MiB huge page "
                f"size; {units.format_address(size)} is not",
            )
        if gpa is not None:
            rng = self._check_placement(name, gpa, size, priority, align)
            rank = (priority, self._next_order)
            guard(self, name, "added", rng if enabled else None, rank)
        if len(self.regions) >= self.limits.max_regions:
            held, limit = len(self.regions), self.limits.max_regions
            raise Refused(
                "limit",
                f"the manager holds {units.plural(held, 'region')}, its limit "
                f"({self.limits.origin('max_regions')}) is {limit}"
                + (f": remove {held - limit + 1} first" if held > limit else ""),
            )
        if backing == "private" and len(self.mappers) > 1:
            raise Refused("private", "private RAM needs a single mapper; more are attached")
        mappable_id = self._new_mappable(name, size, writable, backing, path)
        region = Region(
            name,
            size,
            priority,
            self._next_order,
            writable,
            backing,
            gpa,
            enabled,
            path=path,
            submappings=Pieces([SubMapping(0, size, mappable_id, 0, writable)]),
        )
        self._next_order += 1
        self._mappable_refs[mappable_id] += 1
        self.regions[name] = region
        self.changed_regions.add(name)
        bisect.insort(self.names, name)
        if gpa is not None:
            self.placed.add(region)
        self.region_bytes += size
        line = (
            "region %s added (%s, %d bytes, priority %d%s)",
            name,
            region.range or "not placed",
            size,
            priority,
            "" if enabled else ", disabled",
        )
        if self.held_lines is None:
            log.info(*line)
        else:
            self.held_lines.append(line)
        op = self.start_op(f"add {name}", reply_to)
        effects = self._reconcile([region.range], op) if region.range is not None else []

        def done(op: Operation) -> list[Effect]:
            if op.failures:
                return self._rollback_add(region, op)
            return self._reply(op, region_info(self, region))

        op.on_done = done
        return effects + self._maybe_finish(op)

    def _rollback_add(self, region: Region, failed: Operation) -> list[Effect]:
        """An eager mapper could not map the new region: unmap it everywhere, then refuse."""
        text = f"eager mapper(s) could not map region {region.name!r}: " + "; ".join(
            failed.failures
        )
        if region.removing or self.regions.get(region.name) is not region:
            # removed meanwhile: that removal unmaps it; only the add's answer is left to give
            log.error("%s (the region was removed meanwhile)", text)
            return self._reply_error(failed, "map-failed", text[:1000])
        log.error("%s: rolling back", text)
        self.counters["rollbacks"] += 1
        return self._remove(region, failed.reply_to, error=("map-failed", text[:1000]))

    def remove_region(self, name: str, reply_to: bytes | None = None) -> list[Effect]:
        """Remove a region; the reply waits until every holder acknowledged its Unmap."""
        region = self._region(name)
        guard(self, name, "removed")
        return self._remove(region, reply_to)

    def _remove(
        self, region: Region, reply_to: bytes | None, error: tuple[str, str] | None = None
    ) -> list[Effect]:
        region.removing = True
        self.changed_regions.add(region.name)
        op = self.start_op(f"remove {region.name}", reply_to)
        op.timed = True
        uses = region.submappings.uses  # kept as pieces change: no count piece by piece
        for mappable_id, n in uses.items():
            self._mappable_refs[mappable_id] -= n
        op.destroy.update(uses)
        effects = self._reconcile([region.range], op) if region.range is not None else []
        effects += self._release_leftovers(op)

        def done(op: Operation) -> list[Effect]:
            if self.regions.get(region.name) is region:
                del self.regions[region.name]
                del self.names[bisect.bisect_left(self.names, region.name)]
            self.placed.discard(region)
            # its pieces are freed on later turns, a batch at a time, not all in this one
            self.free_later(region.submappings.clear())
            self.region_bytes -= region.size
            self.counters["removals"] += 1
            result = removal_result(region.name, op)
            log.info("region %s removed (%s)", region.name, removal_summary(result))
            if error is not None:
                return self._reply_error(op, *error)
            return self._reply(op, result)

        op.on_done = done
        return effects + self._maybe_finish(op)

    def set_enabled(
        self, name: str, enabled: bool, gpa: int | None = None, reply_to: bytes | None = None
    ) -> list[Effect]:
        """Enable (optionally at a new GPA) or disable a region; the best region beneath a
        disabled one becomes visible again."""
        region = self._region(name)
        moving = gpa is not None and gpa != region.gpa
        if region.backing == "private" and region.enabled and (moving or not enabled):
            raise Refused(
                "private",
                f"region {name!r} is private RAM: its contents live only in the mapper and would "
                "be lost, so it cannot be disabled or moved (remove it and add it again)",
            )
        if moving or (region.enabled and not enabled):
            guard(self, name, "moved" if moving else "disabled")
        elif enabled and not region.enabled:
            guard(self, name, "enabled", region.range, (region.priority, region.order))
        old = region.range
        windows = [old] if old is not None else []
        op = self.start_op(f"{'enable' if enabled else 'disable'} {name}", reply_to)
        effects: list[Effect] = []
        cut: Lost = {}
        if gpa is not None and gpa != region.gpa:
            new = self._check_placement(
                name, gpa, region.size, region.priority, self._alignment(region)
            )
            if enabled:  # nor may it land over a lent region it would hide
                guard(self, name, "moved", new, (region.priority, region.order))
            if region.active:
                effects += self._deactivate(region, op, cut)
            self.placed.discard(region)
            region.gpa = gpa
            self.placed.add(region)
            windows.append(new)
        elif enabled and region.gpa is None:
            raise Refused("bad-request", f"region {name!r} has no GPA yet: give one")
        region.enabled = enabled
        self.changed_regions.add(name)
        effects += self._reconcile(windows, op, cut)

        def done(op: Operation) -> list[Effect]:
            if op.failures and enabled:
                region.enabled = False
                self.changed_regions.add(name)
                undo = self.start_op(f"roll back {name}", op.reply_to)
                text = f"eager mapper(s) could not map region {name!r}: " + "; ".join(op.failures)
                self.counters["rollbacks"] += 1
                undo.on_done = lambda u: self._reply_error(u, "map-failed", text[:1000])
                rollback = self._reconcile([r for r in (region.range,) if r is not None], undo)
                return rollback + self._maybe_finish(undo)
            return self._reply(op, region_info(self, region))

        op.on_done = done
        return effects + self._maybe_finish(op)

    def move_region(self, name: str, gpa: int, reply_to: bytes | None = None) -> list[Effect]:
        """Place a region at another GPA (BAR-style): unmapped there, mapped at the new place."""
        region = self._region(name)
        return self.set_enabled(name, region.enabled, gpa, reply_to)

    def change_mappings(
        self,
        name: str,
        offset: int,
        size: int,
        reply_to: bytes | None = None,
        *,
        replace: tuple[str, str | None, int, bool] | None = None,
    ) -> list[Effect]:
        """Remove [offset, offset+size) of a region's sub-mappings (splitting them), and with
        `replace=(backing, path, file_offset, writable)` put a new backing there, atomically."""
        region = self._region(name)
        guard(self, name, "re-mapped")
        if offset < 0 or size <= 0 or (offset | size) % PAGE_SIZE or offset + size > region.size:
            unaligned = offset < 0 or size <= 0 or (offset | size) % PAGE_SIZE
            raise Refused(
                "bad-request",
                f"offset {units.format_address(offset)} + size {units.format_address(size)} "
                f"must {'be page-aligned and ' if unaligned else ''}lie inside region {name!r} "
                f"({units.format_size(region.size)})",
            )
        if replace is not None and (replace[2] < 0 or replace[2] % PAGE_SIZE):
            raise Refused("bad-request", units.page_error(replace[2], "file offset"))
        self._check_huge_change(region, offset, size, replace)
        op = self.start_op(f"change {name}", reply_to)
        # only the pieces the change overlaps are looked at (found by bisection), and only the
        # table entries inside the range: the work does not grow with the region's other pieces
        first, last = region.submappings.span(offset, offset + size)
        touched = region.submappings.slice(first, last)
        kept, removed = split_submappings(touched, offset, size)
        new_sub = None
        if replace is not None:
            backing, path, file_offset, writable = replace
            mappable_id = self._new_mappable(
                f"{name}+{offset:#x}", size + file_offset, writable, backing, path
            )
            new_sub = SubMapping(offset, size, mappable_id, file_offset, writable)
            kept = sorted([*kept, new_sub], key=lambda s: s.offset)  # counted with `kept` below
        for sub in touched:
            self._mappable_refs[sub.mappable_id] -= 1
        for sub in kept:
            self._mappable_refs[sub.mappable_id] += 1
        op.destroy.update(s.mappable_id for s in removed if self._mappable_refs[s.mappable_id] == 0)
        region.submappings.replace(first, last, kept)
        self.changed_regions.add(name)
        effects: list[Effect] = []
        if region.active:
            cut: Lost = {}
            assert region.gpa is not None
            effects += self._cut(
                region, MemoryRange(region.gpa + offset, region.gpa + offset + size), op, cut
            )
            if new_sub is not None:
                effects += self._insert(region, new_sub, op)
            effects += self._refill(cut, op)
        effects += self._release_leftovers(op)

        def done(op: Operation) -> list[Effect]:
            # An eager mapper that could not map the new piece would never fault it in: it
            # becomes lazy (and faults what it lacks from now on) instead of missing memory.
            told: list[Effect] = []
            for mapper_id in sorted(op.failed_mappers):
                entry = self.mappers.get(mapper_id)
                if entry is None or not entry.eager:
                    continue
                entry.eager = False
                why = "; ".join(op.failures)
                log.warning(
                    "mapper %d is lazy from now on: it could not map %s: %s", mapper_id, name, why
                )
                self.counters["demotions"] += 1
                told.append(self._to_mapper(entry, m.EagerResult(False, why[:1000])))
            around = (offset, offset + size)
            info = region_info(self, region, around=around)
            if replace is None:  # an unmap says how much had a backing (0: a hole already)
                info["unmapped_bytes"] = sum(s.size for s in removed)
            return told + self._reply(op, info)

        op.on_done = done
        return effects + self._maybe_finish(op)

    def _check_huge_change(
        self,
        region: Region,
        offset: int,
        size: int,
        replace: tuple[str, str | None, int, bool] | None,
    ) -> None:
        """A change that cuts hugetlb memory, or puts some in, must fall on huge pages."""
        huge = self.huge_page_size
        subs = region.submappings
        cuts_huge = any(  # only the pieces the change overlaps (bisected), never all of them
            s.mappable_id in self._hugetlb for s in subs.slice(*subs.span(offset, offset + size))
        )
        adds_huge = replace is not None and replace[0] == "hugetlb"
        if not (cuts_huge or adds_huge):
            return
        misaligned = (offset | size) % huge or (adds_huge and (region.gpa or 0) % huge)
        if misaligned or (replace is not None and replace[2] % huge):
            raise Refused(
                "bad-request",
                f"hugetlb memory of region {region.name!r} can only be changed in whole huge "
                f"pages: offset, size, file offset and the region's gpa must be multiples "
                f"of {huge:#x}",
            )

    def handle_control(self, identity: bytes, msg: Message) -> list[Effect]:
        """A ControlRequest arrived from client `identity`."""
        from .control import run_control

        if not isinstance(msg, m.ControlRequest):
            self.reject("unexpected", f"{type(msg).__name__} on the control socket")
            return [
                Send(Channel.CONTROL, identity, m.Error("bad-request", "expected ControlRequest"))
            ]
        try:
            return run_control(self, identity, msg.op, msg.args)
        except Refused as exc:
            if exc.code in POLICY_CODES:  # a limit or policy, counted and logged as a mapper's
                self.refuse(exc.code, f"{msg.op}: {exc}")
            return [Send(Channel.CONTROL, identity, m.Error(exc.code, str(exc)))]

    def stats(self) -> dict[str, Any]:
        keys = (
            "faults",
            "maps_sent",
            "nomappings_sent",
            "unmaps_sent",
            "fds_sent",
            "removals",
            "evictions",
            "evict_kills",
            "evictions_by_operator",
            "rollbacks",
            "demotions",
            "invalidations",
            "invalidation_us_total",
            "evictions_invalid",
        )
        out: dict[str, Any] = {k: self.counters[k] for k in keys}
        out.update(
            regions=len(self.regions),
            region_bytes=self.region_bytes,
            mappers=len(self.mappers),
            address_space=self.address_space,
            rejected=dict(self.rejected),
            refused=dict(self.refused),
            uptime=round(self._clock() - self.started_at, 3),
        )
        return out
