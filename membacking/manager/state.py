"""The manager's decisions as a sans-I/O state machine: messages in, effects out.

It owns the region and mapping tables, the mapper registry (ids never reused), the holders of each
mapping and pending removals. The daemon feeds it decoded messages and carries out the `Send`
effects it returns; tests do the same without any socket.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import messages as m
from ..protocol.messages import Channel, Message
from ..protocol.rangemap import RangeMap
from ..protocol.ranges import PAGE_SIZE, MemoryRange
from .backing import BackingStore
from .errors import Refused

log = logging.getLogger("membacking.manager")

DEFAULT_ADDRESS_SPACE = 1 << 40  # 1 TiB of guest-physical address space


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
class Region:
    name: str
    range: MemoryRange
    writable: bool
    mappable_id: int
    state: str = "active"  # "active" | "removing"


@dataclass
class Mapping:
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
    unacked: dict[int, float] = field(default_factory=dict)  # Unmap seq -> monotonic send time


@dataclass
class Removal:
    region: Region
    waiting: set[int]
    unmapped_from: list[int]
    reply_to: bytes | None
    started: float = 0.0


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
        #: called with the seconds a removal took, from request to the last ack
        self.removal_observer: Callable[[float], None] | None = None
        self._by_mappable: dict[int, Region] = {}
        self.table: RangeMap[Mapping] = RangeMap()
        self.mappers: dict[int, MapperEntry] = {}
        self._by_identity: dict[bytes, tuple[int, int]] = {}  # identity -> (mapper id, role)
        self._removals: dict[tuple[int, int], Removal] = {}  # (mapper id, seq) -> removal
        self._next_mapper_id = 1
        self._next_mappable_id = 1
        self._next_seq = 1
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    # ---- peers ---------------------------------------------------------------------------------

    def reject(self, reason: str, detail: str, pid: int | None = None) -> None:
        """Count and log a rejected peer message."""
        self.rejected[reason] += 1
        log.warning("rejected message (%s) from pid %s: %s", reason, pid, detail)

    def register_mapper(self, name: str, pid: int) -> MapperEntry:
        """A mapper said Hello on the fd socket: give it an id (never reused) and a token."""
        if len(self.mappers) >= self.limits.max_mappers:
            self.reject("limit", f"mapper {name!r} refused: {len(self.mappers)} attached", pid)
            raise Refused(
                "limit",
                f"the manager already serves its limit of {self.limits.max_mappers} mappers",
            )
        now = self._clock()
        entry = MapperEntry(
            self._next_mapper_id, name, pid, secrets.token_bytes(m.TOKEN_BYTES), now, now
        )
        self._next_mapper_id += 1
        self.mappers[entry.id] = entry
        log.info("mapper %d (%s, pid %d) registered", entry.id, name, pid)
        return entry

    def welcome(self, entry: MapperEntry) -> m.Welcome:
        return m.Welcome(entry.id, entry.token, self.address_space, PAGE_SIZE)

    def mapper_gone(self, mapper_id: int, why: str = "disconnected") -> list[Effect]:
        """A mapper detached, died or was evicted: forget it and unblock removals waiting on it."""
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
            removal = self._removals.pop((mapper_id, seq), None)
            if removal is not None:
                removal.waiting.discard(mapper_id)
                effects.extend(self._maybe_finish(removal))
        return effects

    def mapper_of(self, identity: bytes) -> int | None:
        """The mapper a ZeroMQ socket identity is bound to, if any."""
        bound = self._by_identity.get(identity)
        return bound[0] if bound else None

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
        if isinstance(msg, m.SendMappings) and role == m.ROLE_REQUESTS:
            return self.send_mappings(mapper_id, msg.range)
        if isinstance(msg, m.UnmapAck) and role == m.ROLE_STREAM:
            return self.unmap_ack(mapper_id, msg.seq)
        if isinstance(msg, m.Detach) and role == m.ROLE_STREAM:
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
        if current is not None:
            self.reject("already-attached", f"second role-{msg.role} socket", entry.pid)
            return [self._error(identity, "already-attached", "that role is already bound")]
        if identity in self._by_identity:
            self.reject("already-attached", "socket already bound", entry.pid)
            return [self._error(identity, "already-attached", "this socket is already bound")]
        if msg.role == m.ROLE_STREAM:
            entry.stream = identity
        else:
            entry.requests = identity
        self._by_identity[identity] = (entry.id, msg.role)
        return [Send(Channel.MAPPER, identity, m.Attached(msg.role))]

    # ---- lazy mapping --------------------------------------------------------------------------

    def send_mappings(self, mapper_id: int, rng: MemoryRange) -> list[Effect]:
        """Answer a fault: Map for each mapping covering `rng`, NoMapping for each gap."""
        entry = self.mappers[mapper_id]
        if entry.stream is None:
            self.reject("not-attached", "SendMappings before the stream socket attached", entry.pid)
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
                mapping.holders.add(mapper_id)
                entry.held[mapping.range] = mapping.mappable_id
                out.append(
                    Send(
                        Channel.MAPPER,
                        entry.stream,
                        m.Map(
                            mapping.range,
                            mapping.mappable_id,
                            mapping.file_offset,
                            mapping.writable,
                        ),
                    )
                )
                self.counters["maps_sent"] += 1
        for outside in rng.subtract(MemoryRange(0, self.address_space)):
            out.append(Send(Channel.MAPPER, entry.stream, m.NoMapping(outside)))
            self.counters["nomappings_sent"] += 1
        return out

    def fd_request(self, mapper_id: int, mappable_id: int) -> m.FdGrant | m.FdDenied:
        """Decide whether a mapper may receive a mappable's fd (once, after a Map for it)."""
        entry = self.mappers.get(mapper_id)
        if entry is None:
            return m.FdDenied(mappable_id, "unknown mapper")
        entry.last_seen = self._clock()
        if mappable_id in entry.fds_sent:
            self.reject("fd-again", f"fd of mappable {mappable_id} requested twice", entry.pid)
            return m.FdDenied(mappable_id, "this mapper was already sent that fd")
        region = self._by_mappable.get(mappable_id)
        if region is None or entry.held.get(region.range) != mappable_id:
            return m.FdDenied(mappable_id, "no current mapping of that mappable was sent to you")
        if len(entry.fds_sent) >= self.limits.max_fds_per_mapper:
            self.reject("limit", f"fd limit of {self.limits.max_fds_per_mapper} reached", entry.pid)
            return m.FdDenied(
                mappable_id, f"this mapper holds its limit of {self.limits.max_fds_per_mapper} fds"
            )
        if region.state != "active":
            return m.FdDenied(mappable_id, "the region is being removed")
        entry.fds_sent.add(mappable_id)
        self.counters["fds_sent"] += 1
        return m.FdGrant(mappable_id, region.range.len, region.writable)

    # ---- removal -------------------------------------------------------------------------------

    def unmap_ack(self, mapper_id: int, seq: int) -> list[Effect]:
        entry = self.mappers[mapper_id]
        removal = self._removals.pop((mapper_id, seq), None)
        if removal is None:
            self.reject("unknown-seq", f"UnmapAck for unknown seq {seq}", entry.pid)
            return []
        entry.unacked.pop(seq, None)
        removal.waiting.discard(mapper_id)
        return self._maybe_finish(removal)

    def _maybe_finish(self, removal: Removal) -> list[Effect]:
        if removal.waiting:
            return []
        region = removal.region
        self.regions.pop(region.name, None)
        self.region_bytes -= region.range.len
        if self.removal_observer is not None:
            self.removal_observer(self._monotonic() - removal.started)
        self._by_mappable.pop(region.mappable_id, None)
        self.store.destroy(region.mappable_id)
        self.counters["removals"] += 1
        log.info(
            "region %s removed (unmapped from %s)", region.name, removal.unmapped_from or "none"
        )
        if removal.reply_to is None:
            return []
        result = {"name": region.name, "unmapped_from": sorted(removal.unmapped_from)}
        return [Send(Channel.CONTROL, removal.reply_to, m.ControlReply(result))]

    def remove_region(self, name: str, reply_to: bytes | None) -> list[Effect]:
        region = self.regions.get(name)
        if region is None or region.state != "active":
            what = "does not exist" if region is None else "is already being removed"
            return self._control_error(reply_to, "not-found", f"region {name!r} {what}")
        region.state = "removing"
        mapping = self.table.remove(region.range)
        removal = Removal(region, set(), [], reply_to, self._monotonic())
        effects: list[Effect] = []
        for mapper_id in sorted(mapping.holders):
            entry = self.mappers[mapper_id]
            entry.held.pop(mapping.range, None)
            release: tuple[int, ...] = ()
            if (
                mapping.mappable_id in entry.fds_sent
                and mapping.mappable_id not in entry.held.values()
            ):
                entry.fds_sent.discard(mapping.mappable_id)
                release = (mapping.mappable_id,)
            seq = self._next_seq
            self._next_seq += 1
            entry.unacked[seq] = self._monotonic()
            self._removals[(mapper_id, seq)] = removal
            removal.waiting.add(mapper_id)
            removal.unmapped_from.append(mapper_id)
            assert entry.stream is not None  # holders were sent a Map on their stream
            effects.append(Send(Channel.MAPPER, entry.stream, m.Unmap(seq, mapping.range, release)))
            self.counters["unmaps_sent"] += 1
        effects.extend(self._maybe_finish(removal))
        return effects

    def tick(self) -> list[Effect]:
        """Evict mappers that left an Unmap unacknowledged for longer than `unmap_timeout`."""
        now = self._monotonic()
        effects: list[Effect] = []
        for entry in list(self.mappers.values()):
            if entry.unacked and now - min(entry.unacked.values()) > self.unmap_timeout:
                log.error(
                    "mapper %d (%s, pid %d) did not acknowledge an Unmap within %.1fs: evicted",
                    entry.id,
                    entry.name,
                    entry.pid,
                    self.unmap_timeout,
                )
                self.counters["evictions"] += 1
                effects.append(Disconnect(entry.id))
                effects.extend(self.mapper_gone(entry.id, "unresponsive"))
        return effects

    # ---- control -------------------------------------------------------------------------------

    def _control_error(self, reply_to: bytes | None, code: str, text: str) -> list[Effect]:
        if reply_to is None:
            raise Refused(code, text)
        return [Send(Channel.CONTROL, reply_to, m.Error(code, text))]

    def add_region(self, name: str, gpa: int, size: int, writable: bool) -> Region:
        """Create a region and its backing; raises BackingError with a control error code."""
        if name in self.regions:
            state = self.regions[name].state
            extra = " (it is being removed)" if state != "active" else ""
            raise Refused("exists", f"a region named {name!r} already exists{extra}")
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE or gpa < 0:
            raise Refused(
                "bad-request",
                f"gpa {gpa:#x} and size {size:#x} must be multiples of {PAGE_SIZE} (size > 0)",
            )
        if gpa + size > self.address_space:
            raise Refused(
                "out-of-range",
                f"{gpa:#x} + {size:#x} ends beyond the {self.address_space:#x}-byte address space",
            )
        if len(self.regions) >= self.limits.max_regions:
            raise Refused(
                "limit", f"the manager holds its limit of {self.limits.max_regions} regions"
            )
        rng = MemoryRange(gpa, gpa + size)
        clash = self.table.first_overlap(rng)
        if clash is not None:
            raise Refused("overlap", f"{rng} overlaps region {clash[1].region!r} ({clash[0]})")
        mappable_id = self._next_mappable_id
        self.store.create(mappable_id, name, size, writable)
        self._next_mappable_id += 1
        region = Region(name, rng, writable, mappable_id)
        self.regions[name] = region
        self.region_bytes += size
        self._by_mappable[mappable_id] = region
        self.table.insert(rng, Mapping(name, rng, mappable_id, 0, writable))
        log.info("region %s added at %s (%s)", name, rng, "rw" if writable else "ro")
        return region

    def handle_control(self, identity: bytes, msg: Message) -> list[Effect]:
        """A ControlRequest arrived from client `identity`."""
        if not isinstance(msg, m.ControlRequest):
            self.reject("unexpected", f"{type(msg).__name__} on the control socket")
            return [
                Send(Channel.CONTROL, identity, m.Error("bad-request", "expected ControlRequest"))
            ]
        try:
            handler = _CONTROL_OPS.get(msg.op)
            if handler is None:
                raise Refused("bad-request", f"unknown operation {msg.op!r}")
            return handler(self, identity, msg.args)
        except Refused as exc:
            return [Send(Channel.CONTROL, identity, m.Error(exc.code, str(exc)))]

    def _op_regions(self, identity: bytes, args: dict[str, Any]) -> list[Effect]:
        _expect_args(args, {})
        return [Send(Channel.CONTROL, identity, m.ControlReply(self.describe_regions()))]

    def _op_mappers(self, identity: bytes, args: dict[str, Any]) -> list[Effect]:
        _expect_args(args, {})
        return [Send(Channel.CONTROL, identity, m.ControlReply(self.describe_mappers()))]

    def _op_stats(self, identity: bytes, args: dict[str, Any]) -> list[Effect]:
        _expect_args(args, {})
        return [Send(Channel.CONTROL, identity, m.ControlReply(self.stats()))]

    def _op_add_region(self, identity: bytes, args: dict[str, Any]) -> list[Effect]:
        _expect_args(args, {"name": str, "gpa": int, "size": int}, {"readonly": bool})
        region = self.add_region(
            args["name"], args["gpa"], args["size"], not args.get("readonly", False)
        )
        return [Send(Channel.CONTROL, identity, m.ControlReply(self._describe_region(region)))]

    def _op_remove_region(self, identity: bytes, args: dict[str, Any]) -> list[Effect]:
        _expect_args(args, {"name": str})
        return self.remove_region(args["name"], identity)

    # ---- inspection ----------------------------------------------------------------------------

    def _describe_region(self, region: Region) -> dict[str, Any]:
        mapping = self._mapping_at(region.range) if region.state == "active" else None
        return {
            "name": region.name,
            "gpa": region.range.start,
            "size": region.range.len,
            "writable": region.writable,
            "mappable_id": region.mappable_id,
            "holders": sorted(mapping.holders) if mapping else [],
            "state": region.state,
        }

    def describe_regions(self) -> list[dict[str, Any]]:
        regions = sorted(self.regions.values(), key=lambda r: r.range.start)
        return [self._describe_region(r) for r in regions]

    def describe_mappers(self) -> list[dict[str, Any]]:
        return [
            {
                "id": e.id,
                "name": e.name,
                "pid": e.pid,
                "ranges": len(e.held),
                "bytes": sum(r.len for r in e.held),
                "fds": len(e.fds_sent),
                "connected_at": e.connected_at,
                "last_seen": e.last_seen,
            }
            for e in sorted(self.mappers.values(), key=lambda e: e.id)
        ]

    def stats(self) -> dict[str, Any]:
        keys = (
            "faults",
            "maps_sent",
            "nomappings_sent",
            "unmaps_sent",
            "fds_sent",
            "removals",
            "evictions",
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

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self, reason: str) -> list[Effect]:
        """Tell every mapper and every waiting control client that the manager is stopping."""
        effects: list[Effect] = []
        for entry in self.mappers.values():
            if entry.stream is not None:
                effects.append(Send(Channel.MAPPER, entry.stream, m.Shutdown(reason)))
        answered: set[int] = set()
        for removal in self._removals.values():
            if removal.reply_to is not None and id(removal) not in answered:
                answered.add(id(removal))
                effects.append(
                    Send(
                        Channel.CONTROL,
                        removal.reply_to,
                        m.Error("shutting-down", f"the manager is stopping: {reason}"),
                    )
                )
        self._removals.clear()
        return effects


def _expect_args(
    args: dict[str, Any], required: dict[str, type], optional: dict[str, type] | None = None
) -> None:
    optional = optional or {}
    for key, kind in {**required, **optional}.items():
        if key in args and type(args[key]) is not kind:
            raise Refused("bad-request", f"argument {key!r} must be of type {kind.__name__}")
    missing = [k for k in required if k not in args]
    if missing:
        raise Refused("bad-request", f"missing argument(s): {', '.join(missing)}")
    extra = [k for k in args if k not in required and k not in optional]
    if extra:
        raise Refused("bad-request", f"unknown argument(s): {', '.join(extra)}")


_CONTROL_OPS: dict[str, Callable[[ManagerState, bytes, dict[str, Any]], list[Effect]]] = {
    "regions": ManagerState._op_regions,
    "mappers": ManagerState._op_mappers,
    "stats": ManagerState._op_stats,
    "add_region": ManagerState._op_add_region,
    "remove_region": ManagerState._op_remove_region,
}
