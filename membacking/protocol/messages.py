"""Every message of the membacking wire protocol, as small immutable classes.

Each class lists its fields in wire order with a field kind; `codec` encodes and strictly
validates them. docs/PROTOCOL.md describes the same messages for implementers in other languages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from .features import FEATURE_DETACH_ACK as FEATURE_DETACH_ACK
from .features import FEATURE_PACKED_HOLDINGS as FEATURE_PACKED_HOLDINGS
from .features import FEATURE_REATTACH as FEATURE_REATTACH
from .features import FEATURE_SHUTDOWN_CODE as FEATURE_SHUTDOWN_CODE
from .features import FEATURE_TAGS as FEATURE_TAGS
from .features import SUPPORTED_FEATURES as SUPPORTED_FEATURES
from .ranges import MemoryRange

PROTOCOL_VERSION = 1
TOKEN_BYTES = 16
MAX_NAME_LEN = 64
MAX_REASON_LEN = 1024
MAX_RELEASE_IDS = 1024

#: Shutdown codes: the mapper was cut off for not answering (it should drop its mappings)
SHUTDOWN_EVICTED = "evicted"
#: the manager is stopping for good: guest memory ends with it
SHUTDOWN_STOPPING = "stopping"
#: the manager is restarting on the same state: keep every mapping and wait for it
SHUTDOWN_RESTARTING = "restarting"
SHUTDOWN_CODES = frozenset({SHUTDOWN_EVICTED, SHUTDOWN_STOPPING, SHUTDOWN_RESTARTING})


class Kind(Enum):
    """How a field travels and is validated."""

    U64 = "u64"  # integer 0 <= x < 2**64
    BOOL = "bool"
    NAME = "name"  # str: units.check_name (1..64 of A-Za-z0-9_.:-, no leading "-")
    TEXT = "text"  # str, up to MAX_REASON_LEN chars
    TOKEN = "token"  # bin, exactly TOKEN_BYTES bytes
    RANGE = "range"  # two u64 on the wire: start, size (page-aligned, size > 0, no overflow)
    IDS = "ids"  # array of u64, at most MAX_RELEASE_IDS
    ARGS = "args"  # map str -> (nil | bool | int | str), at most 16 entries
    PACKED = "packed"  # bin of little-endian u64s (its length a multiple of 8)
    ANY = "any"  # any msgpack value (control replies only; produced by the trusted manager)


class Channel(Enum):
    FD = "fd"  # Unix SEQPACKET socket, may carry fds
    MAPPER = "mapper"  # ZeroMQ DEALER <-> ROUTER
    CONTROL = "control"  # ZeroMQ REQ <-> ROUTER

    # Members are singletons compared by identity, so identity hashing agrees with equality;
    # Enum's own __hash__ is a Python call, paid at every decode's channel check.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[tuple[str, Kind], ...]]
    CHANNELS: ClassVar[frozenset[Channel]]
    #: exact number of fds that must accompany this message on the fd channel
    FDS: ClassVar[int] = 0
    #: who may send it: "mapper", "manager", "client" (a control client)
    FROM: ClassVar[frozenset[str]]
    #: how many of FIELDS every sender sends; the rest are optional trailing fields (default
    #: None = absent, omitted on the wire), added by a later revision and sent only to a peer
    #: that negotiated the feature introducing them. None: every field is required.
    REQUIRED: ClassVar[int | None] = None


# ---- fd channel (Unix SEQPACKET) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """mapper -> manager: first message on a new fd-socket connection; `features` (optional)
    offers feature bits (a mapper of an earlier release sends none)."""

    TYPE = 1
    FROM = frozenset({"mapper"})
    FIELDS = (("name", Kind.NAME), ("features", Kind.U64))
    REQUIRED = 1
    CHANNELS = frozenset({Channel.FD})
    name: str
    features: int | None = None


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """manager -> mapper: registration accepted; identity to present on the ZeroMQ sockets.
    `features` (present only if Hello offered some): the offered bits the manager will use;
    `state_id` (with FEATURE_REATTACH): names the memory this manager serves, the same after a
    restart that adopted its state, another after a fresh start."""

    TYPE = 2
    FROM = frozenset({"manager"})
    FIELDS = (
        ("mapper_id", Kind.U64),
        ("token", Kind.TOKEN),
        ("address_space", Kind.U64),
        ("page_size", Kind.U64),
        ("features", Kind.U64),
        ("state_id", Kind.TOKEN),
    )
    REQUIRED = 4
    CHANNELS = frozenset({Channel.FD})
    mapper_id: int
    token: bytes
    address_space: int
    page_size: int
    features: int | None = None
    state_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class FdGrant(Message):
    """manager -> mapper, unasked, right behind the first Map of a mappable: its fd (exactly one
    fd attached)."""

    TYPE = 4
    FROM = frozenset({"manager"})
    FIELDS = (("mappable_id", Kind.U64), ("size", Kind.U64), ("writable", Kind.BOOL))
    CHANNELS = frozenset({Channel.FD})
    FDS = 1
    mappable_id: int
    size: int
    writable: bool


@dataclass(frozen=True, slots=True)
class FdDenied(Message):
    """manager -> mapper, in place of an FdGrant: this mapper may not have the fd (its fd limit)."""

    TYPE = 5
    FROM = frozenset({"manager"})
    FIELDS = (("mappable_id", Kind.U64), ("reason", Kind.TEXT))
    CHANNELS = frozenset({Channel.FD})
    mappable_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Either direction, any channel: a message was rejected. `tag` (FEATURE_TAGS): the tag of
    the request it refuses."""

    TYPE = 6
    FROM = frozenset({"mapper", "manager", "client"})
    FIELDS = (("code", Kind.NAME), ("message", Kind.TEXT), ("tag", Kind.U64))
    REQUIRED = 2
    CHANNELS = frozenset({Channel.FD, Channel.MAPPER, Channel.CONTROL})
    code: str
    message: str
    tag: int | None = None


