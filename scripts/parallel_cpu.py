"""Where the CPU of parallel faults goes, thread by thread: `python scripts/parallel_cpu.py`.

Runs the benchmark's parallel case (N mapper processes faulting distinct regions at once) and
reads each thread's run time (/proc/PID/task/TID/schedstat) before and after: the manager's
loop, its ZeroMQ I/O thread, and in the mappers the faulting threads, the mapper threads and
their ZeroMQ I/O threads. The manager's loop busy share (its CPU over the wall time) says
whether it is what serialises the faults: at 100% it would be. `--thin` runs the benchmark's
thin mappers instead, to tell the mapper's code from the rest thread by thread.
"""

from __future__ import annotations

import argparse
import os
import time

from membacking.bench.cases import _add_probes
from membacking.bench.procs import Mapper, manager


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (kind, nanoseconds run) for every thread of a process."""
    out: dict[int, tuple[str, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns = int(f.read().split()[0])
        except OSError:
            continue
        if comm.startswith("ZMQbg/IO"):
            kind = "zmq io"
        elif comm.startswith("ZMQbg"):
            kind = "zmq other"
        elif int(tid) == pid:
            kind = "main"
        else:
            kind = "python thread"
        out[int(tid)] = (kind, run_ns)
    return out


def _delta(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, int]:
    by_kind: dict[str, int] = {}
    for tid, (kind, ns) in after.items():
        by_kind[kind] = by_kind.get(kind, 0) + ns - before.get(tid, (kind, 0))[1]
    return by_kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mappers", type=int, default=8)
    parser.add_argument("--faults", type=int, default=200, help="faults per mapper")
    parser.add_argument(
        "--thin", action="store_true", help="the benchmark's thin mappers (bench/thin.py) instead"
    )
    args = parser.parse_args()
    with manager("--region", "ram0=0:1M") as mgr:
        gpas = _add_probes(mgr, args.mappers * args.faults)
        procs = [Mapper(mgr.dir, f"m{i}", args.thin) for i in range(args.mappers)]
        try:
            for proc in procs:  # untimed: a new mapper is journaled before its first Map
                proc.call("touch", [0])
            before = {pid: _threads(pid) for pid in (mgr.pid, *(p.pid for p in procs))}
            started = time.perf_counter()
            for i, proc in enumerate(procs):
                proc.send("fault_many", gpas[i * args.faults : (i + 1) * args.faults])
            for proc in procs:
                status, _ = proc.call_raw(300)
                assert status == "ok"
            wall = time.perf_counter() - started
            after = {pid: _threads(pid) for pid in before}
        finally:
            for proc in procs:
                proc.close()
    faults = args.mappers * args.faults
    manager_cpu = _delta(before[mgr.pid], after[mgr.pid])
    mapper_cpu: dict[str, int] = {}
    for pid in before:
        if pid != mgr.pid:
            for kind, ns in _delta(before[pid], after[pid]).items():
                mapper_cpu[kind] = mapper_cpu.get(kind, 0) + ns
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{faults} faults by {args.mappers} mappers in {wall:.3f} s: {faults / wall:,.0f}/s")
    print("CPU per fault, by thread (us):")
    total = 0.0
    for side, cpu in (("manager", manager_cpu), ("mappers", mapper_cpu)):
        for kind, ns in sorted(cpu.items()):
            if ns:
                total += ns / 1e3 / faults
                print(f"  {side:<8} {kind:<14} {ns / 1e3 / faults:8.1f}")
    print(f"  {'all':<23} {total:8.1f}")
    loop = manager_cpu.get("main", 0) / 1e9
    print(f"manager loop busy {loop / wall:.0%} of the wall time")
    print(f"all threads busy {total * faults / 1e6 / wall:.2f} CPUs of {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
