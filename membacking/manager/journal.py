"""The manager's persistent state as one versioned structure, and its file: a header (magic,
format version, length, CRC-32) then a msgpack body. Written atomically (temp file, fsync,
rename, fsync of the directory); read back strictly: a corrupt or foreign file is refused.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from ..errors import MembackingError

MAGIC = b"MBSTATE\n"
#: the format this release writes; it reads every version from 1 up to this one
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIII")  # magic, version, body length, crc32 of the body
MAX_JOURNAL_BYTES = 256 << 20
BACKING_KINDS = ("shm", "memfd", "file", "hugetlb")


class JournalError(MembackingError):
    """The state journal cannot be read (corrupt, truncated, foreign, or from a newer release)."""


# The records are named tuples: cheap to make (a snapshot of 16,000 regions is taken after each
# change) and packed by msgpack as they are, as arrays in field order.


class SubMappingRecord(NamedTuple):
    offset: int
    size: int
    mappable_id: int
    file_offset: int
    writable: bool


class RegionRecord(NamedTuple):
    name: str
    size: int
    priority: int
    order: int
    writable: bool
    backing: str  # as in Region.backing: memfd | file | hugetlb | private
    gpa: int | None
    enabled: bool
    path: str | None
    submappings: tuple[SubMappingRecord, ...]


class BackingRecord(NamedTuple):
    """Where a mappable's memory lives: `shm` a file named `name` in the state directory (it
    survives the manager), `file` the operator's file at `name`, `memfd`/`hugetlb` memory that
    died with the manager that wrote the journal (`name` empty). `dev`/`ino` identify the file
    the manager had open (0 for memfd/hugetlb)."""

    mappable_id: int
    kind: str
    name: str
    size: int
    writable: bool
    dev: int
    ino: int


class PinRecord(NamedTuple):
    """Regions lent to process `pid` (started at `started`, clock ticks after boot), `label`
    for error messages; `mapper_id` of the manager that wrote the journal."""

    mapper_id: int
    label: str
    pid: int
    started: int
    regions: tuple[str, ...]


class MapperRecord(NamedTuple):
    """A mapper that may come back holding memory after a restart: its id under the manager
    that wrote the journal, its process `pid` and when that process started (clock ticks after
    boot, as for pins), so a pid reused since is not taken for it."""

    mapper_id: int
    pid: int
    started: int


@dataclass(frozen=True)
class Snapshot:
    """Everything a restarted manager needs to serve the same memory again."""

    #: random id of this state, chosen when it was created fresh; kept across restarts
    state_id: bytes
    uid: int
    runtime_dir: str
    address_space: int
    next_mappable_id: int
    next_order: int
    next_mapper_id: int
    regions: tuple[RegionRecord, ...]
    backings: tuple[BackingRecord, ...]
    counters: dict[str, int] = field(default_factory=dict)
    #: pins of running VMs (an optional key: a journal without it has none)
    pins: tuple[PinRecord, ...] = ()
    #: mappers that may come back holding memory (an optional key: a journal without it has
    #: none)
    mappers: tuple[MapperRecord, ...] = ()


def encode(snapshot: Snapshot) -> bytes:
    """The journal file's bytes for `snapshot` (format FORMAT_VERSION)."""
    return encode_packed(
        head(snapshot),
        [pack(r) for r in snapshot.regions],
        [pack(b) for b in snapshot.backings],
    )


def head(snapshot: Snapshot) -> dict[str, Any]:
    """The body's fields before its regions and backings, in the order they are written."""
    return {
        "state_id": snapshot.state_id,
        "uid": snapshot.uid,
        "runtime_dir": snapshot.runtime_dir,
        "address_space": snapshot.address_space,
        "next_mappable_id": snapshot.next_mappable_id,
        "next_order": snapshot.next_order,
        "next_mapper_id": snapshot.next_mapper_id,
        "counters": dict(snapshot.counters),
        # VM pins: named tuples pack as arrays in field order
        "pins": [tuple(p) for p in snapshot.pins],
        "mappers": [tuple(r) for r in snapshot.mappers],
    }


def pack(record: RegionRecord | SubMappingRecord | BackingRecord) -> bytes:
    """One record's bytes as they stand in the body (named tuples pack as arrays in field
    order): a journal's regions and backings are these bytes one after the other."""
    data: bytes = msgpack.packb(record, use_bin_type=True)
    return data