# ---- mapper channel (ZeroMQ DEALER -> manager ROUTER) ------------------------------------------

ROLE_STREAM = 0  # receives Map / NoMapping / Unmap / Shutdown..., sends SetEager / Detach
ROLE_REQUESTS = 1  # mappers of earlier releases: SendMappings here (now on the fd socket)
#: the stream of a mapper that sends its requests and acks on the fd socket (this release): a
#: manager of an earlier release refuses the role (bad-role), so the mapper learns it at attach
ROLE_STREAM_FD = 2


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """mapper -> manager: bind this ZeroMQ socket to a registered mapper."""

    TYPE = 10
    FROM = frozenset({"mapper"})
    FIELDS = (("mapper_id", Kind.U64), ("token", Kind.TOKEN), ("role", Kind.U64))
    CHANNELS = frozenset({Channel.MAPPER})
    mapper_id: int
    token: bytes
    role: int


@dataclass(frozen=True, slots=True)
class Attached(Message):
    """manager -> mapper: the socket that sent Attach is bound."""

    TYPE = 11
    FROM = frozenset({"manager"})
    FIELDS = (("role", Kind.U64),)
    CHANNELS = frozenset({Channel.MAPPER})
    role: int


@dataclass(frozen=True, slots=True)
class SendMappings(Message):
    """mapper -> manager (fd socket; a requests socket is still accepted): send Map/NoMapping
    covering this range. `tag` (FEATURE_TAGS) names the request in an Error refusing it."""

    TYPE = 12
    FROM = frozenset({"mapper"})
    FIELDS = (("range", Kind.RANGE), ("tag", Kind.U64))
    REQUIRED = 1
    CHANNELS = frozenset({Channel.FD, Channel.MAPPER})
    range: MemoryRange
    tag: int | None = None


@dataclass(frozen=True, slots=True)
class ResendFd(Message):
    """mapper -> manager (fd socket, like SendMappings): the FdGrant of this mappable arrived
    without its fd (the kernel dropped it: this process was at its open-file limit); push it
    again. Answered on the fd socket with FdGrant, or FdDenied unless the manager sent this
    mapper that fd and has not released it since."""

    TYPE = 24
    FROM = frozenset({"mapper"})
    FIELDS = (("mappable_id", Kind.U64), ("tag", Kind.U64))
    REQUIRED = 1
    CHANNELS = frozenset({Channel.FD, Channel.MAPPER})
    mappable_id: int
    tag: int | None = None


