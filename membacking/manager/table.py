"""The mapping table and the operations that change it, as a sans-I/O state machine.

Faults are answered from the table; every change to it (cut, activate, refill) queues messages to
mappers and an `Operation` that completes when each of them has answered.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE, Channel, Message
from ..protocol.rangemap import RangeMap
from ..protocol.ranges import MemoryRange
from . import cuts
from .backing import BackingStore
from .held import Held, Taken
from .later import WORK_BUDGET, do_work
from .logbudget import LogBudget
from .model import (
    DEFAULT_ADDRESS_SPACE,
    Effect,
    Holders,
    Limits,
    MapperEntry,
    Mapping,
    Operation,
    Send,
    SendFd,
)
from .placing import PIECES_PER_MESSAGE, Place, Unplaced
from .regions import PlacementIndex, Region, RegionsByName, SubMapping, changes, piece_count
from .steps import STEP_MESSAGES, Push, Refill, StepQueue

log = logging.getLogger("membacking.manager")

_GPA = operator.attrgetter("gpa")
#: a lazy holder's lost ranges of one cut that a refill reads one by one; more stand as their
#: span (`_refill`)
REFILL_EXACT = 256

#: mapper id -> the pieces it lost in each cut of one change
Lost = dict[int, list[Taken]]


class TableState:
    """The mapping table, fds granted, and operations waiting for mapper answers."""

    def __init__(
        self,
        store: BackingStore,
        *,
        address_space: int = DEFAULT_ADDRESS_SPACE,
        unmap_timeout: float = 30.0,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.address_space = address_space
        self.unmap_timeout = unmap_timeout
        self.limits = limits or Limits()
        self._clock = clock
        self._monotonic = monotonic
        self.started_at = clock()
        self.regions = RegionsByName()
        #: the regions' names, sorted: the `regions` listing pages through them by name
        self.names: list[str] = []
        #: the regions that have a GPA, by where they lie (kept in step with `regions`)
        self.placed = PlacementIndex()
        self.region_bytes = 0
        #: names of the regions whose journaled part changed (added, removed, enabled or
        #: disabled, moved, re-mapped) since the journal last packed them (journalcache.py)
        self.changed_regions: set[str] = set()
        #: called with the seconds an invalidation took, from request to the last ack
        self.removal_observer: Callable[[float], None] | None = None
        self.table: RangeMap[Mapping] = RangeMap()
        #: counts the changes to `table` (what was built from the table is current while it
        #: is the same: reattach.py's index of the mappings)
        self.table_generation = 0
        self._held_index: tuple[int, dict[Any, Any]] | None = None
        self._holdings_verdict: tuple[Any, Any] | None = None  # reattach.py's last check
        self.mappers: dict[int, MapperEntry] = {}
        self._by_identity: dict[bytes, tuple[int, int]] = {}  # identity -> (mapper id, role)
        self._pending: dict[tuple[int, int], Operation] = {}  # (mapper id, seq) -> operation
        self._mappable_refs: Counter[int] = Counter()  # mappable -> sub-mappings using it
        self._next_mapper_id = 1
        self._next_mappable_id = PRIVATE_MAPPABLE + 1
        #: mappables below this id existed before the restart (snapshot.py): the memory that
        #: mappers of the manager before may still map
        self.adopted_below = 0
        self._next_seq = 1
        self._next_order = 0
        #: mappers whose held ranges a cut took but did not delete yet (`work` deletes them)
        self._unsettled: dict[int, None] = {}
        #: objects changes let go of (table entries cut out, a removed region's pieces and
        #: journal records), freed a batch at a time by `work`
        self._trash: list[list[Any]] = []
        #: regions deactivated together whose tallies `work` empties (cuts.py)
        self.stale_tallies: list[list[Region]] = []
        #: mapper id -> what a departed mapper held, while the table's entries still name it
        #: among their holders (`work` takes those marks off a batch at a time: later.py)
        self.departed: dict[int, Held] = {}
        #: changes sending many messages, a batch per `step` (steps.py), in the order begun
        self.steps = StepQueue(self)
        #: active regions whose pieces are not all in the table yet (placing.py)
        self.unplaced = Unplaced()
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        #: messages `reject` refused, in all: unchanged while a message is handled, it was
        #: acted on (only that ends a peer's row of strikes, docs/PROTOCOL.md §11.2)
        self.rejections = 0
        #: requests turned down by a limit or a policy (not a peer's fault), by reason
        self.refused: Counter[str] = Counter()
        #: how many of those, and of the rejections, one peer may log (logbudget.py)
        self.log_budget = LogBudget()

    def reject(self, reason: str, detail: str, pid: int | None = None) -> None:
        """Count and log a rejected peer message (the log within `log_budget`)."""
        self.rejected[reason] += 1
        self.rejections += 1
        if not self.log_budget.allow("rejected", reason, pid, self._monotonic()):
            return
        log.warning(
            "rejected message (%s) from %s: %s",
            reason,
            f"pid {pid}" if pid is not None else "a peer of unknown pid (not a registered mapper)",
            detail,
            extra={"reason": reason, "peer_pid": pid},
        )

    def refuse(self, reason: str, detail: str, pid: int | None = None) -> None:
        """Count and log a request turned down by a limit or policy (kept apart from
        `rejected`, which counts peers that broke the protocol; the log within `log_budget`)."""
        self.refused[reason] += 1
        if not self.log_budget.allow("refused", reason, pid, self._monotonic()):
            return
        log.warning(
            "refused (%s) for %s: %s",
            reason,
            f"pid {pid}" if pid is not None else "a control client",
            detail,
            extra={"reason": reason, "peer_pid": pid},
        )

    def _mapping_at(self, rng: MemoryRange) -> Mapping | None:
        hit = self.table.lookup(rng.start)
        if hit is not None and hit[0] == rng:
            return hit[1]
        return None

    def _to_mapper(self, entry: MapperEntry, msg: Message) -> Send:
        assert entry.stream is not None
        return Send(Channel.MAPPER, entry.stream, msg)

    def _seq(self, entry: MapperEntry, op: Operation) -> int:
        seq = self._next_seq
        self._next_seq += 1
        entry.unacked[seq] = self._monotonic()
        op.waiting.add((entry.id, seq))
        self._pending[(entry.id, seq)] = op
        return seq

    def send_mappings(self, mapper_id: int, rng: MemoryRange) -> list[Effect]:
        """Answer a fault: Map for each mapping covering `rng` up to its first gap, then
        NoMapping of that gap, and nothing past it: the access fails there, and a huge access
        reaching across a hole mapped every region past it (61,000 VMAs for a read of 1 TiB)."""
        entry = self.mappers[mapper_id]
        if entry.stream is None:
            self.reject("not-attached", "SendMappings before the stream socket", entry.pid)
            return []
        self.counters["faults"] += 1
        log.debug("mapper %d faults %s", mapper_id, rng)
        if rng.end <= self.address_space:
            hit = self.table.lookup(rng.start)
            if hit is not None and hit[0].end >= rng.end:  # one mapping covers it: most faults
                return self._map_to(entry, hit[1])
        if self.unplaced:  # pieces of an activation not in the table yet go there first
            self.unplaced.place_range(self, rng)
        out: list[Effect] = []
        inside = rng.intersection(MemoryRange(0, self.address_space))
        if inside.is_empty():
            # wholly outside the space: one NoMapping, so the request is answered; of a request
            # reaching past the end, only the part inside is answered (a mapper asks for no GPA
            # beyond the space, docs/PROTOCOL.md §6.1)
            self.counters["nomappings_sent"] += 1
            return [Send(Channel.MAPPER, entry.stream, m.NoMapping(rng))]
        for sub, mapping in self.table.walk(inside):
            if mapping is None:
                out.append(Send(Channel.MAPPER, entry.stream, m.NoMapping(sub)))
                self.counters["nomappings_sent"] += 1
                break
            # The holder is recorded before the Map leaves, so a removal decided after this
            # point always sends this mapper an Unmap (queued behind the Map).
            out.extend(self._map_to(entry, mapping))
        return out

    def _map_to(self, entry: MapperEntry, mapping: Mapping, hold: bool = True) -> list[Effect]:
        """A Map of `mapping` to `entry`, recorded as held (unless not `hold`: the caller
        records a batch of them at once, `Held.extend`)."""
        mapping.holders.add(entry.id)
        if hold:
            entry.held[mapping.range] = mapping.mappable_id
        self.counters["maps_sent"] += 1
        msg = m.Map(mapping.range, mapping.mappable_id, mapping.file_offset, mapping.writable)
        return [self._to_mapper(entry, msg), *self._fd_behind_map(entry, mapping.mappable_id)]

    def _map_eager(
        self, entry: MapperEntry, mapping: Mapping, op: Operation, hold: bool = True
    ) -> list[Effect]:
        mapping.holders.add(entry.id)
        if hold:
            entry.held[mapping.range] = mapping.mappable_id
        self.counters["maps_sent"] += 1
        seq = self._seq(entry, op)
        op.eager[(entry.id, seq)] = mapping.range
        msg = m.MapEager(
            seq, mapping.range, mapping.mappable_id, mapping.file_offset, mapping.writable
        )
        return [self._to_mapper(entry, msg), *self._fd_behind_map(entry, mapping.mappable_id)]

    def _fd_behind_map(self, entry: MapperEntry, mappable_id: int) -> list[Effect]:
        """The fd a mapper needs for the Map just queued, unless it has it (or it is private):
        pushed right behind the Map, so a first fault costs no extra round trip."""
        if mappable_id == PRIVATE_MAPPABLE or mappable_id in entry.fds_sent:
            return []
        if len(entry.fds_sent) >= self.limits.max_fds_per_mapper:
            limit = self.limits.max_fds_per_mapper
            self.refuse("limit", f"fd limit of {limit} reached", entry.pid)
            origin = self.limits.origin("max_fds_per_mapper")
            reason = f"this mapper holds its limit of {limit} fds ({origin})"
            return [SendFd(entry.id, m.FdDenied(mappable_id, reason))]
        size, writable = self.store.describe(mappable_id)
        entry.fds_sent.add(mappable_id)
        self.counters["fds_sent"] += 1
        return [SendFd(entry.id, m.FdGrant(mappable_id, size, writable))]

    def resend_fd(self, entry: MapperEntry, mappable_id: int) -> list[Effect]:
        """A mapper's FdGrant arrived without its fd (the kernel dropped it at the mapper's
        open-file limit): push it again, if the mapper still holds the mappable."""
        if mappable_id not in entry.fds_sent:
            # released or destroyed since (or never sent): the Map that needed it is stale
            reason = f"mappable {mappable_id} is not held by this mapper (released, or removed)"
            return [SendFd(entry.id, m.FdDenied(mappable_id, reason))]
        entry.fds_sent.discard(mappable_id)  # counted again in fds_sent
        return self._fd_behind_map(entry, mappable_id)

    def _ack(self, mapper_id: int, seq: int, failure: str | None) -> list[Effect]:
        entry = self.mappers[mapper_id]
        op = self._pending.pop((mapper_id, seq), None)
        if op is None:
            self.reject("unknown-seq", f"acknowledgement of unknown seq {seq}", entry.pid)
            return []
        entry.unacked.pop(seq, None)
        entry.unmapping.pop(seq, None)
        op.waiting.discard((mapper_id, seq))
        # each answer takes its MapEager's record: a change that pushed 80,000 would free them
        # all in its last answer's turn
        rng = op.eager.pop((mapper_id, seq), None) if op.eager else None
        if failure is not None:
            op.failures.append(f"mapper {mapper_id} ({entry.name}): {failure}")
            op.failed_mappers.add(mapper_id)
            if rng is not None:  # the mapper does not hold what it failed to map
                entry.held.pop(rng, None)
                mapping = self._mapping_at(rng)
                if mapping is not None:
                    mapping.holders.discard(mapper_id)
        return self._maybe_finish(op)

    def _maybe_finish(self, op: Operation) -> list[Effect]:
        if op.waiting:
            return []
        if op.timed or op.unmapped_from:
            seconds = self._monotonic() - op.started
            self.counters["invalidations"] += 1
            self.counters["invalidation_us_total"] += round(seconds * 1e6)
            if self.removal_observer is not None:
                self.removal_observer(seconds)
        for mappable_id in op.destroy:
            if self._mappable_refs[mappable_id] == 0:
                self._mappable_refs.pop(mappable_id, None)
                if mappable_id != PRIVATE_MAPPABLE:
                    self.store.destroy(mappable_id)
        effects = op.on_done(op) if op.on_done is not None else []
        return effects

    def _cut(self, region: Region, rng: MemoryRange, op: Operation, cut: Lost) -> list[Effect]:
        """Take `rng`, inside active `region`, out of the table (cuts.py)."""
        return cuts.cut(self, region, rng, op, cut)

    def _held_of(self, mapper_id: int) -> Held:
        """What a mapper holds; of a departed one, what still marks the table (later.py)."""
        entry = self.mappers.get(mapper_id)
        return entry.held if entry is not None else self.departed[mapper_id]

    def free_later(self, items: list[Any]) -> None:
        """Let `work` free `items` (a list no one else refers to) a batch at a time: freeing
        tens of thousands of objects at once holds the loop for milliseconds."""
        if items:
            self._trash.append(items)

    @property
    def has_work(self) -> bool:
        """Whether changes left work for later turns (`work`)."""
        return bool(self._unsettled or self._trash or self.departed or self.stale_tallies)

    def work(self, budget: int = WORK_BUDGET) -> int:
        """Do some of what changes left for later turns, about `budget` units: delete the held
        ranges cuts took (a holder at a time), then free what they let go of (`free_later`). The
        daemon's loop calls it between the messages it serves while `has_work`, so a removal
        of 10,010 pieces held by 72 mappers does not hold the loop for 20 to 50 ms in one turn.
        Nothing it does changes what any message is answered: a holder's ranges are settled
        anyway the moment anything else reads or changes them. Returns the units done."""
        return do_work(self, budget)

    @property
    def has_steps(self) -> bool:
        """Whether a change still has messages to send in later steps (`step`)."""
        return bool(self.steps)

    def step(self) -> list[Effect]:
        """One batch of the messages changes left for later (steps.py); the daemon's loop
        calls it between the messages it serves while `has_steps`."""
        return self.steps.run_one()

    def unfinished(self) -> list[Operation]:
        """The changes waiting for mappers' answers or for their own later steps."""
        ops = {id(op): op for op in self._pending.values()}
        ops.update((id(op), op) for op in self.steps.ops())
        return list(ops.values())

    def _releasable(self, entry: MapperEntry, destroy: set[int]) -> tuple[int, ...]:
        if not destroy:
            return ()
        held, refs = entry.held, self._mappable_refs
        # A mappable no sub-mapping uses any more (refs 0) backs no table entry, so a mapper
        # holds none of it once the cut's ranges are taken: no need to settle what a cut took
        # (and delete 10,000 ranges in this turn) to know it.
        out = tuple(
            sorted(
                i
                for i in destroy
                if i in entry.fds_sent and ((held.later and not refs[i]) or not held.maps(i))
            )
        )
        entry.fds_sent.difference_update(out)
        return out

    def _release_leftovers(self, op: Operation) -> list[Effect]:
        """Mappers holding fds of destroyed mappables they no longer map get a Release."""
        effects: list[Effect] = []
        doomed = {i for i in op.destroy if self._mappable_refs[i] == 0}
        for entry in self.mappers.values():
            release = self._releasable(entry, doomed)
            if release and entry.stream is not None:
                effects.append(self._to_mapper(entry, m.Release(self._seq(entry, op), release)))
        return effects

    def _activate(self, region: Region, new: list[Mapping]) -> None:
        """Put the region's pieces in the table (`new` gets them, to push to eager mappers)."""
        region.active = True
        new.extend(self._entry(region, sub) for sub in region.submappings)

    def _insert(self, region: Region, sub: SubMapping, op: Operation) -> list[Effect]:
        return self._push([self._entry(region, sub)], op)

    def _entry(self, region: Region, sub: SubMapping) -> Mapping:
        rng = region.absolute(sub)
        writable = sub.writable and region.writable
        holders = Holders(region.tally())
        mapping = Mapping(region.name, rng, sub.mappable_id, sub.file_offset, writable, holders)
        self.table.insert(rng, mapping)
        self.table_generation += 1
        return mapping

    def _push(self, mappings: list[Mapping], op: Operation, now: bool = True) -> list[Effect]:
        """MapEager of new table entries to every eager (or upgrading) mapper: a batch now
        (unless not `now`), the rest on later steps when there are many (steps.Push)."""
        if not mappings or not any(e.eager or e.upgrading for e in self.mappers.values()):
            return []
        return self.steps.begin(Push(mappings, op), now)

    def _refill(self, cut: Lost, op: Operation, now: bool = True) -> list[Effect]:
        """Lazy holders of replaced memory get the new mapping right behind their Unmap, so a
        reader sees the old or the new backing, never a hole it was not told about: a batch
        now, the rest on later steps when there are many (steps.Refill)."""
        runs: list[tuple[int, list[MemoryRange]]] = []
        for mapper_id, taken_runs in cut.items():
            entry = self.mappers.get(mapper_id)  # (gone since the cut, if it was steps ago)
            if entry is None or entry.eager or entry.upgrading:
                continue  # eager mappers are sent MapEager
            # the pieces of every run are read before the first Map settles the mapper's held
            # ranges; a run nothing now overlaps is not read at all; a run of many stands as
            # its span (what lies between them is mapped too, harmless: copying the ranges
            # of 10,000 regions hidden at once, for each of 64 holders, took 3-4 ms)
            runs += [
                (mapper_id, taken.ranges() if taken.count <= REFILL_EXACT else [taken.span])
                for taken in taken_runs
                if self.table.first_overlap(taken.span) is not None
            ]
        return self.steps.begin(Refill(runs, op), now) if runs else []

    def _reconcile(
        self,
        windows: Iterable[MemoryRange],
        op: Operation,
        cut: Lost | None = None,
        *,
        at_once: bool = False,
    ) -> list[Effect]:
        """Make the table match the region rules inside `windows`: deactivate (regions with
        nothing between them in one cut: cuts.py), then activate. The pieces of a large
        activation go in the table a batch per step (placing.py) unless `at_once`."""
        windows = list(windows)
        down: list[Region] = []
        up: list[Region] = []
        for window in windows:
            went, came = changes(self.placed.near(window))
            down += went
            up += came
        if len(windows) > 1:  # a region in two windows (has the same verdict in both) once
            down = sorted({id(r): r for r in down}.values(), key=_GPA)
            up = sorted({id(r): r for r in up}.values(), key=_GPA)
        cut = {} if cut is None else cut
        effects: list[Effect] = []
        for run in cuts.deactivation_runs(self, down):
            if len(run) == 1:
                effects += self._deactivate(run[0], op, cut)
            else:
                effects += cuts.cut_regions(self, run, op, cut)
        # a change of many regions sends its first batches on the next turns, not in its own
        now = len(down) + len(up) <= STEP_MESSAGES
        few = STEP_MESSAGES * PIECES_PER_MESSAGE  # (each region has a piece at least)
        if at_once or (len(up) <= few and piece_count(up) <= few):
            new: list[Mapping] = []
            for region in up:
                self._activate(region, new)
            return effects + self._push(new, op, now) + self._refill(cut, op, now)
        place = Place(up, op, cut)
        self.unplaced.add(up, place)
        return effects + self.steps.begin(place, now=False)

    def _deactivate(self, region: Region, op: Operation, cut: Lost) -> list[Effect]:
        region.active = False
        self.unplaced.discard(region)  # what was not put in the table yet never will be
        # Active regions never overlap, so what the table holds in its range is its own: one
        # cut (and one Unmap per holder) for all of its pieces.
        assert region.range is not None
        return self._cut(region, region.range, op, cut)

    def start_op(self, what: str, reply_to: bytes | None) -> Operation:
        return Operation(what, self._monotonic(), reply_to)

    def _reply(self, op: Operation, result: Any) -> list[Effect]:
        """The answer to the change `op`; with the mappers evicted while it waited on them
        (`evicted`, `evicted_why`, as a removal's answer has them) when there were any."""
        if op.reply_to is None:
            return []
        if op.evicted and isinstance(result, dict) and "evicted" not in result:
            result = {
                **result,
                "evicted": sorted(op.evicted),
                "evicted_why": {str(i): why for i, why in sorted(op.evicted.items())},
            }
        awaited = getattr(self, "awaited", None)  # (peers.py: mappers gone past their wait)
        # (a removal of memory made since the restart cannot concern them: not said)
        older = not op.destroy or any(
            PRIVATE_MAPPABLE < i < self.adopted_below for i in op.destroy
        )  # (private RAM is no other mapper's)
        if awaited is not None and awaited.gave_up and older and isinstance(result, dict):
            result = {**result, "not_back": awaited.not_back()}
        return [Send(Channel.CONTROL, op.reply_to, m.ControlReply(result))]

    def _reply_error(self, op: Operation, code: str, text: str) -> list[Effect]:
        if op.reply_to is None:
            return []
        return [Send(Channel.CONTROL, op.reply_to, m.Error(code, text))]