def pack_region(fields: tuple[Any, ...], submappings: list[bytes]) -> bytes:
    """`pack` of a RegionRecord from its fields before `submappings` and its sub-mappings
    already packed (`pack`): a change to a few pieces packs only those again."""
    assert len(fields) == len(RegionRecord._fields) - 1
    packed: bytes = msgpack.packb(fields, use_bin_type=True)  # a fixarray: one byte of header
    header = bytes((0x90 | len(RegionRecord._fields),))
    return b"".join((header, packed[1:], _array_header(len(submappings)), *submappings))


def pack_region_joined(fields: tuple[Any, ...], count: int, joined: bytes) -> bytes:
    """`pack_region` from the `count` sub-mappings' packed bytes already joined."""
    assert len(fields) == len(RegionRecord._fields) - 1
    packed: bytes = msgpack.packb(fields, use_bin_type=True)  # a fixarray: one byte of header
    header = bytes((0x90 | len(RegionRecord._fields),))
    return b"".join((header, packed[1:], _array_header(count), joined))


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


_REGIONS_KEY = msgpack.packb("regions")
_BACKINGS_KEY = msgpack.packb("backings")


def encode_packed(fields: dict[str, Any], regions: list[bytes], backings: list[bytes]) -> bytes:
    """The journal file's bytes from `head` fields and records already packed (`pack`): the
    same bytes msgpack makes of the whole body, so a save can reuse the records that did not
    change. The body is a map of the fields, then `regions` and `backings` (arrays)."""
    assert len(fields) < 14  # a fixmap with the two arrays
    parts = [bytes((0x80 | (len(fields) + 2),))]
    for key, value in fields.items():
        parts.append(msgpack.packb(key, use_bin_type=True))
        parts.append(msgpack.packb(value, use_bin_type=True))
    parts += (_REGIONS_KEY, _array_header(len(regions)), *regions)
    parts += (_BACKINGS_KEY, _array_header(len(backings)), *backings)
    data = b"".join(parts)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(data), zlib.crc32(data)) + data


def decode(data: bytes) -> Snapshot:
    """Read journal bytes of any supported version; JournalError says what is wrong."""
    body = _checked_body(data)
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
        return _from_v1(doc)
    except JournalError:
        raise
    except Exception as exc:  # a well-checksummed body of the wrong shape: refuse it all
        raise JournalError(f"the journal is malformed: {exc}") from None


def decode_head(data: bytes) -> tuple[Snapshot, bytes]:
    """Read only the fields before the regions (counters, ids, pins) of journal bytes, and
    return them as a Snapshot without regions and backings, with the bytes of the regions and
    backings as they stand: a reader that decoded the same bytes before need not decode them
    again. JournalError as `decode`."""
    body = _checked_body(data)
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
        unpacker.feed(body)
        doc: dict[str, Any] = {}
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "regions":
                doc |= {"regions": [], "backings": []}
                return _from_v1(doc), body[unpacker.tell() :]
            doc[key] = unpacker.unpack()
    except JournalError:
        raise
    except Exception as exc:
        raise JournalError(f"the journal is malformed: {exc}") from None
    raise JournalError("the journal is malformed: no regions")


def _checked_body(data: bytes) -> bytes:
    """The body of journal bytes whose header (magic, version, length, checksum) holds."""
    if len(data) < _HEADER.size:
        raise JournalError(f"the journal is truncated ({len(data)} bytes, no complete header)")
    magic, version, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise JournalError("not a membacking state journal (bad magic)")
    if not 1 <= version <= FORMAT_VERSION:
        raise JournalError(
            f"the journal has format version {version}; this release reads 1 to "
            f"{FORMAT_VERSION} (written by a newer membacking?)"
        )
    body = data[_HEADER.size :]
    if len(body) != length:
        raise JournalError(
            f"the journal is truncated or padded ({len(data)} bytes, where its header says "
            f"{_HEADER.size + length})"
        )
    if zlib.crc32(body) != crc:
        raise JournalError("the journal is corrupt (checksum mismatch)")
    return body


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise JournalError(f"the journal is malformed: bad {what}")


