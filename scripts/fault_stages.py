"""Where a fault's time goes: `python scripts/fault_stages.py [--count N] [--json FILE]`.

Wraps a few mapper methods with timestamps (in this process only: the manager runs unchanged in
its own process) and prints the median of each stage of a first fault (the fd arrives with the
Map) and of a fault whose fd the mapper already holds. A profile, not a benchmark: the wrappers
themselves add about a microsecond per stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from membacking import attach
from membacking.bench.cases import _add_probes
from membacking.bench.procs import manager
from membacking.mapper import core, fds, link, waitlist
from membacking.protocol import messages as m

STAGES = (
    ("to request", "start", "request0", "the access misses, registers a waiter"),
    ("request sent", "request0", "request1", "encode SendMappings, send on the fd socket"),
    ("to the Map", "request1", "drain", "fd socket there, the manager, ZeroMQ back, thread wakes"),
    ("decode", "drain", "apply0", "receive and decode the Map in the mapper thread"),
    ("fd", "fd0", "fd1", "take the fd pushed behind the Map (or the one held)"),
    ("mmap", "fd1", "apply1", "mmap MAP_FIXED, madvise, table insert"),
    ("wake waiters", "apply1", "complete", "trim and wake the waiter"),
    ("thread switch", "complete", "fault1", "the faulting thread runs again"),
    ("access", "fault1", "end", "retry the access, copy 8 bytes"),
    ("total", "start", "end", ""),
)


def _wrap(
    owner: Any, name: str, before: str | None, after: str | None, marks: dict[str, int]
) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def wrapped(*args: Any) -> Any:
        if before is not None:
            marks.setdefault(before, time.perf_counter_ns())
        result = original(*args)
        if after is not None:
            marks[after] = time.perf_counter_ns()
        return result

    setattr(owner, name, wrapped)


def measure(count: int) -> dict[str, dict[str, float]]:
    marks: dict[str, int] = {}
    _wrap(link.ManagerLink, "send", "request0", "request1", marks)
    receive = link.ManagerLink.recv_stream

    def recv_stream(self: link.ManagerLink) -> m.Message | None:
        started = time.perf_counter_ns()
        msg = receive(self)
        if isinstance(msg, m.Map):
            marks.setdefault("drain", started)  # the receive that brought the Map began here
        return msg

    link.ManagerLink.recv_stream = recv_stream  # type: ignore[method-assign]
    _wrap(core.VaMapper, "_apply_map", "apply0", "apply1", marks)
    _wrap(fds.MapperFds, "for_map", "fd0", "fd1", marks)
    _wrap(waitlist.WaiterSet, "complete", None, "complete", marks)
    _wrap(core.VaMapper, "fault", None, "fault1", marks)
    out: dict[str, dict[str, float]] = {}
    with manager("--region", "ram0=0:1M") as mgr:
        gpas = _add_probes(mgr, count)
        with attach(mgr.dir, name="stages") as memory:
            memory.read_at(0, 1)
            for kind in ("first fault", "fd already held"):
                rows = []
                for i, gpa in enumerate(gpas):
                    if kind == "fd already held":  # mapped before: unmap it, keep the fd
                        mgr.client.disable_region(f"p{i}")
                        mgr.client.enable_region(f"p{i}")
                    marks.clear()
                    marks["start"] = time.perf_counter_ns()
                    memory.read_at(gpa, 8)
                    marks["end"] = time.perf_counter_ns()
                    rows.append({name: marks[b] - marks[a] for name, a, b, _ in STAGES})
                out[kind] = {
                    name: statistics.median(r[name] for r in rows) / 1000 for name, *_ in STAGES
                }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=300, help="faults of each kind")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = parser.parse_args()
    result = measure(args.count)
    print(f"median microseconds over {args.count} faults of each kind")
    print(f"{'stage':14s} {'first fault':>12s} {'fd held':>9s}  what")
    for name, _, _, what in STAGES:
        first, held = result["first fault"][name], result["fd already held"][name]
        print(f"{name:14s} {first:12.1f} {held:9.1f}  {what}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
