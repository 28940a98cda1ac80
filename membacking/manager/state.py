"""The manager's decisions as a sans-I/O state machine: messages in, effects out.

It owns the regions, the mapping table, the mapper registry (ids never reused), the holders of each
mapping and the operations waiting for mapper acknowledgements. The daemon feeds it decoded
messages and carries out the `Send` effects it returns; tests do the same without any socket.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE, Channel, Message
from ..protocol.rangemap import RangeMap
from ..protocol.ranges import PAGE_SIZE, MemoryRange
from .backing import BackingStore
from .errors import Refused
from .regions import MAX_PRIORITY, Region, SubMapping, check_nesting, desired_active

log = logging.getLogger("membacking.manager")

DEFAULT_ADDRESS_SPACE = 1 << 40  # 1 TiB of guest-physical address space
BACKINGS = ("memfd", "file", "hugetlb", "private")


@dataclass(frozen=True)
class Limits:
    """Resource limits; a request beyond one is refused with code "limit"."""

    max_mappers: int = 1024
    max_regions: int = 16384  # a mapper can hold ~32k separate mappings (vm.max_map_count)
    max_fds_per_mapper: int = 4096


@dataclass(frozen=True)
class Send:
    """Effect: send `msg` on `channel` to the peer with routing `identity`."""

    channel: Channel
    identity: bytes
    msg: Message


@dataclass(frozen=True)
class Disconnect:
    """Effect: close the fd-socket connection of a mapper that was evicted."""

    mapper_id: int


Effect = Send | Disconnect


@dataclass
class Mapping:
    """An entry of the mapping table: an active piece of a region."""

    region: str
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool
    holders: set[int] = field(default_factory=set)


@dataclass
class MapperEntry:
    id: int
    name: str
    pid: int
    token: bytes
    connected_at: float
    last_seen: float
    stream: bytes | None = None  # ROUTER identity of the stream socket
    requests: bytes | None = None  # ROUTER identity of the requests socket
    held: dict[MemoryRange, int] = field(default_factory=dict)  # mapping range -> mappable id
    fds_sent: set[int] = field(default_factory=set)
    unacked: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    eager: bool = False
    upgrading: bool = False

    @property
    def mode(self) -> str:
        return "eager" if self.eager else "lazy"


@dataclass
class Operation:
    """A change that completes when every mapper it waits for has answered."""

    what: str
    started: float
    reply_to: bytes | None = None
    waiting: set[tuple[int, int]] = field(default_factory=set)  # (mapper id, seq)
    unmapped_from: set[int] = field(default_factory=set)
    destroy: set[int] = field(default_factory=set)  # mappables to destroy once complete
    failures: list[str] = field(default_factory=list)
    eager: dict[tuple[int, int], MemoryRange] = field(default_factory=dict)  # MapEager sent
    #: an invalidation: its duration goes to `removal_observer`
    timed: bool = False
    #: builds the reply (and any follow-up effects) once nothing is pending
    on_done: Callable[[Operation], list[Effect]] | None = None


class ManagerState:
    """All of the manager's bookkeeping; every input returns the effects to carry out."""

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
        self.regions: dict[str, Region] = {}
        self.region_bytes = 0
        #: called with the seconds an invalidation took, from request to the last ack
        self.removal_observer: Callable[[float], None] | None = None
        self.table: RangeMap[Mapping] = RangeMap()
        self.mappers: dict[int, MapperEntry] = {}
        self._by_identity: dict[bytes, tuple[int, int]] = {}  # identity -> (mapper id, role)
        self._pending: dict[tuple[int, int], Operation] = {}  # (mapper id, seq) -> operation
        self._mappable_refs: Counter[int] = Counter()  # mappable -> sub-mappings using it
        self._next_mapper_id = 1
        self._next_mappable_id = PRIVATE_MAPPABLE + 1
        self._next_seq = 1
        self._next_order = 0
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    # ---- peers ---------------------------------------------------------------------------------

    def reject(self, reason: str, detail: str, pid: int | None = None) -> None:
        """Count and log a rejected peer message."""
        self.rejected[reason] += 1
        log.warning(
            "rejected message (%s) from pid %s: %s",
            reason,
            pid,
            detail,
            extra={"reason": reason, "peer_pid": pid},
        )

    def has_private_regions(self) -> bool:
        return any(r.backing == "private" for r in self.regions.values())

    def register_mapper(self, name: str, pid: int) -> MapperEntry:
        """A mapper said Hello on the fd socket: give it an id (never reused) and a token."""
        if len(self.mappers) >= self.limits.max_mappers:
            self.reject("limit", f"mapper {name!r} refused: {len(self.mappers)} attached", pid)
            raise Refused(
                "limit",
                f"the manager already serves its limit of {self.limits.max_mappers} mappers",
            )
        if self.mappers and self.has_private_regions():
            raise Refused("private", "private RAM regions exist: only one mapper may attach")
        now = self._clock()
        token = secrets.token_bytes(m.TOKEN_BYTES)
        entry = MapperEntry(self._next_mapper_id, name, pid, token, now, now)
        self._next_mapper_id += 1
        self.mappers[entry.id] = entry
        log.info("mapper %d (%s, pid %d) registered", entry.id, name, pid)
        return entry

    def welcome(self, entry: MapperEntry) -> m.Welcome:
        return m.Welcome(entry.id, entry.token, self.address_space, PAGE_SIZE)

    def mapper_of(self, identity: bytes) -> int | None:
        """The mapper a ZeroMQ socket identity is bound to, if any."""
        bound = self._by_identity.get(identity)
        return bound[0] if bound else None

    def mapper_gone(self, mapper_id: int, why: str = "disconnected") -> list[Effect]:
        """A mapper detached, died or was evicted: forget it and unblock what waited on it."""
        entry = self.mappers.pop(mapper_id, None)
        if entry is None:
            return []
        log.info("mapper %d (%s, pid %d) removed: %s", entry.id, entry.name, entry.pid, why)
        for identity in (entry.stream, entry.requests):
            if identity is not None:
                self._by_identity.pop(identity, None)
        for rng in entry.held:
            mapping = self._mapping_at(rng)
            if mapping is not None:
                mapping.holders.discard(mapper_id)
        effects: list[Effect] = []
        for seq in list(entry.unacked):
            op = self._pending.pop((mapper_id, seq), None)
            if op is not None:
                op.waiting.discard((mapper_id, seq))
                effects.extend(self._maybe_finish(op))
        return effects

    def _mapping_at(self, rng: MemoryRange) -> Mapping | None:
        hit = self.table.lookup(rng.start)
        if hit is not None and hit[0] == rng:
            return hit[1]
        return None

    def handle_mapper(self, identity: bytes, msg: Message) -> list[Effect]:
        """A decoded message arrived on the mapper ROUTER from `identity`."""
        if isinstance(msg, m.Attach):
            return self._attach(identity, msg)
        bound = self._by_identity.get(identity)
        if bound is None:
            self.reject("not-attached", f"{type(msg).__name__} from an unattached socket")
            return [self._error(identity, "not-attached", "send Attach first")]
        mapper_id, role = bound
        entry = self.mappers[mapper_id]
        entry.last_seen = self._clock()
        if role == m.ROLE_REQUESTS and isinstance(msg, m.SendMappings):
            return self.send_mappings(mapper_id, msg.range)
        if role == m.ROLE_STREAM:
            if isinstance(msg, m.UnmapAck):
                return self._ack(mapper_id, msg.seq, None)
            if isinstance(msg, m.MapAck):
                return self._ack(mapper_id, msg.seq, None if msg.ok else msg.message or "failed")
            if isinstance(msg, m.SetEager):
                return self._upgrade(entry)
            if isinstance(msg, m.Detach):
                return self.mapper_gone(mapper_id, "detached")
        self.reject("unexpected", f"{type(msg).__name__} on a role-{role} socket", entry.pid)
        return [self._error(identity, "unexpected", f"{type(msg).__name__} is not accepted here")]

    def _error(self, identity: bytes, code: str, text: str) -> Send:
        return Send(Channel.MAPPER, identity, m.Error(code, text))

    def _attach(self, identity: bytes, msg: m.Attach) -> list[Effect]:
        entry = self.mappers.get(msg.mapper_id)
        if entry is None or not secrets.compare_digest(entry.token, msg.token):
            self.reject("bad-token", f"Attach for mapper {msg.mapper_id} with a wrong token")
            return [self._error(identity, "bad-token", "unknown mapper id or wrong token")]
        if msg.role not in (m.ROLE_STREAM, m.ROLE_REQUESTS):
            self.reject("bad-role", f"Attach with role {msg.role}", entry.pid)
            return [self._error(identity, "bad-role", "role must be 0 (stream) or 1 (requests)")]
        current = entry.stream if msg.role == m.ROLE_STREAM else entry.requests
        if current is not None or identity in self._by_identity:
            self.reject("already-attached", f"second role-{msg.role} socket", entry.pid)
            return [self._error(identity, "already-attached", "that role is already bound")]
        if msg.role == m.ROLE_STREAM:
            entry.stream = identity
        else:
            entry.requests = identity
        self._by_identity[identity] = (entry.id, msg.role)
        return [Send(Channel.MAPPER, identity, m.Attached(msg.role))]

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

    # ---- lazy mapping --------------------------------------------------------------------------

    def send_mappings(self, mapper_id: int, rng: MemoryRange) -> list[Effect]:
        """Answer a fault: Map for each mapping covering `rng`, NoMapping for each gap."""
        entry = self.mappers[mapper_id]
        if entry.stream is None:
            self.reject("not-attached", "SendMappings before the stream socket", entry.pid)
            return []
        self.counters["faults"] += 1
        out: list[Effect] = []
        inside = rng.intersection(MemoryRange(0, self.address_space))
        if not inside.is_empty():
            for sub, mapping in self.table.walk(inside):
                if mapping is None:
                    out.append(Send(Channel.MAPPER, entry.stream, m.NoMapping(sub)))
                    self.counters["nomappings_sent"] += 1
                    continue
                # The holder is recorded before the Map leaves, so a removal decided after this
                # point always sends this mapper an Unmap (queued behind the Map).
                out.append(self._map_to(entry, mapping))
        for outside in rng.subtract(MemoryRange(0, self.address_space)):
            out.append(Send(Channel.MAPPER, entry.stream, m.NoMapping(outside)))
            self.counters["nomappings_sent"] += 1
        return out

    def _map_to(self, entry: MapperEntry, mapping: Mapping) -> Send:
        mapping.holders.add(entry.id)
        entry.held[mapping.range] = mapping.mappable_id
        self.counters["maps_sent"] += 1
        return self._to_mapper(
            entry, m.Map(mapping.range, mapping.mappable_id, mapping.file_offset, mapping.writable)
        )

    def _map_eager(self, entry: MapperEntry, mapping: Mapping, op: Operation) -> Send:
        mapping.holders.add(entry.id)
        entry.held[mapping.range] = mapping.mappable_id
        self.counters["maps_sent"] += 1
        seq = self._seq(entry, op)
        op.eager[(entry.id, seq)] = mapping.range
        return self._to_mapper(
            entry,
            m.MapEager(
                seq, mapping.range, mapping.mappable_id, mapping.file_offset, mapping.writable
            ),
        )

    def fd_request(self, mapper_id: int, mappable_id: int) -> m.FdGrant | m.FdDenied:
        """Decide whether a mapper may receive a mappable's fd (once, after a Map for it)."""
        entry = self.mappers.get(mapper_id)
        if entry is None:
            return m.FdDenied(mappable_id, "unknown mapper")
        entry.last_seen = self._clock()
        if mappable_id in entry.fds_sent:
            self.reject("fd-again", f"fd of mappable {mappable_id} requested twice", entry.pid)
            return m.FdDenied(mappable_id, "this mapper was already sent that fd")
        if mappable_id == PRIVATE_MAPPABLE or mappable_id not in entry.held.values():
            return m.FdDenied(mappable_id, "no current mapping of that mappable was sent to you")
        if len(entry.fds_sent) >= self.limits.max_fds_per_mapper:
            self.reject("limit", f"fd limit of {self.limits.max_fds_per_mapper} reached", entry.pid)
            return m.FdDenied(
                mappable_id, f"this mapper holds its limit of {self.limits.max_fds_per_mapper} fds"
            )
        size, writable = self.store.describe(mappable_id)
        entry.fds_sent.add(mappable_id)
        self.counters["fds_sent"] += 1
        return m.FdGrant(mappable_id, size, writable)

    # ---- operations ----------------------------------------------------------------------------

    def _ack(self, mapper_id: int, seq: int, failure: str | None) -> list[Effect]:
        entry = self.mappers[mapper_id]
        op = self._pending.pop((mapper_id, seq), None)
        if op is None:
            self.reject("unknown-seq", f"acknowledgement of unknown seq {seq}", entry.pid)
            return []
        entry.unacked.pop(seq, None)
        op.waiting.discard((mapper_id, seq))
        if failure is not None:
            op.failures.append(f"mapper {mapper_id} ({entry.name}): {failure}")
            rng = op.eager.get((mapper_id, seq))
            if rng is not None:  # the mapper does not hold what it failed to map
                entry.held.pop(rng, None)
                mapping = self._mapping_at(rng)
                if mapping is not None:
                    mapping.holders.discard(mapper_id)
        return self._maybe_finish(op)

    def _maybe_finish(self, op: Operation) -> list[Effect]:
        if op.waiting:
            return []
        if self.removal_observer is not None and (op.timed or op.unmapped_from):
            self.removal_observer(self._monotonic() - op.started)
        for mappable_id in op.destroy:
            if self._mappable_refs[mappable_id] == 0:
                self._mappable_refs.pop(mappable_id, None)
                if mappable_id != PRIVATE_MAPPABLE:
                    self.store.destroy(mappable_id)
        effects = op.on_done(op) if op.on_done is not None else []
        return effects

    def _cut(
        self, rng: MemoryRange, op: Operation, cut: dict[int, list[MemoryRange]]
    ) -> list[Effect]:
        """Take `rng` out of the table: Unmap the cut pieces to their holders (only to them)."""
        effects: list[Effect] = []
        for mrange, mapping in self.table.overlapping(rng):
            self.table.remove(mrange)
            piece = mrange.intersection(rng)
            for part in mrange.subtract(rng):
                kept = Mapping(
                    mapping.region,
                    part,
                    mapping.mappable_id,
                    mapping.file_offset + (part.start - mrange.start),
                    mapping.writable,
                    set(mapping.holders),
                )
                self.table.insert(part, kept)
                for holder in kept.holders:
                    self.mappers[holder].held[part] = kept.mappable_id
            for holder in sorted(mapping.holders):
                entry = self.mappers[holder]
                entry.held.pop(mrange, None)
                release = self._releasable(entry, op.destroy)
                seq = self._seq(entry, op)
                effects.append(self._to_mapper(entry, m.Unmap(seq, piece, release)))
                self.counters["unmaps_sent"] += 1
                op.unmapped_from.add(holder)
                cut.setdefault(holder, []).append(piece)
        return effects

    def _releasable(self, entry: MapperEntry, destroy: set[int]) -> tuple[int, ...]:
        if not destroy:
            return ()
        still = set(entry.held.values())
        out = tuple(sorted(i for i in destroy if i in entry.fds_sent and i not in still))
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

    def _activate(self, region: Region, op: Operation) -> list[Effect]:
        effects: list[Effect] = []
        region.active = True
        for sub in region.submappings:
            effects.extend(self._insert(region, sub, op))
        return effects

    def _insert(self, region: Region, sub: SubMapping, op: Operation) -> list[Effect]:
        rng = region.absolute(sub)
        mapping = Mapping(
            region.name, rng, sub.mappable_id, sub.file_offset, sub.writable and region.writable
        )
        self.table.insert(rng, mapping)
        return [
            self._map_eager(e, mapping, op)
            for e in self.mappers.values()
            if (e.eager or e.upgrading) and e.stream is not None
        ]

    def _refill(self, cut: dict[int, list[MemoryRange]]) -> list[Effect]:
        """Lazy holders of replaced memory get the new mapping right behind their Unmap, so a
        reader sees the old or the new backing, never a hole it was not told about."""
        effects: list[Effect] = []
        for mapper_id, pieces in cut.items():
            entry = self.mappers[mapper_id]
            if entry.eager or entry.upgrading:
                continue  # eager mappers were sent MapEager already
            for piece in pieces:
                for _, mapping in self.table.overlapping(piece):
                    if mapper_id not in mapping.holders:
                        effects.append(self._map_to(entry, mapping))
        return effects

    def _reconcile(
        self,
        windows: Iterable[MemoryRange],
        op: Operation,
        cut: dict[int, list[MemoryRange]] | None = None,
    ) -> list[Effect]:
        """Make the table match the region rules inside `windows` (deactivate, then activate)."""
        desired: dict[str, bool] = {}
        for window in windows:
            desired.update(desired_active(self.regions.values(), window))
        cut = {} if cut is None else cut
        effects: list[Effect] = []
        for name, want in sorted(desired.items()):
            region = self.regions[name]
            if region.active and not want:
                effects.extend(self._deactivate(region, op, cut))
        for name, want in sorted(desired.items(), key=lambda kv: self.regions[kv[0]].gpa or 0):
            region = self.regions[name]
            if want and not region.active:
                effects.extend(self._activate(region, op))
        return effects + self._refill(cut)

    def _deactivate(
        self, region: Region, op: Operation, cut: dict[int, list[MemoryRange]]
    ) -> list[Effect]:
        region.active = False
        effects: list[Effect] = []
        for sub in region.submappings:
            effects.extend(self._cut(region.absolute(sub), op, cut))
        return effects

    def start_op(self, what: str, reply_to: bytes | None) -> Operation:
        return Operation(what, self._monotonic(), reply_to)

    def tick(self) -> list[Effect]:
        """Evict mappers that left a request unanswered for longer than `unmap_timeout`."""
        now = self._monotonic()
        effects: list[Effect] = []
        for entry in list(self.mappers.values()):
            if entry.unacked and now - min(entry.unacked.values()) > self.unmap_timeout:
                log.error(
                    "mapper %d (%s, pid %d) did not answer within %.1fs: evicted",
                    entry.id,
                    entry.name,
                    entry.pid,
                    self.unmap_timeout,
                )
                self.counters["evictions"] += 1
                effects.append(Disconnect(entry.id))
                effects.extend(self.mapper_gone(entry.id, "unresponsive"))
        return effects

    # ---- eager mappers -------------------------------------------------------------------------

    def _upgrade(self, entry: MapperEntry) -> list[Effect]:
        """Replay every mapping the mapper lacks; it becomes eager once all of them are mapped."""
        if entry.eager or entry.upgrading:
            return [
                self._to_mapper(entry, m.EagerResult(entry.eager, "already eager or upgrading"))
            ]
        entry.upgrading = True
        op = self.start_op(f"upgrade mapper {entry.id}", None)
        effects = [
            self._map_eager(entry, mapping, op)
            for rng, mapping in self.table.items()
            if rng not in entry.held
        ]

        def done(op: Operation) -> list[Effect]:
            entry.upgrading = False
            if entry.id not in self.mappers:
                return []
            if op.failures:
                return [self._to_mapper(entry, m.EagerResult(False, "; ".join(op.failures)[:1000]))]
            entry.eager = True
            log.info("mapper %d (%s) is eager", entry.id, entry.name)
            return [self._to_mapper(entry, m.EagerResult(True, ""))]

        op.on_done = done
        return effects + self._maybe_finish(op)

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self, reason: str) -> list[Effect]:
        """Tell every mapper and every waiting control client that the manager is stopping."""
        effects: list[Effect] = []
        for entry in self.mappers.values():
            if entry.stream is not None:
                effects.append(self._to_mapper(entry, m.Shutdown(reason)))
        answered: set[int] = set()
        for op in self._pending.values():
            if op.reply_to is not None and id(op) not in answered:
                answered.add(id(op))
                effects.append(
                    Send(
                        Channel.CONTROL,
                        op.reply_to,
                        m.Error("shutting-down", f"the manager is stopping: {reason}"),
                    )
                )
        self._pending.clear()
        return effects

    # ---- regions (the region manager) ----------------------------------------------------------

    def _region(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None or region.removing:
            what = "does not exist" if region is None else "is being removed"
            raise Refused("not-found", f"region {name!r} {what}")
        return region

    def _check_placement(self, name: str, gpa: int, size: int, priority: int) -> MemoryRange:
        if gpa < 0 or gpa % PAGE_SIZE:
            raise Refused("bad-request", f"gpa {gpa:#x} must be a multiple of {PAGE_SIZE}")
        if gpa + size > self.address_space:
            raise Refused(
                "out-of-range",
                f"{gpa:#x} + {size:#x} ends beyond the {self.address_space:#x}-byte address space",
            )
        rng = MemoryRange(gpa, gpa + size)
        check_nesting(name, rng, priority, (r for r in self.regions.values() if not r.removing))
        return rng

    def _new_mappable(
        self, name: str, size: int, writable: bool, backing: str, path: str | None
    ) -> int:
        if backing == "private":
            return PRIVATE_MAPPABLE
        mappable_id = self._next_mappable_id
        self.store.create(mappable_id, name, size, writable, kind=backing, path=path)
        self._next_mappable_id += 1
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
        if name in self.regions:
            extra = " (it is being removed)" if self.regions[name].removing else ""
            raise Refused("exists", f"a region named {name!r} already exists{extra}")
        if size <= 0 or size % PAGE_SIZE:
            raise Refused(
                "bad-request",
                f"size {size:#x} must be a positive multiple of {PAGE_SIZE} (size > 0)",
            )
        if not 0 <= priority <= MAX_PRIORITY:
            raise Refused("bad-request", f"priority must be 0 to {MAX_PRIORITY}")
        if backing not in BACKINGS:
            raise Refused("bad-request", f"backing must be one of {', '.join(BACKINGS)}")
        if enabled and gpa is None:
            raise Refused("bad-request", "an enabled region needs a GPA")
        if gpa is not None:
            self._check_placement(name, gpa, size, priority)
        if len(self.regions) >= self.limits.max_regions:
            raise Refused(
                "limit", f"the manager holds its limit of {self.limits.max_regions} regions"
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
            submappings=[SubMapping(0, size, mappable_id, 0, writable)],
        )
        self._next_order += 1
        self._mappable_refs[mappable_id] += 1
        self.regions[name] = region
        self.region_bytes += size
        log.info(
            "region %s added (%s, %d bytes, priority %d%s)",
            name,
            region.range or "not placed",
            size,
            priority,
            "" if enabled else ", disabled",
        )
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
        log.error("%s: rolling back", text)
        self.counters["rollbacks"] += 1
        return self._remove(region, failed.reply_to, error=("map-failed", text[:1000]))

    def remove_region(self, name: str, reply_to: bytes | None = None) -> list[Effect]:
        """Remove a region; the reply waits until every holder acknowledged its Unmap."""
        return self._remove(self._region(name), reply_to)

    def _remove(
        self, region: Region, reply_to: bytes | None, error: tuple[str, str] | None = None
    ) -> list[Effect]:
        region.removing = True
        op = self.start_op(f"remove {region.name}", reply_to)
        op.timed = True
        for sub in region.submappings:
            self._mappable_refs[sub.mappable_id] -= 1
            op.destroy.add(sub.mappable_id)
        effects = self._reconcile([region.range], op) if region.range is not None else []
        effects += self._release_leftovers(op)

        def done(op: Operation) -> list[Effect]:
            self.regions.pop(region.name, None)
            self.region_bytes -= region.size
            self.counters["removals"] += 1
            log.info(
                "region %s removed (unmapped from %s)",
                region.name,
                sorted(op.unmapped_from) or "no mapper",
            )
            if error is not None:
                return self._reply_error(op, *error)
            return self._reply(op, {"name": region.name, "unmapped_from": sorted(op.unmapped_from)})

        op.on_done = done
        return effects + self._maybe_finish(op)

    def set_enabled(
        self, name: str, enabled: bool, gpa: int | None = None, reply_to: bytes | None = None
    ) -> list[Effect]:
        """Enable (optionally at a new GPA) or disable a region; the best region beneath a
        disabled one becomes visible again."""
        region = self._region(name)
        old = region.range
        windows = [old] if old is not None else []
        op = self.start_op(f"{'enable' if enabled else 'disable'} {name}", reply_to)
        effects: list[Effect] = []
        cut: dict[int, list[MemoryRange]] = {}
        if gpa is not None and gpa != region.gpa:
            new = self._check_placement(name, gpa, region.size, region.priority)
            if region.active:
                effects += self._deactivate(region, op, cut)
            region.gpa = gpa
            windows.append(new)
        elif enabled and region.gpa is None:
            raise Refused("bad-request", f"region {name!r} has no GPA yet: give one")
        region.enabled = enabled
        effects += self._reconcile(windows, op, cut)

        def done(op: Operation) -> list[Effect]:
            if op.failures and enabled:
                region.enabled = False
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
        from .regions import split_submappings

        region = self._region(name)
        if size <= 0 or (offset | size) % PAGE_SIZE or offset + size > region.size:
            raise Refused(
                "bad-request",
                f"offset {offset:#x} + size {size:#x} must be page-aligned and lie "
                f"inside region {name!r} ({region.size:#x} bytes)",
            )
        op = self.start_op(f"change {name}", reply_to)
        kept, removed = split_submappings(region.submappings, offset, size)
        new_sub = None
        if replace is not None:
            backing, path, file_offset, writable = replace
            mappable_id = self._new_mappable(
                f"{name}+{offset:#x}", size + file_offset, writable, backing, path
            )
            new_sub = SubMapping(offset, size, mappable_id, file_offset, writable)
            self._mappable_refs[mappable_id] += 1
            kept = sorted([*kept, new_sub], key=lambda s: s.offset)
        for sub in region.submappings:
            self._mappable_refs[sub.mappable_id] -= 1
        for sub in kept:
            self._mappable_refs[sub.mappable_id] += 1
        op.destroy.update(s.mappable_id for s in removed if self._mappable_refs[s.mappable_id] == 0)
        region.submappings = kept
        effects: list[Effect] = []
        if region.active:
            cut: dict[int, list[MemoryRange]] = {}
            assert region.gpa is not None
            effects += self._cut(
                MemoryRange(region.gpa + offset, region.gpa + offset + size), op, cut
            )
            if new_sub is not None:
                effects += self._insert(region, new_sub, op)
            effects += self._refill(cut)
        effects += self._release_leftovers(op)
        op.on_done = lambda op: self._reply(op, region_info(self, region))
        return effects + self._maybe_finish(op)

    def _reply(self, op: Operation, result: Any) -> list[Effect]:
        if op.reply_to is None:
            return []
        return [Send(Channel.CONTROL, op.reply_to, m.ControlReply(result))]

    def _reply_error(self, op: Operation, code: str, text: str) -> list[Effect]:
        if op.reply_to is None:
            return []
        return [Send(Channel.CONTROL, op.reply_to, m.Error(code, text))]

    # ---- control -------------------------------------------------------------------------------

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
            "rollbacks",
        )
        out: dict[str, Any] = {k: self.counters[k] for k in keys}
        out.update(
            regions=len(self.regions),
            region_bytes=self.region_bytes,
            mappers=len(self.mappers),
            address_space=self.address_space,
            rejected=dict(self.rejected),
            uptime=round(self._clock() - self.started_at, 3),
        )
        return out


def region_info(state: ManagerState, region: Region) -> dict[str, Any]:
    """A region as the control channel describes it."""
    holders: set[int] = set()
    if region.active:
        for sub in region.submappings:
            hit = state.table.lookup(region.absolute(sub).start)
            if hit is not None:
                holders |= hit[1].holders
    return {
        "name": region.name,
        "gpa": region.gpa,
        "size": region.size,
        "writable": region.writable,
        "priority": region.priority,
        "backing": region.backing,
        "path": region.path,
        "enabled": region.enabled,
        "active": region.active,
        "mappable_id": region.submappings[0].mappable_id if region.submappings else None,
        "mappings": [
            {
                "offset": s.offset,
                "size": s.size,
                "mappable_id": s.mappable_id,
                "file_offset": s.file_offset,
                "writable": s.writable,
            }
            for s in region.submappings
        ],
        "holders": sorted(holders),
        "state": "removing" if region.removing else ("active" if region.active else "inactive"),
    }
