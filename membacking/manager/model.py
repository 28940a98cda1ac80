"""The manager's data model: limits, effects, mapping-table entries, mappers, operations.
Plain data types shared by the layers of the state machine (`table`, `peers`, `state`)."""

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


@dataclass
class Mapping:
    """An entry of the mapping table: an active piece of a region."""

    region: str
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool
    holders: Holders = field(default_factory=Holders)


class Taken:
    """The ranges of a `Held` that `take_later` took: how many, the first and the last (cut to
    the cut's range by `clip`), their span; the list itself only while they are not deleted."""

    __slots__ = ("_epoch", "_held", "_i", "_j", "count", "first", "last")

    def __init__(self, held: Held, i: int, j: int) -> None:
        self._held, self._i, self._j, self._epoch = held, i, j, held._epoch
        self.count = j - i
        self.first, self.last = held._sorted[i], held._sorted[j - 1]

    @property
    def span(self) -> MemoryRange:
        return MemoryRange.checked_already(self.first.start, self.last.end)

    def nbytes(self) -> int:
        """The bytes of the ranges as they were held (before `clip`)."""
        return sum(r.end - r.start for r in self._window())

    def clip(self, rng: MemoryRange) -> int:
        """Cut the first and the last range to `rng`; returns the bytes that cut off."""
        first, last = self.first.intersection(rng), self.last.intersection(rng)
        cut = (self.first.end - self.first.start) - (first.end - first.start)
        if self.count > 1:
            cut += (self.last.end - self.last.start) - (last.end - last.start)
        self.first, self.last = first, last
        return cut

    def ranges(self) -> list[MemoryRange]:
        """The ranges, in address order, the first and the last clipped. Once the `Held` has
        settled (any other use of it settles it) they are gone: then their whole span stands
        for them (a refill then also maps what lay between them, which is harmless)."""
        if self._held._epoch != self._epoch:
            return [self.span]
        out = self._window()
        out[0], out[-1] = self.first, self.last
        return out

    def _window(self) -> list[MemoryRange]:
        assert self._held._epoch == self._epoch, "the ranges taken were deleted already"
        return self._held._sorted[self._i : self._j]


