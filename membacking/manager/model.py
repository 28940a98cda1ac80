"""The manager's data model: limits, effects, mapping-table entries, mappers, operations.
Plain data types shared by the layers of the state machine (`table`, `peers`, `state`)."""

from __future__ import annotations

import operator
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from ..protocol.messages import Channel, Error, FdDenied, FdGrant, Message
from ..protocol.ranges import MemoryRange
from .held import Held

DEFAULT_ADDRESS_SPACE = 1 << 40  # 1 TiB of guest-physical address space
BACKINGS = ("memfd", "file", "hugetlb", "private")


#: the `manager run` option of each limit
LIMIT_FLAGS = {
    "max_mappers": "--max-mappers",
    "max_regions": "--max-regions",
    "max_fds_per_mapper": "--max-fds-per-mapper",
}
#: the longest origin a message shows (a refusal's text must fit MAX_REASON_LEN on the wire)
_ORIGIN_LEN = 240


@dataclass(frozen=True)
class Limits:
    """Resource limits; a request beyond one is refused with code "limit"."""

    max_mappers: int = 1024
    max_regions: int = 16384  # a mapper can hold ~32k separate mappings (vm.max_map_count)
    max_fds_per_mapper: int = 4096
    #: where `manager run` took each limit from: "--max-regions", or "limits.max_regions in
    #: FILE"; one not named here is its default (or was set through the Python API)
    origins: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def origin(self, key: str) -> str:
        """Where limit `key` came from, for the messages that name it."""
        given = self.origins.get(key)
        if given is not None:
            return given if len(given) <= _ORIGIN_LEN else "..." + given[3 - _ORIGIN_LEN :]
        flag = LIMIT_FLAGS[key]
        return f"the default of {flag}" if getattr(self, key) == getattr(Limits, key) else flag


@dataclass(frozen=True)
class Send:
    """Effect: send `msg` on `channel` to the peer with routing `identity`."""

    channel: Channel
    identity: bytes
    msg: Message


@dataclass(frozen=True)
class Disconnect:
    """Effect: close the fd-socket connection of a mapper that was evicted, telling it `reason`
    (a Shutdown on its fd socket right before the end); `unresponsive` if it left a request
    unanswered (then `manager run --evict-kill` also kills it)."""

    mapper_id: int
    reason: str = "evicted by the manager"
    unresponsive: bool = False


@dataclass(frozen=True)
class SendFd:
    """Effect: on the mapper's fd socket, right behind a Map, send `msg`: an FdGrant (with the
    mappable's fd attached) or an FdDenied saying why the mapper cannot have it; or an Error
    refusing a tagged request that has no stream to be answered on."""

    mapper_id: int
    msg: FdGrant | FdDenied | Error


Effect = Send | SendFd | Disconnect


class Holders:
    """The mappers holding one mapping, counted into its region's tally (mapper id -> mappings
    of the region it holds) as they come and go: a region's holders cost no walk of its pieces."""

    __slots__ = ("_ids", "_tally")

    def __init__(self, tally: Counter[int] | None = None, ids: Iterable[int] = ()) -> None:
        self._tally: Counter[int] = Counter() if tally is None else tally
        self._ids: set[int] = set()
        for mapper_id in ids:
            self.add(mapper_id)

    def add(self, mapper_id: int) -> bool:
        """False if it held this mapping already. (get: Counter's __missing__ costs a call)"""
        if mapper_id in self._ids:
            return False
        self._ids.add(mapper_id)
        self._tally[mapper_id] = self._tally.get(mapper_id, 0) + 1
        return True

    def discard(self, mapper_id: int) -> None:
        if mapper_id in self._ids:
            self._ids.remove(mapper_id)
            left = self._tally[mapper_id] - 1
            if left > 0:
                self._tally[mapper_id] = left
            else:
                del self._tally[mapper_id]

    def copy(self) -> Holders:
        """The same holders for a piece cut from the same mapping (counted in the same tally)."""
        return Holders(self._tally, self._ids)

    @property
    def tally(self) -> Counter[int]:
        """Its region's tally (mapper id -> mappings of the region it holds)."""
        return self._tally

    def forget(self) -> None:
        """The mapping left the table and the caller took its holders off the tally (a whole
        cut at once, per holder): only the ids go."""
        self._ids = set()

    def clear(self) -> None:
        """The mapping left the table: none of its holders counts for the region any more."""
        tally = self._tally
        for mapper_id in self._ids:
            left = tally[mapper_id] - 1
            if left > 0:
                tally[mapper_id] = left
            else:
                del tally[mapper_id]
        self._ids.clear()

    def __contains__(self, mapper_id: object) -> bool:
        return mapper_id in self._ids

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Holders):
            return self._ids == other._ids
        return isinstance(other, set | frozenset) and self._ids == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Holders({sorted(self._ids)!r})"


