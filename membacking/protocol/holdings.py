"""What a mapper registering again tells the manager it still holds, as messages: Holdings
(arrays of u64, at most 1024 elements each) or, with FEATURE_PACKED_HOLDINGS, PackedHoldings
(the same entries packed), in as few messages as the size limit allows, fds first."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from . import messages as m
from .codec import MAX_MESSAGE_BYTES

#: bytes of a PackedHoldings message besides its two fields (array, version, type, two bin
#: headers of at most 5 bytes each), rounded up
_OVERHEAD = 32
FD = struct.Struct(m.PACKED_FD_FORMAT)
MAPPING = struct.Struct(m.PACKED_MAPPING_FORMAT)


def pack_fds(fds: Iterable[tuple[int, int, int]]) -> bytes:
    """(mappable_id, st_dev, st_ino) entries, packed."""
    pack = FD.pack
    return b"".join([pack(*fd) for fd in fds])


def pack_mappings(mappings: Iterable[tuple[int, int, int, int, int]]) -> bytes:
    """(start, size, mappable_id, file_offset, writable) entries, packed."""
    pack = MAPPING.pack
    return b"".join([pack(*mapping) for mapping in mappings])


def packed_messages(fds: bytes, mappings: bytes) -> list[m.PackedHoldings]:
    """Packed entries in as few PackedHoldings as the size limit allows, the fds first (the
    manager checks each mapping against the fds it was told of); one message at least."""
    if len(fds) % FD.size or len(mappings) % MAPPING.size:
        raise ValueError("packed holdings of the wrong length")
    room = MAX_MESSAGE_BYTES - _OVERHEAD
    out = []
    f = k = 0
    while True:
        fd_end = min(len(fds), f + room // FD.size * FD.size)
        map_end = min(len(mappings), k + (room - (fd_end - f)) // MAPPING.size * MAPPING.size)
        out.append(m.PackedHoldings(fds[f:fd_end], mappings[k:map_end]))
        f, k = fd_end, map_end
        if f == len(fds) and k == len(mappings):
            return out


def holdings_messages(
    fds: Sequence[int], mappings: Sequence[int], packed: bool
) -> list[m.Holdings | m.PackedHoldings]:
    """`fds`: (mappable_id, st_dev, st_ino) triples one after the other; `mappings`: (start,
    size, mappable_id, file_offset, writable) quintuples. The fds travel before the mappings
    (the manager checks each mapping against the fds it was told of); one message at least."""
    if len(fds) % m.HOLDING_FD_LEN or len(mappings) % m.HOLDING_MAPPING_LEN:
        raise ValueError("holdings of the wrong length")
    if packed:
        fd_bytes, map_bytes = (
            struct.pack(f"<{len(fds)}Q", *fds),
            struct.pack(f"<{len(mappings)}Q", *mappings),
        )
        return [*packed_messages(fd_bytes, map_bytes)]
    fd_step = m.MAX_RELEASE_IDS // m.HOLDING_FD_LEN * m.HOLDING_FD_LEN
    map_step = m.MAX_RELEASE_IDS // m.HOLDING_MAPPING_LEN * m.HOLDING_MAPPING_LEN
    out: list[m.Holdings | m.PackedHoldings] = [
        m.Holdings(tuple(fds[i : i + fd_step]), ()) for i in range(0, len(fds), fd_step)
    ]
    out += [
        m.Holdings((), tuple(mappings[i : i + map_step]))
        for i in range(0, max(len(mappings), 1), map_step)
    ]
    return out