class Held:
    """The mapping ranges a mapper holds (range -> mappable id): in address order (they never
    overlap), with the mappable id of each beside it, their byte total, and the ranges of each
    mappable counted. Whether it still maps a mappable is one count lookup; a listing
    pages through them without a sort; a cut takes every range in a span with one slice of
    each list (`take`), not one operation per range (an insertion costs a bisection and a
    memmove: about 1.6 us at 10,000 ranges).

    `take_later` takes the ranges in a span at once but deletes them (a slice of each list,
    and their counts) only when the holder settles: on a later turn of the daemon's loop
    (`TableState.work`), or as soon as anything else reads or changes it. Until then the lists
    still hold them, in windows that every method settles first (but `len` and `bytes`)."""

    __slots__ = ("_bytes", "_count", "_epoch", "_ids", "_later", "_later_n", "_sorted")

    def __init__(self) -> None:
        self._sorted: list[MemoryRange] = []
        self._ids: list[int] = []  # the mappable id of each range
        self._count: Counter[int] = Counter()
        self._bytes = 0
        #: windows [i, j) of the lists taken by `take_later` and not deleted yet (disjoint,
        #: sorted)
        self._later: list[tuple[int, int]] = []
        self._later_n = 0
        self._epoch = 0  # counts the settles that deleted something

    def settle(self, windows: int | None = None) -> int:
        """Delete what `take_later` took (at most `windows` of the windows it took, the last
        first: the indexes of those before them do not move); returns how many ranges."""
        later = self._later  # the last first: the indexes before them do not move
        k = len(later) if windows is None else min(windows, len(later))
        now, self._later = later[len(later) - k :], later[: len(later) - k]
        n = sum(j - i for i, j in now)
        if len(now) > 2:
            self._drop_many(now)
        else:
            for i, j in reversed(now):
                self._drop(i, j)
        self._later_n -= n
        self._epoch += bool(n)
        return n

    @property
    def windows(self) -> int:
        """How many windows of ranges wait for `settle` (a cut each)."""
        return len(self._later)

    def take_later(self, rng: MemoryRange) -> Taken | None:
        """Take every range overlapping `rng` (None if there is none): from now on they are no
        longer held, but their deletion waits for `settle`. The caller takes their bytes off
        with `forget_bytes`."""
        i, j = self._window(rng)
        later = self._later
        p = bisect.bisect_left(later, (i, j))  # disjoint windows: only the neighbours can overlap
        if i < j and ((p and later[p - 1][1] > i) or (p < len(later) and later[p][0] < j)):
            # ranges an earlier cut took lie inside `rng` (a cut across a hole cut before)
            self.settle()
            i, j = self._window(rng)
            later, p = self._later, 0
        if i == j:
            return None
        later.insert(p, (i, j))
        self._later_n += j - i
        return Taken(self, i, j)

    @property
    def later(self) -> int:
        """How many ranges wait for `settle`."""
        return self._later_n

    def _window(self, rng: MemoryRange) -> tuple[int, int]:
        ranges = self._sorted
        i = bisect.bisect_left(ranges, (rng.start,))
        if i and ranges[i - 1].end > rng.start:
            i -= 1
        return i, bisect.bisect_left(ranges, (rng.end,), lo=i)

    def _drop_many(self, windows: list[tuple[int, int]]) -> None:
        """Delete the windows (sorted, disjoint) in one copy of the lists: deleting them one
        by one moved the rest of the lists once per window (about 30 us each at 20,000)."""
        kept_sorted, kept_ids = self._sorted[: windows[0][0]], self._ids[: windows[0][0]]
        for k, (i, j) in enumerate(windows):
            self._uncount_ids(self._ids[i:j])
            nxt = windows[k + 1][0] if k + 1 < len(windows) else len(self._sorted)
            kept_sorted += self._sorted[j:nxt]
            kept_ids += self._ids[j:nxt]
        self._sorted, self._ids = kept_sorted, kept_ids

    def _drop(self, i: int, j: int) -> None:
        ids = self._ids[i:j]
        del self._sorted[i:j], self._ids[i:j]
        self._uncount_ids(ids)

    def _uncount_ids(self, ids: list[int]) -> None:
        first, n = ids[0], len(ids)
        # one mappable in the span (the usual case) is counted by a scan in C
        counts = {first: n} if ids.count(first) == n else Counter(ids)
        for mappable_id, n in counts.items():
            left = self._count[mappable_id] - n
            if left:
                self._count[mappable_id] = left
            else:
                del self._count[mappable_id]

    def _find(self, rng: MemoryRange) -> int:
        """The index of `rng`, or -1."""
        if self._later:
            self.settle()
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
        if self._later:
            self.settle()
        i, j = self._window(rng)
        if i == j:
            return []
        taken = self._sorted[i:j]
        self._drop(i, j)
        return taken

    def forget_bytes(self, nbytes: int) -> None:
        """Ranges of `nbytes` in all were taken (`take`)."""
        self._bytes -= nbytes

    def get(self, rng: MemoryRange) -> int | None:
        i = self._find(rng)
        return None if i < 0 else self._ids[i]

    def items(self) -> list[tuple[MemoryRange, int]]:
        if self._later:
            self.settle()
        return list(zip(self._sorted, self._ids, strict=True))

    def mappables(self) -> set[int]:
        """The mappables it holds ranges of (from the counts)."""
        if self._later:
            self.settle()
        return set(self._count)

    def maps(self, mappable_id: int) -> bool:
        """Whether any range it holds is backed by `mappable_id`."""
        if self._later:
            self.settle()
        return mappable_id in self._count

    @property
    def bytes(self) -> int:
        """The bytes of every range it holds."""
        return self._bytes

    def page(self, gpa: int, limit: int) -> list[MemoryRange]:
        """Up to `limit` of its ranges in address order, from the first ending after `gpa`."""
        if self._later:
            self.settle()
        i = bisect.bisect_left(self._sorted, (gpa,))
        if i and self._sorted[i - 1].end > gpa:
            i -= 1
        return self._sorted[i : i + limit]

    def __contains__(self, rng: object) -> bool:
        return isinstance(rng, MemoryRange) and self._find(rng) >= 0

    def __iter__(self) -> Iterator[MemoryRange]:
        if self._later:
            self.settle()
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._sorted) - self._later_n

    def __eq__(self, other: object) -> bool:
        # the counts and bytes follow from the ranges and their mappables
        if not isinstance(other, Held):
            return False
        self.settle()
        other.settle()
        return (self._sorted, self._ids) == (other._sorted, other._ids)

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
    parts += evictions(result)
    return "; ".join(parts) or "no mapper held it"


def evictions(result: dict[str, Any]) -> list[str]:
    """The mappers a change's reply says were evicted while it waited on them, each as
    `mapper 2 evicted after not answering for 5.0 s`."""
    why = result.get("evicted_why", {})
    return [f"mapper {i} evicted {why.get(str(i), '')}".rstrip() for i in result.get("evicted", [])]
