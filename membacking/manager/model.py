"""The manager's data model: limits, effects, mapping-table entries, mappers, operations.

Plain data types shared by the layers of the state machine (`table`, `peers`, `state`).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..protocol.messages import Channel, Error, FdDenied, FdGrant, Message
from ..protocol.ranges import MemoryRange

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

    def add(self, mapper_id: int) -> None:
        if mapper_id not in self._ids:
            self._ids.add(mapper_id)
            self._tally[mapper_id] += 1

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


@dataclass
class Mapping:
    """An entry of the mapping table: an active piece of a region."""

    region: str
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool
    holders: Holders = field(default_factory=Holders)


class Held:
    """The mapping ranges a mapper holds (range -> mappable id): in address order (they never
    overlap), with the mappable id of each beside it, their byte total, and the ranges of each
    mappable counted. Whether it still maps a mappable is one count lookup; a listing
    pages through them without a sort; a cut takes every range in a span with one slice of
    each list (`take`), not one operation per range (an insertion costs a bisection and a
    memmove: about 1.6 us at 10,000 ranges)."""

    __slots__ = ("_bytes", "_count", "_ids", "_sorted")

    def __init__(self) -> None:
        self._sorted: list[MemoryRange] = []
        self._ids: list[int] = []  # the mappable id of each range
        self._count: Counter[int] = Counter()
        self._bytes = 0

    def _find(self, rng: MemoryRange) -> int:
        """The index of `rng`, or -1."""
        i = bisect.bisect_left(self._sorted, rng)
        return i if i < len(self._sorted) and self._sorted[i] == rng else -1

    def __setitem__(self, rng: MemoryRange, mappable_id: int) -> None:
        i = self._find(rng)
        if i < 0:
            i = bisect.bisect_left(self._sorted, rng)
            self._sorted.insert(i, rng)
            self._ids.insert(i, mappable_id)
            self._bytes += rng.end - rng.start
        else:
            self._uncount(self._ids[i])
            self._ids[i] = mappable_id
        self._count[mappable_id] += 1

    def extend(self, ranges: list[MemoryRange], ids: list[int]) -> None:
        """Add ranges (with their mappable ids) it does not hold yet, in address order: all at
        once if they lie past the last it holds, apart from each other (the usual case: what
        a mapper registering again still holds), else one by one."""
        if not ranges:
            return
        if (not self._sorted or self._sorted[-1].end <= ranges[0].start) and all(
            a.end <= b.start for a, b in itertools.pairwise(ranges)
        ):
            self._sorted += ranges
            self._ids += ids
            self._count.update(ids)
            self._bytes += sum(r.end - r.start for r in ranges)
            return
        for rng, mappable_id in zip(ranges, ids, strict=True):
            self[rng] = mappable_id

    def _uncount(self, mappable_id: int) -> None:
        left = self._count[mappable_id] - 1
        if left:
            self._count[mappable_id] = left
        else:
            del self._count[mappable_id]

    def pop(self, rng: MemoryRange, default: int | None = None) -> int | None:
        i = self._find(rng)
        if i < 0:
            return default
        mappable_id = self._ids.pop(i)
        del self._sorted[i]
        self._bytes -= rng.end - rng.start
        self._uncount(mappable_id)
        return mappable_id

    def take(self, rng: MemoryRange) -> list[MemoryRange]:
        """Remove every range overlapping `rng`; returns them, in address order. One
        bisection at each end and one slice of each list: the work per range is done by list
        operations in C, not by a Python loop. The caller knows their bytes (often without a
        walk of them): it must take them off with `forget_bytes`."""
        ranges = self._sorted
        i = bisect.bisect_left(ranges, (rng.start,))
        if i and ranges[i - 1].end > rng.start:
            i -= 1
        j = bisect.bisect_left(ranges, (rng.end,), lo=i)
        if i == j:
            return []
        taken = ranges[i:j]
        ids = self._ids[i:j]
        del ranges[i:j], self._ids[i:j]
        first = ids[0]
        # one mappable in the span (the usual case) is counted by a scan in C
        counts = {first: j - i} if ids.count(first) == j - i else Counter(ids)
        for mappable_id, n in counts.items():
            left = self._count[mappable_id] - n
            if left:
                self._count[mappable_id] = left
            else:
                del self._count[mappable_id]
        return taken

    def forget_bytes(self, nbytes: int) -> None:
        """Ranges of `nbytes` in all were taken (`take`)."""
        self._bytes -= nbytes

    def get(self, rng: MemoryRange) -> int | None:
        i = self._find(rng)
        return None if i < 0 else self._ids[i]

    def items(self) -> list[tuple[MemoryRange, int]]:
        return list(zip(self._sorted, self._ids, strict=True))

    def mappables(self) -> set[int]:
        """The mappables it holds ranges of (from the counts)."""
        return set(self._count)

    def maps(self, mappable_id: int) -> bool:
        """Whether any range it holds is backed by `mappable_id`."""
        return mappable_id in self._count

    @property
    def bytes(self) -> int:
        """The bytes of every range it holds."""
        return self._bytes

    def page(self, gpa: int, limit: int) -> list[MemoryRange]:
        """Up to `limit` of its ranges in address order, from the first ending after `gpa`."""
        i = bisect.bisect_left(self._sorted, (gpa,))
        if i and self._sorted[i - 1].end > gpa:
            i -= 1
        return self._sorted[i : i + limit]

    def __contains__(self, rng: object) -> bool:
        return isinstance(rng, MemoryRange) and self._find(rng) >= 0

    def __iter__(self) -> Iterator[MemoryRange]:
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._sorted)

    def __eq__(self, other: object) -> bool:
        # the counts and bytes follow from the ranges and their mappables
        return isinstance(other, Held) and (self._sorted, self._ids) == (other._sorted, other._ids)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Held({dict(self.items())!r})"


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
    why = result.get("evicted_why", {})
    parts += [
        f"mapper {i} evicted {why.get(str(i), '')}".rstrip() for i in result.get("evicted", [])
    ]
    return "; ".join(parts) or "no mapper held it"
