"""A mapper resuming after a planned handover without Holdings: the old daemon hands over its
mapping table (each mapper's id, token, held ranges and fds: `export`, `encode`); the new one
keeps it (`decode`) and answers a mapper's Resume (`take_resume`) by comparing the mapper's
digest of what it holds with the digest of that table's entry looked up in its own table.
"""

from __future__ import annotations

import logging
import secrets
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .. import trace
from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE
from ..protocol.ranges import MemoryRange
from ..protocol.resume import holdings_digest
from .model import Effect, MapperEntry, SendFd

if TYPE_CHECKING:
    from .peers import PeerState

log = logging.getLogger("membacking.manager")

#: the version of the encoded table; a reader refuses (and ignores) any other
TABLE_VERSION = 1


@dataclass(frozen=True)
class HandedMapper:
    """One mapper of the daemon that handed over: its token, the ranges it held (start, end
    pairs, flattened, in address order) and the mappable ids of the fds it held."""

    token: bytes
    held: tuple[int, ...]
    fds: tuple[int, ...]


def export(state: PeerState) -> dict[int, HandedMapper]:
    """The mappers that may resume with the daemon this one hands over to: those that
    negotiated FEATURE_RESUME and have a stream, with nothing unacknowledged."""
    table: dict[int, HandedMapper] = {}
    for entry in state.mappers.values():
        if (
            entry.features is None
            or not entry.features & m.FEATURE_RESUME
            or entry.stream is None
            or entry.unacked
            or entry.unmapping
        ):
            continue
        held = tuple(v for rng, _ in entry.held.items() for v in (rng.start, rng.end))
        table[entry.id] = HandedMapper(entry.token, held, tuple(sorted(entry.fds_sent)))
    return table


def encode(table: dict[int, HandedMapper]) -> bytes:
    rows = [
        [i, h.token, array("Q", h.held).tobytes(), array("Q", h.fds).tobytes()]
        for i, h in sorted(table.items())
    ]
    data: bytes = msgpack.packb([TABLE_VERSION, rows], use_bin_type=True)
    return data


def decode(data: bytes) -> dict[int, HandedMapper]:
    """The table `encode` made; ValueError if it is not one (of this version)."""
    try:
        version, rows = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ValueError(f"not a mapper table: {exc}") from None
    if version != TABLE_VERSION or type(rows) is not list:
        raise ValueError(f"mapper table of version {version!r}, not {TABLE_VERSION}")
    table: dict[int, HandedMapper] = {}
    for row in rows:
        if not (type(row) is list and len(row) == 4):
            raise ValueError("malformed mapper table row")
        mapper_id, token, held, fds = row
        ok = type(mapper_id) is int and all(type(v) is bytes for v in (token, held, fds))
        if not ok or len(token) != m.TOKEN_BYTES or len(held) % 16 or len(fds) % 8:
            raise ValueError("malformed mapper table row")
        table[mapper_id] = HandedMapper(token, tuple(array("Q", held)), tuple(array("Q", fds)))
    return table


def _answer(entry: MapperEntry, resumed: bool) -> list[Effect]:
    return [SendFd(entry.id, m.Resumed(resumed))]


def take_resume(state: PeerState, entry: MapperEntry, msg: m.Resume) -> list[Effect]:
    """Resume `entry` as the mapper `msg.mapper_id` of the daemon that handed over if the
    digest of what that daemon's table says it held, looked up in this table, is the
    mapper's: it then holds all of it (no Holdings). Else Resumed false (it sends Holdings)."""
    if entry.features is None or not entry.features & m.FEATURE_RESUME:
        state.reject("unexpected", "Resume without FEATURE_RESUME", entry.pid)
        return [SendFd(entry.id, m.Error("unexpected", "Resume was not negotiated"))]
    if entry.stream is None or len(entry.held) or entry.fds_sent:
        state.reject("unexpected", "Resume before Attach or after holdings", entry.pid)
        return _answer(entry, False)
    handed = state.handed_mappers.get(msg.mapper_id)
    if handed is None or not secrets.compare_digest(handed.token, msg.token):
        if handed is not None:
            state.reject("bad-token", f"Resume as mapper {msg.mapper_id}, wrong token", entry.pid)
        state.counters["resumes_refused"] += 1
        return _answer(entry, False)
    del state.handed_mappers[msg.mapper_id]  # once only
    found = _look_up(state, handed)
    if found is None or not secrets.compare_digest(holdings_digest(found[0], found[1]), msg.digest):
        state.counters["resumes_refused"] += 1
        log.info(
            "mapper %d (%s, was %d) holds other than the table handed over: checking its Holdings",
            entry.id,
            entry.name,
            msg.mapper_id,
        )
        return _answer(entry, False)
    fds, _, ranges, mappings = found
    entry.fds_sent.update(fds[0::3])
    for mapping in mappings:
        mapping.holders.add(entry.id)
    entry.held.extend(ranges, [mp.mappable_id for mp in mappings])
    state.counters["resumed_mappers"] += 1
    state.counters["reattached_mappings"] += len(ranges)
    trace.mark(f"daemon.resumed mapper={entry.id} maps={len(ranges)}")
    log.info(
        "mapper %d (%s, was %d) resumed by digest: %d mappings, %d fds",
        entry.id,
        entry.name,
        msg.mapper_id,
        len(ranges),
        len(fds) // 3,
    )
    return _answer(entry, True)


def _look_up(state: PeerState, handed: HandedMapper) -> Any:
    """(fds, mappings) as Holdings would list them, the ranges and the table's Mapping of
    each: from the handed-over entry and this daemon's table and store. None if a range is
    not one mapping of the table, or an fd or a mapping's fd is not the store's."""
    identity = getattr(state.store, "identity", None)
    if identity is None:
        return None
    fds: list[int] = []
    for mappable_id in handed.fds:
        ident = identity(mappable_id)
        if ident is None:
            return None
        fds += (mappable_id, ident[0], ident[1])
    held_fds = set(handed.fds)
    flat: list[int] = []
    ranges: list[MemoryRange] = []
    mappings = []
    it = iter(handed.held)
    for start, end in zip(it, it, strict=True):
        rng = MemoryRange(start, end)
        mapping = state._mapping_at(rng)
        if mapping is None:
            return None
        mid = mapping.mappable_id
        if mid not in held_fds and mid != PRIVATE_MAPPABLE:
            return None
        flat += (start, end - start, mid, mapping.file_offset, int(mapping.writable))
        ranges.append(rng)
        mappings.append(mapping)
    return fds, flat, ranges, mappings