class HolderBatch:
    """The holders of many mappings (each `Holders` once), to record one mapper as a holder of
    all of them in a few passes in C instead of a call per mapping: what a mapper registering
    again still holds (1,000 mappings: about 0.5 ms one by one)."""

    __slots__ = ("_counts", "_sets", "_tallies")

    def __init__(self, holders: Iterable[Holders]) -> None:
        unique = list({id(h): h for h in holders}.values())
        self._sets = [h._ids for h in unique]
        per_tally: dict[int, tuple[Counter[int], list[int]]] = {}
        for h in unique:
            per_tally.setdefault(id(h._tally), (h._tally, [0]))[1][0] += 1
        #: each region's tally once, with how many of the mappings count into it
        self._tallies = [tally for tally, _ in per_tally.values()]
        self._counts = [n[0] for _, n in per_tally.values()]

    def add_new(self, mapper_id: int) -> bool:
        """Record `mapper_id` as a holder of every mapping of the batch, as `Holders.add` of
        each would; only for a mapper that holds none of them and is counted in none of their
        tallies (one registering again, whose id is new): False, and nothing recorded, if it
        is anywhere already (the caller then adds it mapping by mapping)."""
        sets, tallies = self._sets, self._tallies
        if any(map(operator.contains, sets, repeat(mapper_id))) or any(
            map(operator.contains, tallies, repeat(mapper_id))
        ):
            return False
        deque(map(set.add, sets, repeat(mapper_id)), maxlen=0)
        deque(map(dict.__setitem__, tallies, repeat(mapper_id), self._counts), maxlen=0)
        return True

    def __len__(self) -> int:
        return len(self._sets)


@dataclass
class Mapping:
    """An entry of the mapping table: an active piece of a region."""

    region: str
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool
    holders: Holders = field(default_factory=Holders)


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
    held: Held = field(default_factory=Held)
    fds_sent: set[int] = field(default_factory=set)
    unacked: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    #: seq -> (ranges, bytes) an Unmap sent and not yet acknowledged takes away: the table no
    #: longer counts them as held, but the mapper may still map them until it answers
    unmapping: dict[int, tuple[int, int]] = field(default_factory=dict)
    eager: bool = False
    upgrading: bool = False
    #: feature bits negotiated at Hello (None: a mapper of an earlier release offered none)
    features: int | None = None
    #: PackedHoldings that came before the stream's Attach: checked once it is bound
    early_holdings: list[Message] = field(default_factory=list)
    #: entries its Holdings listed so far (reattach.py bounds them), and whether they are over
    #: (its empty Holdings or its first request ended them: Holdings come once a registration)
    holdings_listed: int = 0
    holdings_over: bool = False

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
    #: mappers evicted while this change waited on them -> why (`after not answering for 5.0 s`)
    evicted: dict[int, str] = field(default_factory=dict)
    destroy: set[int] = field(default_factory=set)  # mappables to destroy once complete
    failures: list[str] = field(default_factory=list)
    eager: dict[tuple[int, int], MemoryRange] = field(default_factory=dict)  # MapEager sent
    failed_mappers: set[int] = field(default_factory=set)  # eager mappers whose MapEager failed
    #: an invalidation: its duration goes to `removal_observer`
    timed: bool = False
    #: builds the reply (and any follow-up effects) once nothing is pending
    on_done: Callable[[Operation], list[Effect]] | None = None
    #: held for the grace of evicted mappers already (dropping.py): not held again
    graced: bool = False


def removal_result(name: str, op: Operation) -> dict[str, Any]:
    """A removal's reply: the mappers that acknowledged their Unmap apart from those evicted
    while it waited on them (`evicted_why`: mapper id as text -> how it was evicted)."""
    result: dict[str, Any] = {"name": name, "unmapped_from": sorted(op.unmapped_from)}
    if op.evicted:
        result["evicted"] = sorted(op.evicted)
        result["evicted_why"] = {str(i): why for i, why in sorted(op.evicted.items())}
    return result


def removal_summary(result: dict[str, Any]) -> str:
    """What a removal did (from its reply), for the log and the command line: `unmapped from
    mapper 1; mapper 2 evicted after not answering for 5.0 s`."""
    ids = result["unmapped_from"]
    parts = []
    if ids:
        mappers = "mapper " if len(ids) == 1 else "mappers "
        parts.append("unmapped from " + mappers + ", ".join(map(str, ids)))
    parts += evictions(result)
    if result.get("not_back"):
        pids = ", ".join(map(str, result["not_back"]))
        parts.append(
            f"the mapper(s) of pid {pids} did not come back after the restart and may still map "
            "it (--evict-kill ends them)"
        )
    return "; ".join(parts) or "no mapper held it"


def evictions(result: dict[str, Any]) -> list[str]:
    """The mappers a change's reply says were evicted while it waited on them, each as
    `mapper 2 evicted after not answering for 5.0 s`."""
    why = result.get("evicted_why", {})
    return [f"mapper {i} evicted {why.get(str(i), '')}".rstrip() for i in result.get("evicted", [])]
