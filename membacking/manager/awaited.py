"""Mappers a restarted manager expects back. The journal lists the mappers that may hold memory
across a restart (id, pid, process start time); after a start that adopted a state, those whose
process still runs are awaited until they told what they hold (their Holdings, ended by an empty
one), their process ended, or the wait ran out. Meanwhile a control change that could cut
mappings waits (it is deferred, then run in order): the manager does not yet know what they map.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from ..protocol import messages as m
from .errors import Refused
from .journal import MapperRecord
from .pins import maps_guest_memory, process_start

log = logging.getLogger("membacking.manager")

#: control operations that may cut mappings (add_region only when it places an enabled region)
CUTTING_OPS = frozenset(
    {
        "add_region",
        "remove_region",
        "enable_region",
        "disable_region",
        "move_region",
        "map_range",
        "unmap_range",
    }
)
#: most control requests deferred at once; more are refused with the code `reattaching`
MAX_DEFERRED = 256


def may_cut(op: str, args: dict[str, Any]) -> bool:
    """Whether control operation `op` with `args` may cut a mapping some mapper holds."""
    if op not in CUTTING_OPS:
        return False
    if op == "add_region":  # only an enabled region placed now can cover another
        return args.get("gpa") is not None and not args.get("disabled")
    return True


class AwaitedMappers:
    """The mappers of this manager that may come back holding memory after its restart
    (journaled), and those of the previous manager awaited back now."""

    def __init__(
        self,
        started: Callable[[int], int | None] = process_start,
        maps: Callable[[int], bool | None] = maps_guest_memory,
    ) -> None:
        self._started = started
        #: whether a process maps guest memory (pins.maps_guest_memory): one whose wait ran
        #: out holding none (it gave up and dropped it, as a mapper must) is not "not back"
        self._maps = maps
        #: mapper id -> its record, for the live mappers that were told the state id
        self._live: dict[int, MapperRecord] = {}
        #: the journal's records, until `begin` keeps those whose process runs
        self._adopted: list[MapperRecord] = []
        #: records of the previous manager's mappers not back yet, and the ids of those whose
        #: /proc/PID/maps was read while they were (once: 15 ms with 30,000 VMAs)
        self.waiting: list[MapperRecord] = []
        self._looked: set[int] = set()
        #: those whose wait ran out while their process still runs: they may still map memory
        #: that changes since removed (named in their answers: `not_back`); kept in the journal
        #: until they come back or end, so a crash does not forget them
        self.gave_up: list[MapperRecord] = []
        #: when the wait ends for those not back (monotonic seconds)
        self.deadline = 0.0
        #: the journal no longer lists exactly `records()`: write it within a second
        self.dirty = False
        #: (pid, process start) of every record the last journal lists
        self._journaled: set[tuple[int, int]] = set()
        #: live mappers whose process no journal lists yet: none of them is sent a Map before
        #: the journal does (`saved`), or a crash meanwhile would forget a holder of memory,
        #: and a removal after the restart would not wait for it
        self.unjournaled: set[int] = set()
        #: control requests waiting for the mappers, in the order they came
        self._deferred: deque[tuple[bytes, m.ControlRequest]] = deque()

    # ---- this manager's mappers ----------------------------------------------------------------

    def register(self, mapper_id: int, pid: int) -> None:
        """A mapper that can keep what it maps across a restart was welcomed. Pid 0 (another
        pid namespace) cannot be told apart from others: it is not recorded."""
        started = self._started(pid) if pid > 0 else None
        if started is not None:
            self._live[mapper_id] = MapperRecord(mapper_id, pid, started)
            self.dirty = True
            if (pid, started) not in self._journaled:  # (one back after a restart is listed)
                self.unjournaled.add(mapper_id)

    def depart(self, mapper_id: int) -> None:
        self.unjournaled.discard(mapper_id)
        if self._live.pop(mapper_id, None) is not None:
            self.dirty = True

    def due_before(self, msg: m.Message) -> bool:
        """Whether the journal must be written before `msg` goes to a mapper: a `Map` or
        `MapEager` while a mapper no journal lists may receive it (a crash must not forget a
        holder of memory), a `DetachAck` once a mapper left (a crash must not have the next
        manager await a process that detached, holding changes up to its unmap timeout)."""
        if isinstance(msg, (m.Map, m.MapEager)):
            return bool(self.unjournaled)
        return self.dirty and isinstance(msg, m.DetachAck)

    def saved(self) -> None:
        """The journal is written now, listing `records()`."""
        self.dirty = False
        self._journaled = {(r.pid, r.started) for r in self.records()}
        self.unjournaled.clear()

    def records(self) -> tuple[MapperRecord, ...]:
        """What the journal keeps: live mappers, and those still awaited (a crash now must
        not forget them), but one record per mapper: an awaited one whose process has
        registered again (and not yet told all it holds) is that live one, not a second."""
        live = Counter(r.pid for r in self._live.values())
        awaited = []
        for record in (*self.waiting, *self.gave_up):
            if live[record.pid]:
                live[record.pid] -= 1
            else:
                awaited.append(record)
        return (*self._live.values(), *awaited)

    # ---- after a restart -----------------------------------------------------------------------

    def adopt(self, records: tuple[MapperRecord, ...]) -> None:
        """The journal's records (adopted state): awaited once `begin` found them running."""
        self._adopted = list(records)
        self._journaled = {(r.pid, r.started) for r in records}

    def begin(self, now: float, timeout: float) -> list[MapperRecord]:
        """Await the adopted mappers whose process runs (same start time), for at most
        `timeout` seconds from `now`. Returns them."""
        self.waiting = [r for r in self._adopted if self._runs(r)]
        self._adopted = []
        self.deadline = now + timeout
        self.dirty = True
        if self.waiting:
            log.info(
                "awaiting %d mapper(s) back (pids %s) for at most %gs: changes that could cut "
                "mappings wait until then",
                len(self.waiting),
                self.pids(),
                timeout,
            )
        return list(self.waiting)

    def _runs(self, record: MapperRecord) -> bool:
        return self._started(record.pid) == record.started

    def pids(self) -> str:
        return ", ".join(str(r.pid) for r in self.waiting)

    @property
    def open(self) -> bool:
        """Whether some mapper is still awaited."""
        return bool(self.waiting)

    def arrived(self, pid: int) -> bool:
        """A mapper of process `pid` told all it holds: one record of that pid is done."""
        for records in (self.waiting, self.gave_up):
            for i, record in enumerate(records):
                if record.pid == pid:
                    del records[i]
                    self.dirty = True
                    late = " (after its wait ran out)" if records is self.gave_up else ""
                    log.info("mapper %d (pid %d) is back%s", record.mapper_id, pid, late)
                    return True
        return False

    def not_back(self) -> list[int]:
        """Pids of the mappers whose wait ran out and whose process still runs."""
        return sorted(r.pid for r in self.gave_up)

    def _holds_nothing(self, record: MapperRecord, files: bool) -> bool:
        """Whether `record`'s process is seen to map no guest memory (not told where some
        regions are files of the operator's, whose names say nothing: `files`)."""
        if not files and self._maps(record.pid) is False:
            log.info(
                "mapper %d (pid %d) maps no guest memory any more: not awaited",
                record.mapper_id,
                record.pid,
            )
            return True
        return False

    def tick(self, now: float, files: bool = False) -> list[MapperRecord]:
        """Each second: forget the awaited mappers whose process ended, or that are seen to
        map no guest memory at the first tick that looks (`_holds_nothing`: one that gave up
        waiting for this manager dropped it all, and held every change for the whole wait);
        once the wait ran out, stop awaiting the rest and return them (they may still map
        memory: `gave_up`), but those seen to map none then."""
        if self.gave_up:
            running = [
                r for r in self.gave_up if self._runs(r) and not self._holds_nothing(r, files)
            ]
            if len(running) != len(self.gave_up):
                self.gave_up, self.dirty = running, True
        if not self.waiting:
            return []
        alive = []
        for record in self.waiting:
            first = record.mapper_id not in self._looked
            self._looked.add(record.mapper_id)
            if not self._runs(record):
                log.info("mapper %d (pid %d) ended: not awaited", record.mapper_id, record.pid)
            elif not first or not self._holds_nothing(record, files):
                alive.append(record)
        if len(alive) != len(self.waiting):
            self.waiting, self.dirty = alive, True
        if not alive or now < self.deadline:
            return []
        self.waiting = []
        alive = [r for r in alive if not self._holds_nothing(r, files)]
        self.gave_up += alive
        self.dirty = True
        return alive

    def describe(self, now: float) -> list[dict[str, Any]]:
        """For `status`: the mappers awaited and the seconds left."""
        left = round(max(0.0, self.deadline - now), 3)
        return [{"mapper": r.mapper_id, "pid": r.pid, "seconds_left": left} for r in self.waiting]

    # ---- deferred control requests -------------------------------------------------------------

    def defer(self, identity: bytes, op: str, args: dict[str, Any]) -> None:
        """Keep a request that could cut mappings until no mapper is awaited; refused with
        `reattaching` if too many wait already."""
        if len(self._deferred) >= MAX_DEFERRED:
            raise Refused(
                "reattaching",
                f"mappers of the previous manager (pids {self.pids()}) are not back yet and "
                f"{len(self._deferred)} changes wait for them already: retry later",
            )
        self._deferred.append((identity, m.ControlRequest(op, args)))

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def release(self) -> list[tuple[bytes, m.ControlRequest]]:
        """The deferred requests, in order, once no mapper is awaited (else none)."""
        if self.waiting or not self._deferred:
            return []
        out = list(self._deferred)
        self._deferred.clear()
        return out

    def drop(self) -> list[bytes]:
        """At shutdown: the clients whose requests were deferred (they are told it stops)."""
        out = [identity for identity, _ in self._deferred]
        self._deferred.clear()
        return out
