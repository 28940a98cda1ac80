"""The answer to `status`: who is serving and whether it is well, with the reasons of a
`degraded` health (open files, changes waiting on mappers or graces, mappers not back, the
state directory's room).
"""

from __future__ import annotations

from typing import Any

from .. import units
from .model import LIMIT_FLAGS
from .procinfo import FD_WARN_SHARE, VERSION, process_info, wire_versions
from .state import ManagerState

#: seconds `status` says mappers are turned away after the last connection it could not accept
ACCEPT_REFUSED_SHOWN = 10.0


def status_of(state: ManagerState) -> dict[str, Any]:
    """Who is serving and whether it is well: pid, version, uptime, counts, process resources
    and a health verdict with its reasons."""
    stats = state.stats()
    proc = process_info()
    problems = []
    if proc["max_fds"] and proc["open_fds"] >= FD_WARN_SHARE * proc["max_fds"]:
        problems.append(f"{proc['open_fds']} of {proc['max_fds']} open-file slots in use")
    now = state._monotonic()
    waiting = [
        {
            "id": e.id,
            "name": e.name,
            "pid": e.pid,
            "seconds": round(now - min(e.unacked.values()), 3),
        }
        for e in sorted(state.mappers.values(), key=lambda e: e.id)
        if e.unacked
    ]
    if waiting:
        problems.append("waiting on mapper(s) " + ", ".join(str(w["id"]) for w in waiting))
    graced, changes = state.dropping.holding()
    if graced:  # (a second at most: EVICT_GRACE)
        problems.append(
            f"{changes} change(s) wait for evicted mapper(s) "
            + ", ".join(map(str, graced))
            + " to stop touching the memory they held (1 to 2 s after the eviction)"
        )
    refused_at = state.accept_refused_at
    if refused_at is not None and now - refused_at < ACCEPT_REFUSED_SHOWN:
        problems.append(
            "new mappers are turned away: no descriptor is left to accept their connection "
            "(raise the open-file limit, LimitNOFILE=, or remove regions)"
        )
    if state.awaited.deferred:  # changes held until the mappers of the manager before are back
        pids = ", ".join(str(r.pid) for r in state.awaited.waiting)
        problems.append(f"{state.awaited.deferred} change(s) wait for pid(s) {pids} to come back")
    room = state.store.ram_room()
    if room is not None and room[1] > room[0]:  # a first touch past the free space: SIGBUS
        free, promised = map(units.format_size, room)
        problems.append(
            f"the state directory's file system has {free} free, less than the {promised} RAM "
            "regions may still take: a first touch past it kills the process making it (SIGBUS)"
        )
    journal_error = state.persistence.get("journal_error")
    if journal_error:  # the state directory cannot be written (or is gone)
        problems.append(journal_error)
    not_back = state.awaited.not_back()  # their wait ran out: they may map removed memory
    if not_back:
        pids = ", ".join(map(str, not_back))
        problems.append(
            f"mapper process(es) of pid {pids} did not come back after the restart and may "
            "still map memory removed since (--evict-kill ends them)"
        )
    return {
        **proc,
        "version": VERSION,
        "versions": wire_versions(),
        "uptime": stats["uptime"],
        "regions": stats["regions"],
        "mappers": stats["mappers"],
        "unmap_timeout": state.unmap_timeout,
        "address_space": state.address_space,
        # the limits and where each was set (the option, the config file, the default)
        "limits": {key: getattr(state.limits, key) for key in LIMIT_FLAGS},
        "limit_origins": {key: state.limits.origin(key) for key in LIMIT_FLAGS},
        "evict_kill": state.evict_kill,
        "prealloc": state.store.prealloc,
        "metrics": state.metrics_url,
        **state.persistence,
        "waiting_on": waiting,
        # mappers of the previous manager not back yet, and the changes waiting for them
        "awaited": state.awaited.describe(now),
        "deferred": state.awaited.deferred,
        "not_back": not_back,
        "vms": state.pins.describe(state.mappers),  # what pins keep from change
        "health": "degraded" if problems else "ok",
        "problems": problems,
    }
