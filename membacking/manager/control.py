"""The control channel's operations: argument checking and the calls into `ManagerState`.

Each operation returns the effects to carry out; those that change mappings reply only once every
affected mapper has answered.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import units
from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE, Channel
from .awaited import may_cut
from .errors import Refused
from .health import status_of
from .model import Disconnect, MapperEntry
from .pins import Pins, guard
from .procinfo import VERSION
from .state import MAX_LISTED_PIECES, Effect, ManagerState, Send, piece_info, region_info

log = logging.getLogger("membacking.manager")

_NOTHING: dict[str, type] = {}


def expect_args(
    args: dict[str, Any], required: dict[str, type], optional: dict[str, type] | None = None
) -> None:
    """Refuse missing, unknown or mistyped arguments with a bad-request error."""
    optional = optional or {}
    for key, kind in {**required, **optional}.items():
        if key in args and args[key] is not None and type(args[key]) is not kind:
            raise Refused("bad-request", f"argument {key!r} must be of type {kind.__name__}")
    missing = [k for k in required if args.get(k) is None]
    if missing:
        raise Refused("bad-request", f"missing argument(s): {', '.join(missing)}")
    extra = [k for k in args if k not in required and k not in optional]
    if extra:
        raise Refused("bad-request", f"unknown argument(s): {', '.join(extra)}")
    for key in ("name", "after"):
        if args.get(key) is not None:
            try:
                units.check_name(args[key], f"region {key}" if key == "name" else key)
            except ValueError as exc:
                raise Refused("bad-name", str(exc)) from None


def _reply(identity: bytes, result: Any) -> list[Effect]:
    return [Send(Channel.CONTROL, identity, m.ControlReply(result))]


#: most regions one `regions` page lists, and the pieces and holders listed (together) after
#: which a page of regions or mappers stops early: about 2 ms of the loop a page
PAGE_REGIONS = 128
PAGE_ITEMS = 2048


def _regions(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """One page of regions, by name after `after`: at most `limit` (and PAGE_REGIONS) of them,
    fewer once PAGE_ITEMS pieces and holders are listed; an empty page is the end. A page costs
    the same however many regions there are (a listing of 10,000 held the loop for 65 ms)."""
    expect_args(args, _NOTHING, {"after": str, "limit": int})
    limit = args.get("limit") or PAGE_REGIONS
    if not 1 <= limit <= PAGE_REGIONS:
        raise Refused("bad-request", f"limit must be 1 to {PAGE_REGIONS}")
    names = state.names
    page = _page(
        _from(names, bisect.bisect_right(names, args["after"]) if args.get("after") else 0),
        limit,
        lambda name: region_info(state, state.regions[name]),
        lambda info: len(info["mappings"]) + len(info["holders"]),
    )
    return _reply(identity, page)


def _from(keys: list[Any], first: int) -> Iterator[Any]:
    """`keys` from index `first` on, without copying them (a page reads only a few)."""
    return (keys[i] for i in range(first, len(keys)))


def _page(
    keys: Iterable[Any],
    limit: int,
    describe: Callable[[Any], dict[str, Any]],
    items: Callable[[dict[str, Any]], int],
) -> list[dict[str, Any]]:
    """The descriptions of `keys` from the first: at most `limit`, and no more once they list
    PAGE_ITEMS items (pieces, holders, held ranges) in all."""
    page: list[dict[str, Any]] = []
    listed = 0
    for key in keys:
        if len(page) >= limit or listed >= PAGE_ITEMS:
            break
        info = describe(key)
        listed += items(info)
        page.append(info)
    return page


def _mappings(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """Up to MAX_LISTED_PIECES of a region's pieces, from the one at or after `offset`."""
    expect_args(args, {"name": str}, {"offset": int})
    region = state.regions.get(args["name"])
    if region is None:
        raise Refused("not-found", f"region {args['name']!r} does not exist")
    offset = args.get("offset") or 0
    if offset < 0:
        raise Refused("bad-request", "offset must not be negative")
    first, _ = region.submappings.span(offset, offset + 1)
    listed = region.submappings.slice(first, first + MAX_LISTED_PIECES)
    result = {
        "name": region.name,
        "pieces": len(region.submappings),
        "mappings": [piece_info(sub) for sub in listed],
    }
    return _reply(identity, result)


