"""Guest RAM for a third party (a vhost-user backend, a DMA engine, QEMU) to map itself:
`SharedRange`, and `shared_ranges()`, which `GuestMemory.sharing()` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import NamedTuple

from . import forking
from .core import VaMapper


class SharedRange(NamedTuple):
    """A range of guest RAM a third party can map: `size` bytes of `fd` at `file_offset`."""

    gpa: int
    size: int
    fd: int
    file_offset: int
    writable: bool


def shared_ranges(
    mapper: VaMapper,
    ensure_mapped: Callable[[int, int], None],
    names: Collection[str] | None = None,
) -> list[SharedRange] | None:
    """The sub-mappings of every active region (of those `names`, if given) with a duplicate
    of its fd (the caller owns them), mapping each with `ensure_mapped` to get that fd; None in
    private RAM mode. A region not named is neither mapped nor held."""
    from ..control_client import ControlClient

    forking.check(mapper)  # a forked child: not a mapper, and no round trip to say so
    regions = ControlClient(mapper.link.paths.root).regions()
    if any(r["backing"] == "private" for r in regions):
        return None
    out = []
    for region in regions:
        if not region["active"] or (names is not None and region["name"] not in names):
            continue
        for sub in region["mappings"]:
            gpa = region["gpa"] + sub["offset"]
            ensure_mapped(gpa, sub["size"])
            fd = mapper.fds.dup(sub["mappable_id"])
            if fd is None:
                continue
            out.append(
                SharedRange(
                    gpa,
                    sub["size"],
                    fd,
                    sub["file_offset"],
                    sub["writable"] and region["writable"],
                )
            )
    return out