def _int(value: Any, what: str) -> int:
    _check(type(value) is int and value >= 0, what)
    assert isinstance(value, int)
    return value


def _bool(value: Any, what: str) -> bool:
    _check(type(value) is bool, what)
    return bool(value)


def _str(value: Any, what: str, optional: bool = False) -> Any:
    _check(type(value) is str or (optional and value is None), what)
    return value


def _from_v1(doc: Any) -> Snapshot:
    _check(type(doc) is dict, "document")
    state_id = doc["state_id"]
    _check(type(state_id) is bytes and len(state_id) == 16, "state_id")
    regions = []
    for item in doc["regions"]:
        _check(type(item) is list and len(item) == 10, "region")
        name, size, prio, order, writable, backing, gpa, enabled, path, subs = item
        regions.append(
            RegionRecord(
                _str(name, "region name"),
                _int(size, "region size"),
                _int(prio, "priority"),
                _int(order, "order"),
                _bool(writable, "writable"),
                _str(backing, "backing"),
                None if gpa is None else _int(gpa, "gpa"),
                _bool(enabled, "enabled"),
                _str(path, "path", optional=True),
                tuple(_sub(s) for s in subs),
            )
        )
    backings = []
    for item in doc["backings"]:
        _check(type(item) is list and len(item) == 7, "backing")
        mid, kind, name, size, writable, dev, ino = item
        _check(kind in BACKING_KINDS, "backing kind")
        backings.append(
            BackingRecord(
                _int(mid, "mappable id"),
                kind,
                _str(name, "backing name"),
                _int(size, "backing size"),
                _bool(writable, "backing writable"),
                _int(dev, "dev"),
                _int(ino, "ino"),
            )
        )
    counters = doc["counters"]
    _check(type(counters) is dict, "counters")
    pins = doc.get("pins", [])
    _check(type(pins) is list, "pins")
    mappers = doc.get("mappers", [])
    _check(type(mappers) is list, "mappers")
    return Snapshot(
        state_id,
        _int(doc["uid"], "uid"),
        _str(doc["runtime_dir"], "runtime_dir"),
        _int(doc["address_space"], "address_space"),
        _int(doc["next_mappable_id"], "next_mappable_id"),
        _int(doc["next_order"], "next_order"),
        _int(doc["next_mapper_id"], "next_mapper_id"),
        tuple(regions),
        tuple(backings),
        {_str(k, "counter"): _int(v, "counter") for k, v in counters.items()},
        tuple(_pin(p) for p in pins),
        tuple(_mapper(r) for r in mappers),
    )


def _mapper(item: Any) -> MapperRecord:
    _check(type(item) is list and len(item) == 3, "mapper")
    mapper_id, pid, started = item
    return MapperRecord(
        _int(mapper_id, "mapper id"), _int(pid, "mapper pid"), _int(started, "mapper start time")
    )


def _pin(item: Any) -> PinRecord:
    _check(type(item) is list and len(item) == 5, "pin")
    mapper_id, label, pid, started, regions = item
    _check(type(regions) is list, "pin regions")
    return PinRecord(
        _int(mapper_id, "pin mapper"),
        _str(label, "pin label"),
        _int(pid, "pin pid"),
        _int(started, "pin start time"),
        tuple(_str(r, "pin region") for r in regions),
    )


def _sub(item: Any) -> SubMappingRecord:
    _check(type(item) is list and len(item) == 5, "sub-mapping")
    offset, size, mid, file_offset, writable = item
    return SubMappingRecord(
        _int(offset, "offset"),
        _int(size, "size"),
        _int(mid, "mappable id"),
        _int(file_offset, "file offset"),
        _bool(writable, "writable"),
    )


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash at any moment leaves the old file or the new one,
    complete: write a temporary file beside it, fsync it, rename it over, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:  # (a full file system): no half-written file left beside the journal
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read(path: Path) -> Snapshot | None:
    """The snapshot stored at `path`; None if there is none. JournalError if it is unusable."""
    data = read_bytes(path)
    return None if data is None else decode(data)


def read_bytes(path: Path) -> bytes | None:
    """The journal file's bytes (None if there is none), refused if over the size limit."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_JOURNAL_BYTES:
        raise JournalError(f"the journal {path} is {size} bytes, over the limit")
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    return None