#: entries of Holdings.fds (mappable_id, dev, ino) and Holdings.mappings (start, size,
#: mappable_id, file_offset, writable as 0/1), flattened into arrays of u64
HOLDING_FD_LEN = 3
HOLDING_MAPPING_LEN = 5


@dataclass(frozen=True, slots=True)
class Holdings(Message):
    """mapper -> manager (fd socket, FEATURE_REATTACH): after registering again with a manager
    whose Welcome has the state_id it had before, what it still holds: `fds` the fds it keeps
    (each identified by the st_dev and st_ino of its fstat), `mappings` what it has mapped.
    Several may be sent. The manager keeps what matches its table and unmaps the rest."""

    TYPE = 26
    FROM = frozenset({"mapper"})
    FIELDS = (("fds", Kind.IDS), ("mappings", Kind.IDS))
    CHANNELS = frozenset({Channel.FD})
    fds: tuple[int, ...]
    mappings: tuple[int, ...]


#: one entry of PackedHoldings.fds and of PackedHoldings.mappings: the u64s of a Holdings
#: entry, little-endian (struct formats)
PACKED_FD_FORMAT = "<3Q"
PACKED_MAPPING_FORMAT = "<5Q"


@dataclass(frozen=True, slots=True)
class PackedHoldings(Message):
    """mapper -> manager (fd socket, FEATURE_PACKED_HOLDINGS): Holdings packed: `fds` holds
    (mappable_id, st_dev, st_ino) and `mappings` (start, size, mappable_id, file_offset,
    writable 0/1) entries, each u64 little-endian, one after the other. Checked and answered
    as Holdings; several may be sent, each within the message size limit."""

    TYPE = 32
    FROM = frozenset({"mapper"})
    FIELDS = (("fds", Kind.PACKED), ("mappings", Kind.PACKED))
    CHANNELS = frozenset({Channel.FD})
    fds: bytes
    mappings: bytes


@dataclass(frozen=True, slots=True)
class Map(Message):
    """manager -> mapper (stream): `range` is backed by mappable at file_offset."""

    TYPE = 13
    FROM = frozenset({"manager"})
    FIELDS = (
        ("range", Kind.RANGE),
        ("mappable_id", Kind.U64),
        ("file_offset", Kind.U64),
        ("writable", Kind.BOOL),
    )
    CHANNELS = frozenset({Channel.MAPPER})
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool


@dataclass(frozen=True, slots=True)
class NoMapping(Message):
    """manager -> mapper (stream): nothing backs `range`."""

    TYPE = 14
    FROM = frozenset({"manager"})
    FIELDS = (("range", Kind.RANGE),)
    CHANNELS = frozenset({Channel.MAPPER})
    range: MemoryRange


@dataclass(frozen=True, slots=True)
class Unmap(Message):
    """manager -> mapper (stream): unmap `range`, close the fds of `release`, then UnmapAck."""

    TYPE = 15
    FROM = frozenset({"manager"})
    FIELDS = (("seq", Kind.U64), ("range", Kind.RANGE), ("release", Kind.IDS))
    CHANNELS = frozenset({Channel.MAPPER})
    seq: int
    range: MemoryRange
    release: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UnmapAck(Message):
    """mapper -> manager (fd socket; the stream socket is still accepted): Unmap or Release
    `seq` is applied; no access can touch the old memory."""

    TYPE = 16
    FROM = frozenset({"mapper"})
    FIELDS = (("seq", Kind.U64),)
    CHANNELS = frozenset({Channel.FD, Channel.MAPPER})
    seq: int


@dataclass(frozen=True, slots=True)
class Detach(Message):
    """mapper -> manager (stream): the mapper is going away cleanly."""

    TYPE = 17
    FROM = frozenset({"mapper"})
    FIELDS = ()
    CHANNELS = frozenset({Channel.MAPPER})


