"""What a mapper registering again tells the manager it still holds, as messages: Holdings
(arrays of u64, at most 1024 elements each) or, with FEATURE_PACKED_HOLDINGS, PackedHoldings
(the same entries packed), in as few messages as the size limit allows, fds first."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import messages as m
from .codec import MAX_MESSAGE_BYTES

#: bytes of a PackedHoldings message besides its two fields (array, version, type, two bin
#: headers of at most 5 bytes each), rounded up
_OVERHEAD = 32
_FD_BYTES = struct.calcsize(m.PACKED_FD_FORMAT)
_MAPPING_BYTES = struct.calcsize(m.PACKED_MAPPING_FORMAT)


def holdings_messages(
    fds: Sequence[int], mappings: Sequence[int], packed: bool
) -> list[m.Holdings | m.PackedHoldings]:
    """`fds`: (mappable_id, st_dev, st_ino) triples one after the other; `mappings`: (start,
    size, mappable_id, file_offset, writable) quintuples. The fds travel before the mappings
    (the manager checks each mapping against the fds it was told of); one message at least."""
    if len(fds) % m.HOLDING_FD_LEN or len(mappings) % m.HOLDING_MAPPING_LEN:
        raise ValueError("holdings of the wrong length")
    if not packed:
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
    room = MAX_MESSAGE_BYTES - _OVERHEAD
    fd_count, map_count = len(fds) // m.HOLDING_FD_LEN, len(mappings) // m.HOLDING_MAPPING_LEN
    out = []
    f = k = 0
    while True:
        n_fds = min(fd_count - f, room // _FD_BYTES)
        n_maps = min(map_count - k, (room - n_fds * _FD_BYTES) // _MAPPING_BYTES)
        fd_part = fds[f * m.HOLDING_FD_LEN : (f + n_fds) * m.HOLDING_FD_LEN]
        map_part = mappings[k * m.HOLDING_MAPPING_LEN : (k + n_maps) * m.HOLDING_MAPPING_LEN]
        out.append(
            m.PackedHoldings(
                struct.pack(f"<{len(fd_part)}Q", *fd_part),
                struct.pack(f"<{len(map_part)}Q", *map_part),
            )
        )
        f, k = f + n_fds, k + n_maps
        if f == fd_count and k == map_count:
            return out
