"""The manager's data model: limits, effects, mapping-table entries, mappers, operations.

Plain data types shared by the layers of the state machine (`table`, `peers`, `state`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, ItemsView, Iterator
from dataclasses import dataclass, field

from ..protocol.messages import Channel, FdDenied, FdGrant, Message
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
    mappable's fd attached) or an FdDenied saying why the mapper cannot have it."""

    mapper_id: int
    msg: FdGrant | FdDenied


Effect = Send | SendFd | Disconnect


@dataclass
class Mapping:
    """An entry of the mapping table: an active piece of a region."""

    region: str
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool
    holders: set[int] = field(default_factory=set)


class Held:
    """The mapping ranges a mapper holds (range -> mappable id), counting the ranges of each
    mappable, so whether it still maps a mappable costs one lookup, not a walk of them all."""

    __slots__ = ("_count", "_ranges")

    def __init__(self) -> None:
        self._ranges: dict[MemoryRange, int] = {}
        self._count: Counter[int] = Counter()

    def __setitem__(self, rng: MemoryRange, mappable_id: int) -> None:
        self.pop(rng)
        self._ranges[rng] = mappable_id
        self._count[mappable_id] += 1

    def pop(self, rng: MemoryRange, default: int | None = None) -> int | None:
        mappable_id = self._ranges.pop(rng, None)
        if mappable_id is None:
            return default
        left = self._count[mappable_id] - 1
        if left:
            self._count[mappable_id] = left
        else:
            del self._count[mappable_id]
        return mappable_id

    def get(self, rng: MemoryRange) -> int | None:
        return self._ranges.get(rng)

    def items(self) -> ItemsView[MemoryRange, int]:
        return self._ranges.items()

    def mappables(self) -> set[int]:
        """The mappables it holds ranges of (from the counts)."""
        return set(self._count)

    def maps(self, mappable_id: int) -> bool:
        """Whether any range it holds is backed by `mappable_id`."""
        return mappable_id in self._count

    def __contains__(self, rng: object) -> bool:
        return rng in self._ranges

    def __iter__(self) -> Iterator[MemoryRange]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def __eq__(self, other: object) -> bool:
        # the counts follow from the ranges
        return isinstance(other, Held) and self._ranges == other._ranges

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Held({self._ranges!r})"


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
    failed_mappers: set[int] = field(default_factory=set)  # eager mappers whose MapEager failed
    #: an invalidation: its duration goes to `removal_observer`
    timed: bool = False
    #: builds the reply (and any follow-up effects) once nothing is pending
    on_done: Callable[[Operation], list[Effect]] | None = None