@dataclass(frozen=True, slots=True)
class DetachAck(Message):
    """manager -> mapper (stream; FEATURE_DETACH_ACK): the Detach is done; the mapper may now
    close its fd socket."""

    TYPE = 25
    FROM = frozenset({"manager"})
    FIELDS = ()
    CHANNELS = frozenset({Channel.MAPPER})


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """manager -> mapper (stream, and on the fd socket right before the manager closes it):
    the manager is stopping or cutting this mapper off; `reason`
    is for humans, `code` (one of SHUTDOWN_CODES; sent only with FEATURE_SHUTDOWN_CODE) for
    programs. A mapper reads an unknown code as SHUTDOWN_STOPPING."""

    TYPE = 18
    FROM = frozenset({"manager"})
    FIELDS = (("reason", Kind.TEXT), ("code", Kind.NAME))
    REQUIRED = 1
    CHANNELS = frozenset({Channel.MAPPER, Channel.FD})
    reason: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Release(Message):
    """manager -> mapper (stream): close the fds of these destroyed mappables, then UnmapAck."""

    TYPE = 19
    FROM = frozenset({"manager"})
    FIELDS = (("seq", Kind.U64), ("release", Kind.IDS))
    CHANNELS = frozenset({Channel.MAPPER})
    seq: int
    release: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetEager(Message):
    """mapper -> manager (stream): make me eager (replay every mapping, push new ones)."""

    TYPE = 20
    FROM = frozenset({"mapper"})
    FIELDS = ()
    CHANNELS = frozenset({Channel.MAPPER})


@dataclass(frozen=True, slots=True)
class EagerResult(Message):
    """manager -> mapper (stream): outcome of SetEager; on failure the mapper stays lazy."""

    TYPE = 21
    FROM = frozenset({"manager"})
    FIELDS = (("ok", Kind.BOOL), ("message", Kind.TEXT))
    CHANNELS = frozenset({Channel.MAPPER})
    ok: bool
    message: str


@dataclass(frozen=True, slots=True)
class MapEager(Message):
    """manager -> eager mapper (stream): map this now and answer MapAck(seq)."""

    TYPE = 22
    FROM = frozenset({"manager"})
    FIELDS = (
        ("seq", Kind.U64),
        ("range", Kind.RANGE),
        ("mappable_id", Kind.U64),
        ("file_offset", Kind.U64),
        ("writable", Kind.BOOL),
    )
    CHANNELS = frozenset({Channel.MAPPER})
    seq: int
    range: MemoryRange
    mappable_id: int
    file_offset: int
    writable: bool


@dataclass(frozen=True, slots=True)
class MapAck(Message):
    """mapper -> manager (fd socket; the stream socket is still accepted): MapEager `seq`
    applied (ok) or failed (message says why)."""

    TYPE = 23
    FROM = frozenset({"mapper"})
    FIELDS = (("seq", Kind.U64), ("ok", Kind.BOOL), ("message", Kind.TEXT))
    CHANNELS = frozenset({Channel.FD, Channel.MAPPER})
    seq: int
    ok: bool
    message: str


#: mappable id of private anonymous memory (a Map with it asks for zero-filled memory that
#: belongs to the mapper alone; no fd is involved)
PRIVATE_MAPPABLE = 0


# ---- control channel (ZeroMQ REQ -> manager ROUTER) --------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlRequest(Message):
    """client -> manager: run operation `op` with `args`."""

    TYPE = 30
    FROM = frozenset({"client"})
    FIELDS = (("op", Kind.NAME), ("args", Kind.ARGS))
    CHANNELS = frozenset({Channel.CONTROL})
    op: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ControlReply(Message):
    """manager -> client: result of a ControlRequest (errors travel as `Error`)."""

    TYPE = 31
    FROM = frozenset({"manager"})
    FIELDS = (("result", Kind.ANY),)
    CHANNELS = frozenset({Channel.CONTROL})
    result: Any


ALL_MESSAGES: tuple[type[Message], ...] = (
    Hello,
    Welcome,
    FdGrant,
    FdDenied,
    Error,
    Attach,
    Attached,
    SendMappings,
    ResendFd,
    Holdings,
    PackedHoldings,
    Map,
    NoMapping,
    Unmap,
    UnmapAck,
    Detach,
    DetachAck,
    Shutdown,
    Release,
    SetEager,
    EagerResult,
    MapEager,
    MapAck,
    ControlRequest,
    ControlReply,
)
BY_TYPE: dict[int, type[Message]] = {cls.TYPE: cls for cls in ALL_MESSAGES}
assert len(BY_TYPE) == len(ALL_MESSAGES), "duplicate message type code"