def _mapper_info(entry: MapperEntry, pins: Pins) -> dict[str, Any]:
    listed = entry.held.page(0, MAX_LISTED_PIECES)
    return {
        "id": entry.id,
        "name": entry.name,
        "pid": entry.pid,
        "mode": "private" if entry.held.maps(PRIVATE_MAPPABLE) else entry.mode,
        "attached": entry.stream is not None,
        "ranges": len(entry.held),
        "bytes": entry.held.bytes,
        "held": [[r.start, r.end - r.start] for r in listed],
        "fds": len(entry.fds_sent),
        # what Unmaps still awaiting its answer take away (a removal waits on these)
        "unmapping_ranges": sum(n for n, _ in entry.unmapping.values()),
        "unmapping_bytes": sum(b for _, b in entry.unmapping.values()),
        "pin": pin.describe() if (pin := pins.of(entry.id)) else None,
        "connected_at": entry.connected_at,
        "last_seen": entry.last_seen,
    }


#: most mappers one `mappers` page lists (fewer once PAGE_ITEMS held ranges are listed)
PAGE_MAPPERS = 64


def _mappers(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """One page of mappers, by id after `after_id`; each lists at most MAX_LISTED_PIECES of
    its held ranges (`mapper_held` pages through more). With 16 mappers holding 2,000 ranges
    each, the listing of them all held the loop for 79 ms."""
    expect_args(args, _NOTHING, {"after_id": int})
    after = args.get("after_id") or 0
    ids = list(state.mappers)  # ids only grow: insertion order is id order
    page = _page(
        _from(ids, bisect.bisect_right(ids, after)),
        PAGE_MAPPERS,
        lambda mapper_id: _mapper_info(state.mappers[mapper_id], state.pins),
        lambda info: len(info["held"]),
    )
    return _reply(identity, page)


def _mapper_held(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """Up to MAX_LISTED_PIECES of a mapper's held ranges, from the first ending after `gpa`."""
    expect_args(args, {"id": int}, {"gpa": int})
    entry = state.mappers.get(args["id"])
    if entry is None:
        raise Refused("not-found", f"no mapper {args['id']}")
    listed = entry.held.page(args.get("gpa") or 0, MAX_LISTED_PIECES)
    held = [[r.start, r.end - r.start] for r in listed]
    return _reply(identity, {"id": entry.id, "ranges": len(entry.held), "held": held})


def _stats(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, _NOTHING)
    # mappers of the manager before a restart that did not come back in time (awaited.py)
    timeouts = state.counters["reattach_timeouts"]
    return _reply(identity, {**state.stats(), "reattach_timeouts": timeouts, "version": VERSION})


def _status(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """Who is serving and whether it is well (health.py)."""
    expect_args(args, _NOTHING)
    return _reply(identity, status_of(state))


#: Operations after whose reply the daemon stops (it shuts down as on SIGTERM).
STOPPING_OPS = frozenset({"stop"})


def _stop(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """Agree to stop; `keep_state` (optional) keeps or ends the state at this stop whatever
    `manager run --keep-state` said (the daemon applies it: `stop_keeping`)."""
    expect_args(args, _NOTHING, {"keep_state": bool})
    keep = args.get("keep_state")
    kept = state.persistence.get("state_dir") or state.persistence.get("fd_store")
    if keep and state.persistence.get("state_dir_removed"):
        raise Refused(
            "no-state",
            f"the state directory {state.persistence['state_dir']} was removed under this "
            "manager: nothing can be kept (`manager stop` without --keep-state ends it)",
        )
    if keep and not kept:
        raise Refused(
            "no-state",
            "this manager keeps no state (--no-state): its memory cannot outlive it; hand it "
            "over instead (`manager run --no-state --takeover`)",
        )
    keeps = bool(kept) and (bool(keep) if keep is not None else state.persistence["keep_state"])
    # the VMs that run on, and whether a next manager pins each again (a journaled pin)
    vms = [
        p.describe() | {"kept": p.started is not None} for p in state.pins.running(state.mappers)
    ]
    return _reply(identity, {"pid": os.getpid(), "stopping": True, "keep_state": keeps, "vms": vms})


def _evict_mapper(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """Cut a mapper off as an unresponsive one is: it is told why, what it held is released."""
    expect_args(args, {"id": int})
    entry = state.mappers.get(args["id"])
    if entry is None:
        raise Refused("unknown-mapper", f"no mapper {args['id']} is attached")
    pin = state.pins.of(entry.id)  # a VM's RAM it lent: unpinned with it (the VM runs on)
    info = {"id": entry.id, "name": entry.name, "pid": entry.pid}
    info["pin"] = pin.describe() if pin is not None else None
    reason = f"{m.SHUTDOWN_EVICTED}: an operator ran `membacking mapper evict`"
    effects = state.farewell(entry.id, reason)
    effects.append(Disconnect(entry.id, reason))
    state.counters["evictions_by_operator"] += 1
    effects.extend(state.mapper_gone(entry.id, "evicted by an operator", evicted="by an operator"))
    return effects + _reply(identity, info)


def _add_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(
        args,
        {"name": str, "size": int},
        {
            "gpa": int,
            "readonly": bool,
            "priority": int,
            "disabled": bool,
            "file": str,
            "hugetlb": bool,
            "private": bool,
        },
    )
    _absolute_file(args)
    kinds = [k for k in ("file", "hugetlb", "private") if args.get(k)]
    if len(kinds) > 1:
        raise Refused("bad-request", f"choose one backing, not {' and '.join(kinds)}")
    backing = kinds[0] if kinds else "memfd"
    if backing == "private" and len(state.mappers) > 1:
        # private RAM lives in one mapper: the others could never see it, and every mapper
        # after them would be refused
        attached = ", ".join(
            f"{e.id} ({e.name})" for e in sorted(state.mappers.values(), key=lambda e: e.id)
        )
        raise Refused(
            "private",
            f"private RAM needs a single mapper, but {len(state.mappers)} are attached: "
            f"{attached}; detach all but one first",
        )
    return state.add_region(
        args["name"],
        args.get("gpa"),
        args["size"],
        not args.get("readonly", False),
        priority=args.get("priority") or 0,
        enabled=not args.get("disabled", False),
        backing=backing,
        path=args.get("file"),
        reply_to=identity,
    )


def _absolute_file(args: dict[str, Any]) -> None:
    path = args.get("file")
    if path and not path.startswith("/"):
        raise Refused(
            "bad-request",
            f"file {path!r} must be an absolute path (the manager's working directory is not "
            "the client's)",
        )


def _remove_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str})
    return state.remove_region(args["name"], identity)


def _enable_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str}, {"gpa": int})
    return state.set_enabled(args["name"], True, args.get("gpa"), identity)


def _disable_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str})
    return state.set_enabled(args["name"], False, None, identity)


