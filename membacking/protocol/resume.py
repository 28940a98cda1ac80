"""The digest a mapper resuming after a planned handover sends in Resume, and the manager
computes from the holdings the old manager handed over: BLAKE2b of 16 bytes over the fds and
the mappings held, each as in Holdings, sorted, as little-endian u64 (docs/PROTOCOL.md §14).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence

from .messages import HOLDING_FD_LEN, HOLDING_MAPPING_LEN, TOKEN_BYTES

_COUNT = struct.Struct("<Q")


def holdings_digest(fds: Sequence[int], mappings: Sequence[int]) -> bytes:
    """`fds`: (mappable_id, dev, ino) entries flattened, `mappings`: (start, size,
    mappable_id, file_offset, writable 0/1) entries flattened, each in any order. The digest
    covers the number of fd entries, the fd entries sorted by mappable id, the number of
    mapping entries and the mapping entries sorted by start, each value a little-endian u64."""
    h = hashlib.blake2b(digest_size=TOKEN_BYTES)
    for flat, width in ((fds, HOLDING_FD_LEN), (mappings, HOLDING_MAPPING_LEN)):
        if len(flat) % width:
            raise ValueError(f"{len(flat)} values are not entries of {width}")
        keys = flat[0::width]  # mappable ids, or starts
        if keys == sorted(keys) and len(set(keys)) == len(keys):  # in order (the usual case)
            words = array("Q", flat)
        else:
            rows = sorted(zip(*(iter(flat),) * width, strict=True))
            words = array("Q", [v for row in rows for v in row])
        if _BIG_ENDIAN:
            words.byteswap()
        h.update(_COUNT.pack(len(flat) // width))
        h.update(words.tobytes())
    return h.digest()


_BIG_ENDIAN = array("Q", [1]).tobytes()[0] != 1