def _move_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str, "gpa": int})
    return state.move_region(args["name"], args["gpa"], identity)


def _map_range(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(
        args,
        {"name": str, "offset": int, "size": int},
        {"file": str, "file_offset": int, "readonly": bool},
    )
    _absolute_file(args)
    if args.get("file_offset") and not args.get("file"):
        raise Refused("bad-request", "file_offset needs a file")
    backing = "file" if args.get("file") else "memfd"
    return state.change_mappings(
        args["name"],
        args["offset"],
        args["size"],
        identity,
        replace=(
            backing,
            args.get("file"),
            args.get("file_offset") or 0,
            not args.get("readonly", False),
        ),
    )


def _pin_regions(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    """Pin regions for an attached mapper that lent them (e.g. to a VM) until it detaches."""
    expect_args(args, {"mapper": int, "label": str, "pid": int}, {"regions": str})
    if args["mapper"] not in state.mappers:
        raise Refused("not-found", f"no mapper {args['mapper']} is attached")
    names = [n for n in (args.get("regions") or "").split(",") if n]  # names hold no commas
    for name in names:
        if name not in state.regions or state.regions[name].removing:
            raise Refused("not-found", f"region {name!r} does not exist")
    pin = state.pins.set(args["mapper"], args["label"], args["pid"], names, state.mappers)
    return _reply(identity, pin.describe())


def _unmap_range(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str, "offset": int, "size": int})
    return state.change_mappings(args["name"], args["offset"], args["size"], identity)


OPS: dict[str, Callable[[ManagerState, bytes, dict[str, Any]], list[Effect]]] = {
    "regions": _regions,
    "mappings": _mappings,
    "mappers": _mappers,
    "mapper_held": _mapper_held,
    "stats": _stats,
    "status": _status,
    "stop": _stop,
    "evict_mapper": _evict_mapper,
    "add_region": _add_region,
    "remove_region": _remove_region,
    "enable_region": _enable_region,
    "disable_region": _disable_region,
    "move_region": _move_region,
    "map_range": _map_range,
    "unmap_range": _unmap_range,
    "pin_regions": _pin_regions,
}


#: the argument a client addresses a request with: the daemon instance of the lock file
INSTANCE_ARG = "instance"


def addressed_elsewhere(args: dict[str, Any], instance: str) -> m.Error | None:
    """A request addressed to another daemon instance (one that died, whose successor took
    the runtime directory) is refused, never executed: the client decides what to do. The
    argument is taken out of `args` otherwise."""
    wanted = args.pop(INSTANCE_ARG, None)
    if wanted is None or wanted == instance:
        return None
    return m.Error(
        "wrong-instance",
        f"this request was addressed to manager instance {wanted!r}, which is gone; this is "
        f"instance {instance!r}: nothing was done",
    )


#: what a change to a named region that waits for mappers to come back would be refused as
#: at once: the region does not exist (or is being removed), or it is pinned
_EARLY_ACTIONS = {
    "remove_region": "removed",
    "disable_region": "disabled",
    "move_region": "moved",
    "map_range": "re-mapped",
    "unmap_range": "re-mapped",
}


def _refuse_early(state: ManagerState, op: str, args: dict[str, Any]) -> None:
    """Refused (not-found, pinned) if the change `op` would be, whatever the mappers awaited
    do: a pinned region stays pinned and a missing one missing while they are awaited."""
    action, name = _EARLY_ACTIONS.get(op), args.get("name")
    if action is None or not isinstance(name, str):
        return  # its handler says what is wrong with its arguments once it runs
    region = state.regions.get(name)
    if region is None or region.removing:
        what = "does not exist" if region is None else "is being removed"
        raise Refused("not-found", f"region {name!r} {what}")
    guard(state, name, action)


def run_control(
    state: ManagerState, identity: bytes, op: str, args: dict[str, Any]
) -> list[Effect]:
    handler = OPS.get(op)
    if handler is None:
        raise Refused("bad-request", f"unknown operation {op!r}")
    log.debug("control request %s %s", op, args)
    if state.awaited.open and may_cut(op, args):
        # what is refused now would be refused then: said at once, not after the wait
        _refuse_early(state, op, args)
        # mappers of the previous manager may map what it cuts: it runs once they are back
        state.awaited.defer(identity, op, args)
        log.info("%s waits for mapper(s) to come back (pids %s)", op, state.awaited.pids())
        return []
    return handler(state, identity, args)
